"""The ledger: receipts, transactions, balances and sealed blocks, written to the job store.

- A **grant** credits a client's address when its key is made.
- On every completed job, in the same transaction as the completion, the node signs a
  **receipt** and records the **payment** from the client's address to the miner's.
- A **block** seals, every few seconds, the receipts and transactions not yet in one: their
  Merkle root, the previous block's hash, and the node's signature (see `chain.py`). A crash
  between a receipt and its block loses nothing: the next seal picks the receipt up.

Amounts are integers of the smallest unit, the nano-AIT (1 AIT = 10^9 nAIT); prices are nAIT
per token. Addresses are `ait1...` strings (see `signing.py`).
"""

from __future__ import annotations

import json
import logging
import secrets
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from aitbc_node.background import Loop
from aitbc_node.canonical import canonical_bytes, sha256_hex, stored_json
from aitbc_node.chain import GENESIS_PREV_HASH, sign_block
from aitbc_node.clock import now_ms, rfc3339
from aitbc_node.merkle import merkle_root
from aitbc_node.metrics import Metrics
from aitbc_node.receipts import hash_request, hash_result, sign_receipt
from aitbc_node.signing import NodeKey, address_for, address_for_identity
from aitbc_node.store import Connection, Row, Store

log = logging.getLogger("aitbc_node.ledger")

NANO_PER_AIT = 10**9
DEFAULT_GRANT = 1000 * NANO_PER_AIT  # a demo never runs dry
DEFAULT_PRICE_PER_1K = "0.01"  # AIT per 1,000 tokens


class PriceError(ValueError):
    """A price or amount that cannot be written in nAIT."""


def parse_ait(text: str, *, per: int = 1) -> int:
    """An AIT amount (a decimal string) divided by `per`, as whole nAIT."""
    try:
        value = Decimal(text) * NANO_PER_AIT / per
    except InvalidOperation:
        raise PriceError(f"{text!r} is not a decimal number") from None
    if value < 0 or value != value.to_integral_value():
        raise PriceError(f"{text!r} is negative or finer than the smallest unit")
    return int(value)


def format_ait(nano: int) -> str:
    """nAIT as an AIT decimal string without trailing zeros: 1540 -> "0.00000154"."""
    sign = "-" if nano < 0 else ""
    whole, frac = divmod(abs(nano), NANO_PER_AIT)
    text = f"{whole}.{frac:09d}".rstrip("0").rstrip(".")
    return sign + text


def client_address(identity: str) -> str:
    """The account of a client identity (the name its API keys act as)."""
    return address_for_identity("client", identity)


def miner_address(miner_id: str) -> str:
    """The account of a miner with no key of its own (the built-in one)."""
    return address_for_identity("miner", miner_id)


def payee_address(receipt: dict[str, Any]) -> str:
    """Who a receipt pays: a co-signing miner's key address, else its identity's address."""
    if "miner_signature" in receipt:
        return address_for(receipt["miner_signature"]["public_key"])
    return miner_address(receipt["miner_id"])


@dataclass
class Pricing:
    """What a token costs, per served model, in nAIT."""

    default_per_token: int = parse_ait(DEFAULT_PRICE_PER_1K, per=1000)
    per_model: dict[str, int] = field(default_factory=dict)
    grant: int = DEFAULT_GRANT

    def unit_price(self, model: str) -> int:
        return self.per_model.get(model, self.default_per_token)


def _credit(db: Connection, address: str, kind: str, identity: str, delta: int) -> None:
    # One statement: a new account opens with `delta`, a known one moves by it.
    db.execute(
        "INSERT INTO accounts (address, kind, identity, balance) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (address) DO UPDATE SET balance = balance + excluded.balance",
        (address, kind, identity, delta),
    )


def _record_transaction(db: Connection, document: dict[str, Any]) -> None:
    db.execute(
        "INSERT INTO transactions"
        " (tx_id, kind, from_address, to_address, amount, job_id, document)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            document["tx_id"],
            document["kind"],
            document["from"],
            document["to"],
            document["amount"],
            document["job_id"],
            canonical_bytes(document).decode(),
        ),
    )


def new_receipt_id() -> str:
    """A fresh receipt id: `rcpt-` and 16 hex characters."""
    return f"rcpt-{secrets.token_hex(8)}"


def record_grant(db: Connection, identity: str, amount: int) -> dict[str, Any]:
    """Credit a client identity's address with `amount` nAIT (inside the caller's write)."""
    address = client_address(identity)
    document = {
        "tx_id": f"tx-{secrets.token_hex(8)}",
        "kind": "grant",
        "from": None,
        "to": address,
        "amount": amount,
        "job_id": None,
        "receipt_id": None,
        "created_at": rfc3339(now_ms()),
    }
    _record_transaction(db, document)
    _credit(db, address, "client", identity, amount)
    return document


def balance(db: Connection, address: str) -> int:
    """An address's balance in nAIT (0 for an address never seen)."""
    row = db.one("SELECT balance FROM accounts WHERE address = ?", (address,))
    return row["balance"] if row else 0


class Ledger:
    """Receipts, payments and blocks for one node key."""

    def __init__(self, store: Store, key: NodeKey, pricing: Pricing) -> None:
        self.store = store
        self.key = key
        self.pricing = pricing

    def ensure_genesis(self) -> None:
        """Write block 0, naming the node key, if the chain is empty."""
        with self.store.write() as db:
            if db.one("SELECT 1 FROM blocks WHERE height = 0"):
                return
            self._insert_block(db, 0, GENESIS_PREV_HASH, [], 0, 0)

    def issue_receipt(
        self,
        db: Connection,
        job: Row,
        *,
        receipt_id: str,
        model_sha256: str,
        miner_signature: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Sign the receipt `receipt_id` of a just-completed job (whose row names it already)
        and record its payment (caller's write)."""
        params = stored_json(job["params"])
        messages = stored_json(job["messages"]) if job.get("messages") else None
        units = (job["prompt_tokens"] or 0) + (job["completion_tokens"] or 0)
        unit_price = self.pricing.unit_price(job["served_model"])
        body: dict[str, Any] = {
            "receipt_id": receipt_id,
            "job_id": job["job_id"],
            "client_address": client_address(job["client"]),
            "miner_id": job["miner_id"],
            "model": {"name": job["served_model"], "sha256": model_sha256},
            "request_sha256": hash_request(job["prompt"], params, messages),
            "result_sha256": hash_result(job["result"]),
            "prompt_tokens": job["prompt_tokens"] or 0,
            "completion_tokens": job["completion_tokens"] or 0,
            "units": units,
            "unit_price": unit_price,
            "amount": units * unit_price,
            "started_at": rfc3339(job["started_ms"]),
            "completed_at": rfc3339(job["completed_ms"]),
            "node_key_id": self.key.key_id,
        }
        if miner_signature is not None:
            body["miner_signature"] = miner_signature
        receipt = sign_receipt(body, self.key)
        db.execute(
            "INSERT INTO receipts (receipt_id, job_id, client_address, document)"
            " VALUES (?, ?, ?, ?)",
            (
                receipt["receipt_id"],
                receipt["job_id"],
                receipt["client_address"],
                canonical_bytes(receipt).decode(),
            ),
        )
        payer, payee = receipt["client_address"], payee_address(receipt)
        _record_transaction(
            db,
            {
                "tx_id": f"tx-{secrets.token_hex(8)}",
                "kind": "payment",
                "from": payer,
                "to": payee,
                "amount": receipt["amount"],
                "job_id": job["job_id"],
                "receipt_id": receipt["receipt_id"],
                "created_at": receipt["completed_at"],
            },
        )
        _credit(db, payer, "client", job["client"], -receipt["amount"])
        _credit(db, payee, "miner", job["miner_id"], receipt["amount"])
        return receipt

    def seal(self, max_items: int) -> dict[str, Any] | None:
        """Seal up to `max_items` unsealed receipts and transactions into the next block."""
        with self.store.write() as db:
            receipts = db.execute(
                "SELECT seq, document FROM receipts WHERE block_height IS NULL"
                " ORDER BY seq LIMIT ?",
                (max_items,),
            )
            txs = db.execute(
                "SELECT seq, document FROM transactions WHERE block_height IS NULL"
                " ORDER BY seq LIMIT ?",
                (max_items - len(receipts),),
            )
            if not receipts and not txs:
                return None
            last = db.one("SELECT height, block_hash FROM blocks ORDER BY height DESC LIMIT 1")
            if last is None:
                raise RuntimeError("the chain has no genesis block")
            height = last["height"] + 1
            leaves = [sha256_hex(r["document"].encode()) for r in (*receipts, *txs)]
            block = self._insert_block(
                db, height, last["block_hash"], leaves, len(receipts), len(txs)
            )
            for table, rows in (("receipts", receipts), ("transactions", txs)):
                db.execute(
                    f"UPDATE {table} SET block_height = ? WHERE seq IN"
                    " (SELECT value FROM json_each(?))",
                    (height, json.dumps([r["seq"] for r in rows])),
                )
        return block

    def _insert_block(
        self,
        db: Connection,
        height: int,
        prev_hash: str,
        leaves: list[str],
        receipt_count: int,
        tx_count: int,
    ) -> dict[str, Any]:
        header = {
            "height": height,
            "prev_hash": prev_hash,
            "timestamp": rfc3339(now_ms()),
            "merkle_root": merkle_root(leaves),
            "receipt_count": receipt_count,
            "tx_count": tx_count,
            "node_key_id": self.key.key_id,
            "node_public_key": self.key.public_key_hex,
        }
        block = sign_block(header, self.key)
        db.execute(
            "INSERT INTO blocks (height, header, block_hash, signature) VALUES (?, ?, ?, ?)",
            (height, canonical_bytes(header).decode(), block["hash"], block["signature"]),
        )
        return block


class BlockSealer(Loop):
    """A thread that seals a block every `interval` seconds when there is anything new."""

    def __init__(
        self, ledger: Ledger, interval: float, max_items: int, metrics: Metrics | None = None
    ) -> None:
        super().__init__("block-sealer", self._seal_and_wait)
        self.ledger = ledger
        self.interval = interval
        self.max_items = max_items
        self.metrics = metrics if metrics is not None else Metrics()

    def stop(self) -> None:
        """Stop, sealing what is left first so a clean shutdown leaves nothing unsealed."""
        super().stop()
        self.seal_all()

    def seal_all(self) -> int:
        """Seal blocks until nothing is left unsealed; returns how many were sealed."""
        sealed = 0
        while self.ledger.seal(self.max_items) is not None:
            sealed += 1
            self.metrics.blocks_sealed()
        return sealed

    def _seal_and_wait(self) -> float:
        self.seal_all()
        return self.interval
