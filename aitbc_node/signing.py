"""Ed25519 node keys, signature checks and account addresses.

This is the only module that imports PyNaCl, so the rest of the package (and any client that
verifies receipts) depends on one small, auditable surface.

- key id:  `ed25519:` + first 16 hex chars of sha256(public key bytes)
- address: `ait1` + lowercase RFC 4648 base32 (no padding) of the first 20 bytes of
  sha256(public key bytes), or of sha256(b"aitbc-identity:" + namespace + b":" + identity) for
  accounts with no key of their own. 20 bytes encode to exactly 32 base32 characters.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import re
import secrets
from functools import lru_cache
from pathlib import Path

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

__all__ = [
    "KeyFileError",
    "NodeKey",
    "address_for",
    "address_for_identity",
    "is_address",
    "key_id_for",
    "verify_signature",
]

_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_HEX128 = re.compile(r"[0-9a-fA-F]{128}")
_ADDRESS = re.compile(r"ait1[a-z2-7]{32}")


class KeyFileError(ValueError):
    """A key file exists but does not hold a 64-hex-char Ed25519 seed."""


def _public_key_bytes(public_key_hex: str) -> bytes:
    if not isinstance(public_key_hex, str) or not _HEX64.fullmatch(public_key_hex):
        raise ValueError("public key must be 64 hex characters")
    return bytes.fromhex(public_key_hex)


# The ids, addresses and signature checks below are pure functions of their text, asked of
# the same few keys and identities over and over (every receipt names its node key, client
# and miner; a co-signature is checked when its result arrives and again when the receipt is
# signed): each keeps its recent answers. Only str arguments reach a cache (anything else is
# refused first, never a TypeError from hashing it).
_CACHED = 4096
# Signature checks are kept only for messages this short (a co-signature signs a result's
# 64-character SHA-256): a cache of whole documents, which anyone may send to the public
# verify route, could hold a thousand bodies of a megabyte each.
_CACHED_MESSAGE_BYTES = 128


def key_id_for(public_key_hex: str) -> str:
    """Short stable id of a public key: `ed25519:` + 16 hex chars of its SHA-256."""
    _public_key_bytes(public_key_hex)  # refuses what is not 64 hex characters
    return _key_id(public_key_hex)


@lru_cache(maxsize=_CACHED)
def _key_id(public_key_hex: str) -> str:
    return "ed25519:" + hashlib.sha256(_public_key_bytes(public_key_hex)).hexdigest()[:16]


def _address(digest: bytes) -> str:
    return "ait1" + base64.b32encode(digest[:20]).decode("ascii").lower()


def address_for(public_key_hex: str) -> str:
    """Account address of an Ed25519 public key."""
    _public_key_bytes(public_key_hex)  # refuses what is not 64 hex characters
    return _key_address(public_key_hex)


@lru_cache(maxsize=_CACHED)
def _key_address(public_key_hex: str) -> str:
    return _address(hashlib.sha256(_public_key_bytes(public_key_hex)).digest())


def address_for_identity(namespace: str, identity: str) -> str:
    """Account address for an identity with no key of its own (e.g. an API-key identity).

    The prefix and namespace keep these addresses apart from key addresses and from each other.
    The namespace may not contain ":", so ("a:b", "c") cannot collide with ("a", "b:c").
    """
    if ":" in namespace:
        raise ValueError("identity namespace must not contain ':'")
    return _identity_address(namespace, identity)


@lru_cache(maxsize=_CACHED)
def _identity_address(namespace: str, identity: str) -> str:
    material = b"aitbc-identity:" + namespace.encode("utf-8") + b":" + identity.encode("utf-8")
    return _address(hashlib.sha256(material).digest())


def is_address(s: object) -> bool:
    """True if `s` is a well-formed `ait1...` address."""
    return isinstance(s, str) and _ADDRESS.fullmatch(s) is not None


def verify_signature(public_key_hex: str, message: bytes, signature_hex: str) -> bool:
    """True if `signature_hex` is a valid Ed25519 signature; False (never raises) otherwise."""
    if not (
        isinstance(public_key_hex, str)
        and _HEX64.fullmatch(public_key_hex)
        and isinstance(message, bytes)
        and isinstance(signature_hex, str)
        and _HEX128.fullmatch(signature_hex)
    ):
        return False
    if len(message) <= _CACHED_MESSAGE_BYTES:
        return _verified_short(public_key_hex, message, signature_hex)
    return _verified(public_key_hex, message, signature_hex)


def _verified(public_key_hex: str, message: bytes, signature_hex: str) -> bool:
    try:
        VerifyKey(_public_key_bytes(public_key_hex)).verify(message, bytes.fromhex(signature_hex))
        return True
    except BadSignatureError:
        return False
    except Exception:  # malformed key bytes etc.: a verifier must answer, not crash
        return False


_verified_short = lru_cache(maxsize=1024)(_verified)


class NodeKey:
    """An Ed25519 signing key held by this node."""

    def __init__(self, signing_key: SigningKey) -> None:
        self._key = signing_key
        # Every receipt names the key: computed once, not per signature.
        self._public_key_hex = bytes(signing_key.verify_key).hex()
        self._key_id = key_id_for(self._public_key_hex)

    @classmethod
    def generate(cls) -> NodeKey:
        """A fresh random key."""
        return cls(SigningKey.generate())

    @classmethod
    def from_seed_hex(cls, seed_hex: str) -> NodeKey:
        """The key for a 32-byte seed given as 64 hex characters."""
        if not isinstance(seed_hex, str) or not _HEX64.fullmatch(seed_hex):
            raise KeyFileError("an Ed25519 seed must be exactly 64 hex characters")
        return cls(SigningKey(bytes.fromhex(seed_hex)))

    @classmethod
    def load_or_create(cls, path: Path) -> NodeKey:
        """Load the seed at `path`, or create it (mode 0600, written atomically) if absent.

        Raises KeyFileError if the file exists but is not a 64-hex-char seed: silently making
        a new key would orphan every receipt signed with the old one.
        """
        path = Path(path)
        if path.exists():
            try:
                text = path.read_text(encoding="ascii").strip()
            except (UnicodeDecodeError, OSError) as exc:
                raise KeyFileError(f"cannot read node key file {path}: {exc}") from exc
            if not _HEX64.fullmatch(text):
                raise KeyFileError(
                    f"node key file {path} does not hold a 64-hex-char Ed25519 seed; "
                    "refusing to replace it (move it aside to create a new key)"
                )
            return cls.from_seed_hex(text)

        key = cls.generate()
        path.parent.mkdir(parents=True, exist_ok=True)
        # The temp file is created 0600 by os.open itself, so the seed is never readable by
        # others, not even briefly; os.replace makes the key appear whole or not at all.
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="ascii") as f:
                f.write(key.seed_hex + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return key

    @property
    def seed_hex(self) -> str:
        """The private 32-byte seed as hex. Keep it secret."""
        return bytes(self._key).hex()

    @property
    def public_key_hex(self) -> str:
        """The 32-byte public key as 64 lowercase hex characters."""
        return self._public_key_hex

    @property
    def key_id(self) -> str:
        """`ed25519:` + 16 hex chars of sha256(public key)."""
        return self._key_id

    @property
    def address(self) -> str:
        """The account address of this key."""
        return address_for(self.public_key_hex)

    def sign(self, message: bytes) -> str:
        """Ed25519 signature of `message` as 128 lowercase hex characters."""
        return self._key.sign(message).signature.hex()

    def __repr__(self) -> str:  # never show the seed
        return f"NodeKey({self.key_id})"
