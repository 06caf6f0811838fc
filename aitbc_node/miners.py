"""The miner registry: who serves which models, and who was seen lately."""

from __future__ import annotations

import json
from typing import Any

from aitbc_node.canonical import stored_json
from aitbc_node.clock import now_ms, rfc3339
from aitbc_node.config import JobRules
from aitbc_node.errors import BadRequest, Forbidden, NotFound
from aitbc_node.keys import Principal
from aitbc_node.schemas import RegisterMiner
from aitbc_node.store import Connection, Row, Store

# A miner's last_seen is written at most this often (and at most every tenth of the time a
# miner may stay silent and still count as online); requests in between only read it.
SEEN_WRITE_MS = 1000


class Miners:
    """Registration and liveness of the miners, built-in and remote."""

    def __init__(self, store: Store, rules: JobRules) -> None:
        self.store = store
        self.rules = rules
        # The built-in miner of this process; it is online while the process runs, however
        # long it waits for work, so it is not judged by last_seen.
        self.builtin_id: str | None = None
        self.builtin_models: list[str] = []
        self._seen_ms: dict[str, int] = {}  # when this process last wrote each last_seen

    def register(self, principal: Principal, request: RegisterMiner) -> dict[str, Any]:
        """Register (or re-register) the miner bound to `principal`'s key."""
        principal.require("miner")
        if request.miner_id != principal.identity:
            raise Forbidden(
                f"this key acts as miner {principal.identity!r}, not {request.miner_id!r}",
                error_code="MINER_ID_MISMATCH",
            )
        row = self.upsert(
            request.miner_id,
            list(dict.fromkeys(request.capabilities)),
            request.gpu_info,
            builtin=False,
            public_key=request.public_key.lower() if request.public_key else None,
        )
        return self.view(row)

    def upsert(
        self,
        miner_id: str,
        capabilities: list[str],
        gpu_info: dict[str, Any],
        *,
        builtin: bool,
        public_key: str | None = None,
    ) -> Row:
        """Write a miner's registration and mark it seen now."""
        now = now_ms()
        with self.store.write() as db:
            row = db.one(
                "INSERT INTO miners (miner_id, capabilities, gpu_info, builtin, registered_ms,"
                " last_seen_ms, public_key) VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (miner_id) DO UPDATE SET capabilities = excluded.capabilities,"
                " gpu_info = excluded.gpu_info, builtin = excluded.builtin,"
                " last_seen_ms = excluded.last_seen_ms, public_key = excluded.public_key"
                " RETURNING *",
                (
                    miner_id,
                    json.dumps(capabilities),
                    json.dumps(gpu_info),
                    int(builtin),
                    now,
                    now,
                    public_key,
                ),
            )
        assert row is not None
        return row

    def register_builtin(self, miner_id: str, models: list[str], gpu_info: dict[str, Any]) -> None:
        """Record this process's own miner."""
        self.upsert(miner_id, models, gpu_info, builtin=True)
        self.builtin_id = miner_id
        self.builtin_models = list(models)

    def require_registered(self, principal: Principal, miner_id: str | None) -> Row:
        """The registered miner `miner_id`, which `principal` must act as; marks it seen."""
        self.require_acting_as(principal, miner_id)
        assert miner_id is not None
        if self._seen_lately(miner_id):
            row = self.store.read().one("SELECT * FROM miners WHERE miner_id = ?", (miner_id,))
        else:
            with self.store.write(durable=False) as db:
                row = self.mark_seen(db, miner_id)
        if row is None:
            raise self.not_registered(miner_id)
        return row

    @staticmethod
    def require_acting_as(principal: Principal, miner_id: str | None) -> None:
        """403 unless `principal` is a miner key bound to `miner_id` (nothing is read)."""
        principal.require("miner")
        if not miner_id:
            raise BadRequest("miner_id is required", error_code="INVALID_MINER_ID")
        if miner_id != principal.identity:
            raise Forbidden(
                f"this key acts as miner {principal.identity!r}, not {miner_id!r}",
                error_code="MINER_ID_MISMATCH",
            )

    def mark_seen(self, db: Connection, miner_id: str) -> Row | None:
        """Inside a write: set the miner's last_seen to now; its row, None if unregistered."""
        now = now_ms()
        row = db.one(
            "UPDATE miners SET last_seen_ms = ? WHERE miner_id = ? RETURNING *", (now, miner_id)
        )
        if row is not None:
            self._seen_ms[miner_id] = now
        return row

    def _seen_lately(self, miner_id: str) -> bool:
        """Whether last_seen was written so recently that writing it again tells nobody
        anything (a busy miner sends many requests a second; each write costs a transaction)."""
        seen = self._seen_ms.get(miner_id)
        interval = min(SEEN_WRITE_MS, self.rules.miner_timeout_seconds * 100)
        return seen is not None and now_ms() - seen < interval

    @staticmethod
    def not_registered(miner_id: str) -> NotFound:
        """The error for a miner id nobody registered."""
        return NotFound(
            f"miner {miner_id!r} is not registered; POST /api/v1/miners/register first",
            error_code="MINER_NOT_REGISTERED",
        )

    def online_cutoff_ms(self) -> int:
        return now_ms() - int(self.rules.miner_timeout_seconds * 1000)

    def served_models(self) -> list[str]:
        """Models that some online miner serves: this process's own and recently seen remotes."""
        rows = self.store.read().execute(
            "SELECT DISTINCT value AS model FROM miners, json_each(miners.capabilities)"
            " WHERE builtin = 0 AND last_seen_ms >= ?",
            (self.online_cutoff_ms(),),
        )
        models = set(self.builtin_models) | {r["model"] for r in rows}
        return sorted(models)

    def serves(self, model: str) -> bool:
        """Whether some online miner serves `model` (stops at the first that does)."""
        if model in self.builtin_models:
            return True
        row = self.store.read().one(
            "SELECT 1 AS found FROM miners, json_each(miners.capabilities)"
            " WHERE builtin = 0 AND last_seen_ms >= ? AND value = ? LIMIT 1",
            (self.online_cutoff_ms(), model),
        )
        return row is not None

    def serving(self) -> dict[str, list[str]]:
        """Each model some online miner serves, with the ids of the miners serving it (the
        built-in miner first)."""
        rows = self.store.read().execute(
            "SELECT DISTINCT value AS model, miner_id FROM miners, json_each(miners.capabilities)"
            " WHERE builtin = 0 AND last_seen_ms >= ? ORDER BY miner_id",
            (self.online_cutoff_ms(),),
        )
        builtin = self.builtin_id or "builtin"
        owners: dict[str, list[str]] = {m: [builtin] for m in self.builtin_models}
        for row in rows:
            owners.setdefault(row["model"], []).append(row["miner_id"])
        return owners

    def list(self) -> list[dict[str, Any]]:
        """Every miner, most recently seen first, with its state."""
        rows = self.store.read().execute(
            "SELECT miners.*, (SELECT count(*) FROM jobs WHERE jobs.miner_id = miners.miner_id"
            " AND jobs.status = 'running') AS running_jobs"
            " FROM miners ORDER BY last_seen_ms DESC"
        )
        return [self.view(r) for r in rows]

    def is_online(self, row: Row) -> bool:
        if row["builtin"]:
            return row["miner_id"] == self.builtin_id
        return row["last_seen_ms"] >= self.online_cutoff_ms()

    def view(self, row: Row) -> dict[str, Any]:
        """A miner as the API shows it."""
        online = self.is_online(row)
        running = row.get("running_jobs", 0)
        return {
            "miner_id": row["miner_id"],
            "capabilities": stored_json(row["capabilities"]),
            "gpu_info": stored_json(row["gpu_info"]),
            "builtin": bool(row["builtin"]),
            "online": online,
            "state": ("busy" if running else "idle") if online else "offline",
            "public_key": row["public_key"],
            "registered_at": rfc3339(row["registered_ms"]),
            "last_seen_at": rfc3339(row["last_seen_ms"]),
        }
