"""The running totals behind `/v1/stats` and `/explorer/stats`.

SQLite triggers (migration m010) keep them in one row, `stats_counters`, updated in the
transaction of every change to the jobs, receipts, transactions and accounts they count, so
reading them is one row lookup however long the history is.
"""

from __future__ import annotations

from typing import Any, get_args

from aitbc_node.schemas import JobStatus
from aitbc_node.store import Connection, Row

# The job statuses, in the API's order; `stats_counters` names its columns `jobs_<status>`.
JOB_STATUSES: tuple[str, ...] = get_args(JobStatus)


def read_counters(db: Connection) -> Row:
    """The one row of totals."""
    row = db.one("SELECT * FROM stats_counters WHERE id = 1")
    if row is None:  # the migration inserts it; only a hand-edited database lacks it
        raise RuntimeError("the store has no stats_counters row; was migration m010 undone?")
    return row


def job_counts(counters: Row) -> dict[str, int]:
    """Jobs by status, with their total, as the stats endpoints show them."""
    by_status = {s: counters[f"jobs_{s}"] for s in JOB_STATUSES}
    return {"total": sum(by_status.values()), **by_status}


def average_latency_ms(counters: Row) -> float | None:
    """The mean of completed_ms - created_ms over completed jobs, to 0.1 ms (None before the
    first), as SQLite's avg() gave it: the float sum over the count."""
    count = counters["latency_count"]
    if not count:
        return None
    return round(float(counters["latency_ms_sum"]) / count, 1)


def ledger_totals(counters: Row) -> dict[str, Any]:
    """Receipts (all, and not yet sealed), transactions, accounts and the value paid."""
    return {
        "receipts": counters["receipts"],
        "unsealed_receipts": counters["unsealed_receipts"],
        "transactions": counters["transactions"],
        "accounts": counters["accounts"],
        "value_moved": counters["value_moved"],
    }
