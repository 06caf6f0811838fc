"""Write SHA256SUMS for the executables in a directory and sign it with the release key.

    .venv/bin/python build/sign_release.py [DIR]        # DIR: dist (build/executable.sh runs it)

The release key is an Ed25519 key, the scheme of the node's own receipts, kept outside the
repository: the seed file `$AITBC_RELEASE_KEY`, else `~/.config/aitbc-node/release.key`
(made on first use, mode 0600; guard and back it up like any signing key). Beside the
executables it writes:

- `SHA256SUMS`: `sha256sum`'s format, one line per `aitbc-node*` executable;
- `SHA256SUMS.sig`: the raw 64-byte Ed25519 signature of that file;
- `aitbc-node-release.pem`: the release public key (publish it once, out of band, and pin it).

A user checks a download with standard tools only (README, "Verifying a download"):

    sha256sum --check --ignore-missing SHA256SUMS
    openssl pkeyutl -verify -pubin -inkey aitbc-node-release.pem -rawin \\
        -in SHA256SUMS -sigfile SHA256SUMS.sig
"""

from __future__ import annotations

import base64
import hashlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aitbc_node.signing import NodeKey  # after the path above: run as a script

# DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410): the 32 key bytes follow it.
ED25519_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")
PUBLIC_KEY_FILE = "aitbc-node-release.pem"


def release_key_path() -> Path:
    """Where the release key's seed lives."""
    configured = os.environ.get("AITBC_RELEASE_KEY")
    if configured:
        return Path(configured).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "aitbc-node" / "release.key"


def public_key_pem(key: NodeKey) -> str:
    """The key's public half as a PEM SubjectPublicKeyInfo, as openssl reads it."""
    der = ED25519_SPKI_PREFIX + bytes.fromhex(key.public_key_hex)
    return (
        f"-----BEGIN PUBLIC KEY-----\n{base64.b64encode(der).decode()}\n-----END PUBLIC KEY-----\n"
    )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sign_release(directory: Path, key: NodeKey) -> list[Path]:
    """Write SHA256SUMS, its signature and the public key into `directory`; return the
    executables it lists."""
    executables = sorted(
        p
        for p in directory.iterdir()
        if p.name.startswith("aitbc-node") and p.is_file() and os.access(p, os.X_OK)
    )
    if not executables:
        raise SystemExit(f"sign_release.py: no aitbc-node executable in {directory}")
    sums = "".join(f"{sha256_file(p)}  {p.name}\n" for p in executables).encode()
    (directory / "SHA256SUMS").write_bytes(sums)
    (directory / "SHA256SUMS.sig").write_bytes(bytes.fromhex(key.sign(sums)))
    (directory / PUBLIC_KEY_FILE).write_text(public_key_pem(key))
    return executables


def main(argv: list[str]) -> int:
    directory = Path(argv[0] if argv else "dist")
    key_path = release_key_path()
    new = not key_path.exists()
    key = NodeKey.load_or_create(key_path)
    if new:
        print(f"sign_release.py: made a new release key at {key_path}", file=sys.stderr)
    listed = sign_release(directory, key)
    print(
        f"signed SHA256SUMS ({', '.join(p.name for p in listed)}) with release key"
        f" {key.key_id}; public key: {directory / PUBLIC_KEY_FILE}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
