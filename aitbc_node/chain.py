"""Blocks and inclusion proofs: build, sign and check them without a server or a database.

A block header is canonical JSON:

    {"height": int, "prev_hash": hex64, "timestamp": RFC 3339, "merkle_root": hex64,
     "receipt_count": int, "tx_count": int, "node_key_id": "ed25519:...",
     "node_public_key": hex64}

Its hash is the SHA-256 of those canonical bytes, and the node signs the same bytes. The Merkle
leaves of a block are the canonical hashes of its receipts (in order), then of its
transactions (in order). Block 0, the genesis block, holds nothing; its prev_hash is 64 zeros.
"""

from __future__ import annotations

from typing import Any

from aitbc_node.canonical import CanonicalError, canonical_bytes, canonical_hash
from aitbc_node.merkle import verify_proof
from aitbc_node.receipts import verify_receipt
from aitbc_node.signing import NodeKey, key_id_for, verify_signature

GENESIS_PREV_HASH = "0" * 64
HEADER_FIELDS = (
    "height",
    "prev_hash",
    "timestamp",
    "merkle_root",
    "receipt_count",
    "tx_count",
    "node_key_id",
    "node_public_key",
)


def block_hash(header: dict[str, Any]) -> str:
    """The hash that names a block and that the next block links to."""
    return canonical_hash(header)


def sign_block(header: dict[str, Any], key: NodeKey) -> dict[str, Any]:
    """A sealed block: the header, its hash and the node's signature over it."""
    return {
        "header": header,
        "hash": block_hash(header),
        "signature": key.sign(canonical_bytes(header)),
    }


def block_problems(block: dict[str, Any], trusted_public_key_hex: str) -> list[str]:
    """What is wrong with a sealed block on its own (hash, signature, key); [] when sound."""
    try:
        header = block["header"]
        if not isinstance(header, dict) or set(header) != set(HEADER_FIELDS):
            return ["the block header does not have the expected fields"]
        problems = []
        if block_hash(header) != block.get("hash"):
            problems.append("the block hash does not match its header")
        if header["node_key_id"] != key_id_for(trusted_public_key_hex):
            problems.append("the block names a different node key than the trusted one")
        if not verify_signature(
            trusted_public_key_hex, canonical_bytes(header), str(block.get("signature"))
        ):
            problems.append("the block signature does not verify with the trusted key")
        return problems
    except (KeyError, TypeError, ValueError, CanonicalError) as e:
        return [f"the block is malformed: {e}"]


def verify_inclusion(
    receipt: dict[str, Any], proof: dict[str, Any], trusted_public_key_hex: str
) -> list[str]:
    """Check that `receipt` is signed by the trusted key and is in the block `proof` names.

    `proof` is what `GET /api/v1/receipts/{id}/proof` returns. Returns the reasons it fails;
    an empty list means the receipt, its Merkle path and the block all verify.
    """
    reasons = list(verify_receipt(receipt, trusted_public_key_hex).reasons)
    try:
        leaf = canonical_hash(receipt)
        block = proof["block"]
        if leaf != proof.get("leaf"):
            reasons.append("the proof is for a different receipt (leaf hash differs)")
        if not verify_proof(leaf, proof["path"], block["header"]["merkle_root"]):
            reasons.append("the Merkle path does not lead to the block's root")
        reasons += block_problems(block, trusted_public_key_hex)
    except (KeyError, TypeError, ValueError, CanonicalError) as e:
        reasons.append(f"the proof is malformed: {e}")
    return reasons
