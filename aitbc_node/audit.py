"""Re-check a node's whole ledger from its SQLite file: `aitbc-node verify --data-dir DIR`.

Every block's hash, signature and link to the one before; every block's Merkle root against the
receipts and transactions that claim to be in it; every receipt's signature; every column
against the signed or hashed document it indexes; every payment against its receipt; every
balance against the transactions; and that no identity has live keys of two roles (whose
receipts and payments could not be told apart). The first break is named, with its block
where it has one.

From a height on (`--since HEIGHT`), the same for blocks HEIGHT to the tip, their receipts and
transactions and the unsealed ones, reading only those rows (by the block_height indexes):
block HEIGHT-1, checked before, is trusted as stored, and block HEIGHT must link to it. The
balances are not re-summed then, since a balance adds up the whole history.
"""

from __future__ import annotations

import json
from collections import defaultdict
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

from aitbc_node.canonical import CanonicalError, canonical_bytes, sha256_hex
from aitbc_node.chain import GENESIS_PREV_HASH, block_problems
from aitbc_node.keys import identity_role_conflicts
from aitbc_node.ledger import payee_address
from aitbc_node.merkle import merkle_root
from aitbc_node.receipts import verify_receipt
from aitbc_node.store import Connection

RECEIPT_COLUMNS = ("receipt_id", "job_id", "client_address")
TX_COLUMNS = {
    "tx_id": "tx_id",
    "kind": "kind",
    "from_address": "from",
    "to_address": "to",
    "amount": "amount",
    "job_id": "job_id",
}


@dataclass
class AuditReport:
    """What the audit found: the breaks (first one first) and what it counted."""

    problems: list[str] = field(default_factory=list)
    blocks: int = 0
    receipts: int = 0
    transactions: int = 0
    unsealed: int = 0
    first_height: int = 0  # the first block checked (0: from genesis)
    tip_height: int | None = None  # the last block checked: the chain's tip
    balances_checked: bool = True

    @property
    def ok(self) -> bool:
        return not self.problems


def _document(row: dict[str, Any], what: str) -> tuple[dict[str, Any] | None, str | None]:
    """The parsed document of a row, or why it is not a canonical JSON document."""
    try:
        document = json.loads(row["document"])
        if canonical_bytes(document).decode() != row["document"]:
            return None, f"{what} is not stored as canonical JSON"
        return document, None
    except (ValueError, CanonicalError) as e:
        return None, f"{what} is not valid JSON: {e}"


def _where(height: int | None) -> str:
    return "unsealed" if height is None else f"block {height}"


def chain_tip(db: Connection) -> int | None:
    """The height of the newest block (None for a store with no block)."""
    row = db.one("SELECT max(height) AS h FROM blocks")
    return row["h"] if row else None


def _items_since(db: Connection, table: str, since: int) -> list[dict[str, Any]]:
    """The rows of `table` sealed in blocks from `since` on, and the unsealed ones, in `seq`
    order (the order of a block's leaves): range scans on the block_height index."""
    rows = db.execute(f"SELECT * FROM {table} WHERE block_height >= ?", (since,))
    rows += db.execute(f"SELECT * FROM {table} WHERE block_height IS NULL")
    return sorted(rows, key=lambda r: r["seq"])


def _receipts_paid_before(db: Connection, receipt_ids: list[str]) -> dict[str, dict[str, Any]]:
    """The signed receipts with these ids (sealed below the checked range, so trusted as
    stored), for the payments in the range that pay for them."""
    rows = db.execute(
        "SELECT document FROM receipts WHERE receipt_id IN (SELECT value FROM json_each(?))",
        (json.dumps(receipt_ids),),
    )
    found = {}
    for row in rows:
        with suppress(ValueError):  # one that does not parse is a payment without its receipt
            document = json.loads(row["document"])
            if isinstance(document, dict) and isinstance(document.get("receipt_id"), str):
                found[document["receipt_id"]] = document
    return found


def audit(db: Connection, trusted_public_key_hex: str, since: int | None = None) -> AuditReport:
    """Check the ledger in `db` against the trusted node key: the whole of it, or (`since`)
    blocks `since` to the tip with their items and the unsealed ones, block `since` - 1
    trusted as stored. ValueError for a `since` past the tip."""
    report = AuditReport(first_height=since or 0, tip_height=chain_tip(db))
    if since is not None and (report.tip_height is None or since > report.tip_height):
        raise ValueError(f"--since {since} is past the chain's tip (block {report.tip_height})")
    problems = report.problems
    if since is None:
        blocks = db.execute("SELECT * FROM blocks ORDER BY height")
        receipts = db.execute("SELECT * FROM receipts ORDER BY seq")
        txs = db.execute("SELECT * FROM transactions ORDER BY seq")
    else:
        blocks = db.execute("SELECT * FROM blocks WHERE height >= ? ORDER BY height", (since,))
        receipts = _items_since(db, "receipts", since)
        txs = _items_since(db, "transactions", since)
    report.blocks, report.receipts, report.transactions = len(blocks), len(receipts), len(txs)
    heights = {b["height"] for b in blocks}

    # -- the items: documents, signatures, columns ---------------------------------------
    leaves: dict[int, list[str]] = defaultdict(list)
    tx_leaves: dict[int, list[str]] = defaultdict(list)
    receipts_by_id: dict[str, dict[str, Any]] = {}
    for row in receipts:
        where = _where(row["block_height"])
        name = f"{where}: receipt {row['receipt_id']}"
        document, problem = _document(row, name)
        if document is None:
            problems.append(str(problem))
            continue
        verdict = verify_receipt(document, trusted_public_key_hex)
        if not verdict.valid:
            problems.append(f"{name} does not verify: {'; '.join(verdict.reasons)}")
        for column in RECEIPT_COLUMNS:
            if row[column] != document.get(column):
                problems.append(f"{name}: column {column} differs from the signed receipt")
        receipts_by_id[document.get("receipt_id", "")] = document
        if row["block_height"] is None:
            report.unsealed += 1
        else:
            leaves[row["block_height"]].append(sha256_hex(row["document"].encode()))

    documents = []
    for row in txs:
        name = f"{_where(row['block_height'])}: transaction {row['tx_id']}"
        document, problem = _document(row, name)
        if document is None:
            problems.append(str(problem))
        else:
            documents.append((row, name, document))
    if since is not None:  # a payment in the range may pay for a receipt sealed before it
        paid = {d.get("receipt_id") for _, _, d in documents if d.get("kind") == "payment"}
        outside = [i for i in paid if isinstance(i, str) and i not in receipts_by_id]
        receipts_by_id.update(_receipts_paid_before(db, outside))

    balances: dict[str, int] = defaultdict(int)
    for row, name, document in documents:
        for column, key in TX_COLUMNS.items():
            if row[column] != document.get(key):
                problems.append(f"{name}: column {column} differs from its document")
        if document.get("kind") == "payment":
            receipt = receipts_by_id.get(document.get("receipt_id"))
            if receipt is None:
                problems.append(f"{name}: pays for a receipt that does not exist")
            elif (
                document.get("amount") != receipt["amount"]
                or document.get("from") != receipt["client_address"]
                or document.get("to") != payee_address(receipt)
                or document.get("job_id") != receipt["job_id"]
            ):
                problems.append(f"{name}: does not match receipt {receipt['receipt_id']}")
        amount = document.get("amount", 0)
        balances[document.get("to")] += amount
        if document.get("from") is not None:
            balances[document["from"]] -= amount
        if row["block_height"] is None:
            report.unsealed += 1
        else:
            tx_leaves[row["block_height"]].append(sha256_hex(row["document"].encode()))

    for height in sorted(set(leaves) | set(tx_leaves)):
        if height not in heights:
            count = len(leaves[height]) + len(tx_leaves[height])
            problems.append(f"block {height} is missing: {count} receipts and transactions name it")

    # -- the chain: links, hashes, signatures, roots ----------------------------------------
    previous_hash = GENESIS_PREV_HASH
    if since:  # the block before the range, trusted as stored
        before = db.one("SELECT block_hash FROM blocks WHERE height = ?", (since - 1,))
        if before is None:
            problems.append(f"block {since - 1} is missing: block {since} has none to link to")
        else:
            previous_hash = before["block_hash"]
    for expected, row in enumerate(blocks, start=since or 0):
        height = row["height"]
        if height != expected:
            problems.append(f"block {expected} is missing: the chain jumps to block {height}")
            break
        try:
            header = json.loads(row["header"])
        except ValueError:
            problems.append(f"block {height}: the header is not valid JSON")
            break
        block = {"header": header, "hash": row["block_hash"], "signature": row["signature"]}
        problems += [f"block {height}: {p}" for p in block_problems(block, trusted_public_key_hex)]
        if header.get("height") != height:
            problems.append(f"block {height}: its header says height {header.get('height')}")
        if header.get("prev_hash") != previous_hash:
            problems.append(f"block {height}: does not link to block {height - 1}")
        items = leaves.get(height, []) + tx_leaves.get(height, [])
        if header.get("merkle_root") != merkle_root(items):
            problems.append(
                f"block {height}: the Merkle root does not match its receipts and transactions"
            )
        if (header.get("receipt_count"), header.get("tx_count")) != (
            len(leaves.get(height, [])),
            len(tx_leaves.get(height, [])),
        ):
            problems.append(f"block {height}: its receipt or transaction count is wrong")
        previous_hash = row["block_hash"]

    # -- balances: each adds up the whole history, so not from a height on ------------------
    report.balances_checked = since is None
    if report.balances_checked:
        problems += _balance_problems(db, balances)

    # -- identities: one role each, or one key reads another's jobs and is paid as it ----
    problems += identity_role_conflicts(db)
    problems.sort(key=_block_order)
    return report


def _balance_problems(db: Connection, balances: dict[str, int]) -> list[str]:
    """Each account whose stored balance is not what its transactions add up to."""
    accounts = {r["address"]: r["balance"] for r in db.execute("SELECT * FROM accounts")}
    return [
        f"account {address}: balance {accounts.get(address, 0)} nAIT, but its"
        f" transactions add up to {balances.get(address, 0)}"
        for address in sorted(set(accounts) | set(balances))
        if accounts.get(address, 0) != balances.get(address, 0)
    ]


def _block_order(problem: str) -> tuple[int, int]:
    """Order problems by the block they name, so the first break comes first."""
    if problem.startswith("block "):
        number = problem.split()[1].rstrip(":")
        if number.isdigit():
            return (0, int(number))
    return (1, 0) if problem.startswith("unsealed") else (2, 0)
