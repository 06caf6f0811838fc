"""API keys: made at random, stored only as their SHA-256, each bound to one identity and role.

A key is `ait_<role>_<random>`; the role in the text is a hint for people, the stored role is
what counts. Keys are 192 bits of randomness, so a plain SHA-256 is a safe way to store them
(there is nothing to brute-force); lookups are by that hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from aitbc_node.clock import now_ms, rfc3339
from aitbc_node.errors import BadRequest, Conflict, Forbidden, NotFound, Unauthorized
from aitbc_node.ledger import DEFAULT_GRANT, record_grant
from aitbc_node.store import Connection, Row, Store

ROLES = ("client", "miner", "admin")
CREDENTIALS_FILE = "credentials.json"
BUILTIN_MINER_ID = "builtin"


@dataclass(frozen=True)
class Principal:
    """Who made a request: the identity and role bound to the API key it carried."""

    key_id: str
    name: str
    role: str
    identity: str

    def require(self, *roles: str) -> None:
        """Raise 403 unless this principal has one of `roles`."""
        if self.role not in roles:
            wanted = " or ".join(roles)
            raise Forbidden(
                f"this endpoint needs a {wanted} key; this key's role is {self.role}",
                error_code="WRONG_ROLE",
            )


def hash_key(key: str) -> str:
    """The stored form of a key."""
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(
    store: Store, role: str, name: str, *, credit: int = DEFAULT_GRANT
) -> tuple[str, Row]:
    """Make a key acting as identity `name` and return (plaintext, row).

    An identity has one role: a name that any key of another role acts as (revoked or not) is
    refused with 409 `IDENTITY_ROLE_CONFLICT`, since a client named `admin` would otherwise
    share the admin's jobs, webhooks and address. A client key comes with a grant of `credit`
    nAIT to its identity's address, written in the same transaction as the key.
    """
    if role not in ROLES:
        raise BadRequest(f"role must be one of {', '.join(ROLES)}", error_code="INVALID_ROLE")
    if not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name):
        raise BadRequest(
            "name must be 1-64 letters, digits, '-', '_' or '.'", error_code="INVALID_NAME"
        )
    identity = name
    key = f"ait_{role}_{secrets.token_urlsafe(24)}"
    row = {
        "key_id": f"key-{secrets.token_hex(6)}",
        "key_hash": hash_key(key),
        "name": name,
        "role": role,
        "identity": identity,
        "created_ms": now_ms(),
    }
    with store.write() as db:
        if db.one(
            "SELECT 1 FROM api_keys WHERE name = ? AND role = ? AND revoked_ms IS NULL",
            (name, role),
        ):
            raise Conflict(f"an active {role} key named {name!r} exists", error_code="KEY_EXISTS")
        taken = db.one(
            "SELECT role FROM api_keys WHERE identity = ? AND role != ? LIMIT 1", (identity, role)
        )
        if taken:
            raise Conflict(
                f"the name {name!r} is already the identity of a {taken['role']} key; an "
                f"identity has one role, so pick another name for this {role} key",
                error_code="IDENTITY_ROLE_CONFLICT",
            )
        db.execute(
            "INSERT INTO api_keys (key_id, key_hash, name, role, identity, created_ms)"
            " VALUES (:key_id, :key_hash, :name, :role, :identity, :created_ms)",
            row,
        )
        if role == "client" and credit > 0:
            record_grant(db, identity, credit)
    return key, row


def identity_role_conflicts(db: Connection) -> list[str]:
    """Identities that live keys of more than one role act as, one line each: a store made
    before the one-role rule may hold them. Revoking the keys of all roles but one ends it."""
    rows = db.execute(
        "SELECT identity, group_concat(DISTINCT role) AS roles FROM api_keys"
        " WHERE revoked_ms IS NULL"
        " GROUP BY identity HAVING count(DISTINCT role) > 1 ORDER BY identity"
    )
    return [
        f"identity {r['identity']!r} has live keys of several roles ({r['roles']}), which"
        " act as one another; revoke those of all roles but one (`aitbc-node keys revoke`)"
        " and make them anew under other names"
        for r in rows
    ]


def authenticate(store: Store, key: str | None) -> Principal:
    """The principal for `key`; 401 when it is missing, unknown or revoked."""
    if not key:
        raise Unauthorized(
            "missing API key: send it as X-Api-Key: KEY or Authorization: Bearer KEY",
            error_code="MISSING_API_KEY",
        )
    row = store.read().one(
        "SELECT key_id, name, role, identity, revoked_ms FROM api_keys WHERE key_hash = ?",
        (hash_key(key),),
    )
    if row is None:
        raise Unauthorized("invalid API key", error_code="INVALID_API_KEY")
    if row["revoked_ms"] is not None:
        raise Unauthorized("this API key has been revoked", error_code="API_KEY_REVOKED")
    return Principal(row["key_id"], row["name"], row["role"], row["identity"])


def list_keys(store: Store) -> list[dict[str, object]]:
    """Every key (never its secret), oldest first."""
    rows = store.read().execute("SELECT * FROM api_keys ORDER BY created_ms, key_id")
    return [
        {
            "key_id": r["key_id"],
            "name": r["name"],
            "role": r["role"],
            "identity": r["identity"],
            "created_at": rfc3339(r["created_ms"]),
            "revoked_at": rfc3339(r["revoked_ms"]),
        }
        for r in rows
    ]


def revoke_key(store: Store, key_id_or_name: str) -> Row:
    """Revoke a key by its id, or by name when exactly one active key has that name."""
    with store.write() as db:
        rows = db.execute(
            "SELECT * FROM api_keys WHERE key_id = ? OR (name = ? AND revoked_ms IS NULL)",
            (key_id_or_name, key_id_or_name),
        )
        if not rows:
            raise NotFound(f"no key {key_id_or_name!r}", error_code="KEY_NOT_FOUND")
        if len(rows) > 1:
            ids = ", ".join(r["key_id"] for r in rows)
            raise Conflict(f"{key_id_or_name!r} names several keys ({ids}); give the key id")
        row = rows[0]
        if row["revoked_ms"] is None:
            row["revoked_ms"] = now_ms()
            db.execute(
                "UPDATE api_keys SET revoked_ms = ? WHERE key_id = ?",
                (row["revoked_ms"], row["key_id"]),
            )
        return row


def ensure_initial_keys(
    store: Store, data_dir: Path, credit: int = DEFAULT_GRANT
) -> dict[str, str]:
    """On first start make the admin, default client and built-in miner keys.

    The plaintext keys are kept in `credentials.json` in the data directory (mode 0600) so the
    node can print the client key at every start; the store holds only their hashes. Later
    starts read the file back: a key the operator revoked stays revoked. Returns the
    credentials (role -> key).
    """
    path = data_dir / CREDENTIALS_FILE
    if path.exists():
        return json.loads(path.read_text())
    credentials = {}
    for role, name in (("admin", "admin"), ("client", "default"), ("miner", BUILTIN_MINER_ID)):
        key, _ = create_key(store, role, name, credit=credit)
        credentials[role] = key
    write_private(path, json.dumps(credentials, indent=2) + "\n")
    return credentials


def is_live(store: Store, key: str) -> bool:
    """True when `key` is a known key that has not been revoked."""
    try:
        authenticate(store, key)
    except Unauthorized:
        return False
    return True


def write_private(path: Path, text: str) -> None:
    """Write `text` to a file only its owner can read (mode 0600 from the start)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
