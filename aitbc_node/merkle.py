"""A domain-separated Merkle tree over SHA-256 leaf hashes (given as hex).

Leaf node = sha256(0x00 || leaf), inner node = sha256(0x01 || left || right). The prefixes keep a
leaf from ever being read as an inner node (second-preimage attacks). When a level has an odd
number of nodes the last one is promoted unchanged rather than paired with a copy of itself:
duplication would give [a, b, c] and [a, b, c, c] the same root (CVE-2012-2459).

A proof is the list of siblings from the leaf upwards, each `{"side": "left"|"right", "hash"}`
where `side` says on which side the SIBLING sits. Promoted levels contribute no step.
"""

from __future__ import annotations

import hashlib
import hmac
import re

__all__ = ["merkle_proof", "merkle_root", "verify_proof"]

_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


def _leaf_bytes(leaf: object) -> bytes:
    if not isinstance(leaf, str) or not _HEX64.fullmatch(leaf):
        raise ValueError(f"leaf must be a 64-char hex SHA-256 digest, got {leaf!r}")
    return bytes.fromhex(leaf)


def _hash_leaf(leaf: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + leaf).digest()


def _hash_inner(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _next_level(level: list[bytes]) -> list[bytes]:
    paired = [_hash_inner(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
    if len(level) % 2:
        paired.append(level[-1])  # promote the odd node; never duplicate it
    return paired


def merkle_root(leaves: list[str]) -> str:
    """Root hash (hex) of `leaves`; an empty list gives sha256(b"")."""
    if not leaves:
        return hashlib.sha256(b"").hexdigest()
    level = [_hash_leaf(_leaf_bytes(leaf)) for leaf in leaves]
    while len(level) > 1:
        level = _next_level(level)
    return level[0].hex()


def merkle_proof(leaves: list[str], index: int) -> list[dict[str, str]]:
    """Inclusion proof for `leaves[index]`: sibling hashes from the bottom up."""
    if not 0 <= index < len(leaves):
        raise IndexError(f"leaf index {index} out of range for {len(leaves)} leaves")
    level = [_hash_leaf(_leaf_bytes(leaf)) for leaf in leaves]
    proof: list[dict[str, str]] = []
    while len(level) > 1:
        if index % 2:
            proof.append({"side": "left", "hash": level[index - 1].hex()})
        elif index + 1 < len(level):
            proof.append({"side": "right", "hash": level[index + 1].hex()})
        # else: this node is promoted, so there is no sibling at this level
        level = _next_level(level)
        index //= 2
    return proof


def verify_proof(leaf: str, proof: list[dict[str, str]], root: str) -> bool:
    """True if `proof` links `leaf` to `root`; False (never an exception) for anything malformed."""
    try:
        node = _hash_leaf(_leaf_bytes(leaf))
        expected = _leaf_bytes(root)
        if not isinstance(proof, list):
            return False
        for step in proof:
            if not isinstance(step, dict) or set(step) != {"side", "hash"}:
                return False
            sibling = _leaf_bytes(step["hash"])
            if step["side"] == "left":
                node = _hash_inner(sibling, node)
            elif step["side"] == "right":
                node = _hash_inner(node, sibling)
            else:
                return False
        return hmac.compare_digest(node, expected)
    except Exception:
        return False
