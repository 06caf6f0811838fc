"""Read-only views of the ledger for the receipt and explorer endpoints (all public)."""

from __future__ import annotations

import json
from typing import Any

from aitbc_node.canonical import sha256_hex
from aitbc_node.config import Limits
from aitbc_node.counters import job_counts, ledger_totals, read_counters
from aitbc_node.errors import BadRequest, Conflict, NotFound
from aitbc_node.ledger import format_ait
from aitbc_node.merkle import merkle_proof
from aitbc_node.paging import before_cursor, page
from aitbc_node.signing import is_address
from aitbc_node.store import Row, Store


def block_view(row: Row) -> dict[str, Any]:
    """A sealed block as the API shows it: its header fields, hash and signature."""
    header = json.loads(row["header"])
    return {**header, "hash": row["block_hash"], "signature": row["signature"]}


def transaction_view(row: Row) -> dict[str, Any]:
    """A transaction: its document, its amount in AIT, and the block that holds it."""
    document = json.loads(row["document"])
    return {
        **document,
        "amount_ait": format_ait(document["amount"]),
        "block_height": row["block_height"],
    }


def receipt_entry(row: Row) -> dict[str, Any]:
    """A receipt in a list: the signed receipt, untouched, beside the block that holds it."""
    return {"receipt": json.loads(row["document"]), "block_height": row["block_height"]}


class Explorer:
    """Queries over blocks, transactions, receipts and accounts."""

    def __init__(self, store: Store, limits: Limits, seal_interval: float) -> None:
        self.store = store
        self.limits = limits
        self.seal_interval = seal_interval

    def _list(
        self, sql: str, args: tuple[Any, ...], limit: int, cursor: str | None, key: str
    ) -> tuple[list[Row], str | None]:
        rows = self.store.read().execute(sql, (*args, before_cursor(cursor), limit + 1))
        return page(rows, limit, key)

    def blocks(self, limit: int, cursor: str | None) -> dict[str, Any]:
        rows, next_cursor = self._list(
            "SELECT * FROM blocks WHERE height < ? ORDER BY height DESC LIMIT ?",
            (),
            limit,
            cursor,
            "height",
        )
        return {"blocks": [block_view(r) for r in rows], "next_cursor": next_cursor}

    def block(self, height: int) -> dict[str, Any]:
        db = self.store.read()
        row = db.one("SELECT * FROM blocks WHERE height = ?", (height,))
        if row is None:
            raise NotFound(f"there is no block {height}", error_code="BLOCK_NOT_FOUND")
        receipts = db.execute(
            "SELECT receipt_id FROM receipts WHERE block_height = ? ORDER BY seq", (height,)
        )
        txs = db.execute(
            "SELECT * FROM transactions WHERE block_height = ? ORDER BY seq", (height,)
        )
        return {
            **block_view(row),
            "receipt_ids": [r["receipt_id"] for r in receipts],
            "transactions": [transaction_view(t) for t in txs],
        }

    def transactions(self, limit: int, cursor: str | None) -> dict[str, Any]:
        rows, next_cursor = self._list(
            "SELECT * FROM transactions WHERE seq < ? ORDER BY seq DESC LIMIT ?",
            (),
            limit,
            cursor,
            "seq",
        )
        return {"transactions": [transaction_view(r) for r in rows], "next_cursor": next_cursor}

    def receipts(self, limit: int, cursor: str | None, client: str | None = None) -> dict[str, Any]:
        if client is not None and not is_address(client):
            raise BadRequest("client must be an ait1... address", error_code="INVALID_ADDRESS")
        where, args = ("client_address = ? AND ", (client,)) if client else ("", ())
        rows, next_cursor = self._list(
            f"SELECT * FROM receipts WHERE {where}seq < ? ORDER BY seq DESC LIMIT ?",
            args,
            limit,
            cursor,
            "seq",
        )
        return {"receipts": [receipt_entry(r) for r in rows], "next_cursor": next_cursor}

    def receipt(self, receipt_id: str) -> dict[str, Any]:
        """The signed receipt, exactly as signed."""
        return json.loads(self._receipt_row(receipt_id)["document"])

    def _receipt_row(self, receipt_id: str) -> Row:
        row = self.store.read().one("SELECT * FROM receipts WHERE receipt_id = ?", (receipt_id,))
        if row is None:
            raise NotFound(f"receipt {receipt_id} not found", error_code="RECEIPT_NOT_FOUND")
        return row

    def proof(self, receipt_id: str) -> dict[str, Any]:
        """The block holding a receipt and the Merkle path from the receipt to its root."""
        row = self._receipt_row(receipt_id)
        height = row["block_height"]
        if height is None:
            raise Conflict(
                f"receipt {receipt_id} is not sealed in a block yet; try again in a moment",
                error_code="RECEIPT_NOT_SEALED",
                headers={"Retry-After": str(max(1, round(self.seal_interval)))},
            )
        db = self.store.read()
        block = db.one("SELECT * FROM blocks WHERE height = ?", (height,))
        receipts = db.execute(
            "SELECT receipt_id, document FROM receipts WHERE block_height = ? ORDER BY seq",
            (height,),
        )
        txs = db.execute(
            "SELECT document FROM transactions WHERE block_height = ? ORDER BY seq", (height,)
        )
        leaves = [sha256_hex(r["document"].encode()) for r in (*receipts, *txs)]
        index = next(i for i, r in enumerate(receipts) if r["receipt_id"] == receipt_id)
        assert block is not None
        return {
            "receipt_id": receipt_id,
            "block_height": height,
            "leaf": leaves[index],
            "index": index,
            "path": merkle_proof(leaves, index),
            "block": {
                "header": json.loads(block["header"]),
                "hash": block["block_hash"],
                "signature": block["signature"],
            },
        }

    def address(self, address: str, limit: int, cursor: str | None = None) -> dict[str, Any]:
        """An account's balance and one page of its transactions, newest first."""
        if not is_address(address):
            raise BadRequest(f"{address!r} is not an ait1... address", error_code="INVALID_ADDRESS")
        account = self.store.read().one("SELECT * FROM accounts WHERE address = ?", (address,))
        txs, next_cursor = self._list(
            "SELECT * FROM transactions WHERE (from_address = ? OR to_address = ?)"
            " AND seq < ? ORDER BY seq DESC LIMIT ?",
            (address, address),
            limit,
            cursor,
            "seq",
        )
        held = account["balance"] if account else 0
        return {
            "address": address,
            "kind": account["kind"] if account else None,
            "identity": account["identity"] if account else None,
            "balance": held,
            "balance_ait": format_ait(held),
            "transactions": [transaction_view(t) for t in txs],
            "next_cursor": next_cursor,
        }

    def stats(self, miners: list[dict[str, Any]]) -> dict[str, Any]:
        """The chain's height and totals, the jobs by status and `miners` (as
        `Miners.list` gives them) counted: one row of counters kept by triggers (`counters`)
        and an index lookup, whatever the size of the history."""
        db = self.store.read()
        height = db.one("SELECT max(height) AS h FROM blocks")
        totals = read_counters(db)
        ledger = ledger_totals(totals)
        assert height is not None
        return {
            "height": height["h"],
            "receipts": ledger["receipts"],
            "unsealed_receipts": ledger["unsealed_receipts"],
            "transactions": ledger["transactions"],
            "accounts": ledger["accounts"],
            "total_value_moved": ledger["value_moved"],
            "total_value_moved_ait": format_ait(ledger["value_moved"]),
            "jobs": job_counts(totals),
            "miners_online": sum(1 for m in miners if m["online"]),
            "miners_total": len(miners),
            "tokens_generated": totals["completion_tokens"],
        }
