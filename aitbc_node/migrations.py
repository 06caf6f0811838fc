"""Schema migrations for the job store, as numbered functions (the simonw/llm way).

Each migration is a function taking a `sqlite_utils.Database`; `apply` runs, in order, those not
yet recorded in the `_migrations` table. They run once at start-up through stdlib sqlite3, before
the live apsw connections open, so sqlite-utils stays out of the hot path.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from aitbc_node.clock import now_ms

if TYPE_CHECKING:
    # Imported where the migrations run (`apply`), not with this module: sqlite-utils imports
    # numpy when it is installed, and numpy must not load before llama.cpp's libraries (see
    # `cli.load_engine_first`).
    import sqlite_utils

Migration = Callable[["sqlite_utils.Database"], None]
MIGRATIONS: list[Migration] = []


def migration(fn: Migration) -> Migration:
    """Register `fn` as the next migration; its name is recorded once it has run."""
    MIGRATIONS.append(fn)
    return fn


@migration
def m001_initial(db: sqlite_utils.Database) -> None:
    db["api_keys"].create(
        {
            "key_id": str,
            "key_hash": str,
            "name": str,
            "role": str,
            "identity": str,
            "created_ms": int,
            "revoked_ms": int,
        },
        pk="key_id",
        not_null={"key_hash", "name", "role", "identity", "created_ms"},
    )
    db["api_keys"].create_index(["key_hash"], unique=True)
    db.execute(
        """
        CREATE TABLE jobs (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            job_id TEXT NOT NULL UNIQUE,
            client TEXT NOT NULL,
            prompt TEXT NOT NULL,
            model TEXT NOT NULL,
            served_model TEXT NOT NULL,
            params TEXT NOT NULL,
            status TEXT NOT NULL CHECK (
                status IN ('pending', 'running', 'completed', 'failed', 'cancelled')
            ),
            result TEXT,
            error TEXT,
            error_code TEXT,
            miner_id TEXT,
            attempts INTEGER NOT NULL DEFAULT 0,
            lease_expires_ms INTEGER,
            prompt_tokens INTEGER,
            completion_tokens INTEGER,
            created_ms INTEGER NOT NULL,
            started_ms INTEGER,
            completed_ms INTEGER
        )
        """
    )
    db["jobs"].create_index(["status", "served_model", "seq"])
    db["jobs"].create_index(["client", "seq"])
    db["jobs"].create_index(["miner_id", "status"])
    db["miners"].create(
        {
            "miner_id": str,
            "capabilities": str,
            "gpu_info": str,
            "builtin": int,
            "registered_ms": int,
            "last_seen_ms": int,
        },
        pk="miner_id",
        not_null={"capabilities", "gpu_info", "builtin", "registered_ms", "last_seen_ms"},
    )


@migration
def m002_ledger(db: sqlite_utils.Database) -> None:
    # Each ledger row keeps its signed or hashed document as canonical JSON text; the other
    # columns are indexes over it, and `aitbc-node verify` checks that they agree.
    db.execute("ALTER TABLE jobs ADD COLUMN receipt_id TEXT")
    db.execute(
        """
        CREATE TABLE receipts (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            receipt_id TEXT NOT NULL UNIQUE,
            job_id TEXT NOT NULL UNIQUE,
            client_address TEXT NOT NULL,
            document TEXT NOT NULL,
            block_height INTEGER
        )
        """
    )
    db.execute("CREATE INDEX receipts_by_client ON receipts (client_address, seq)")
    db.execute("CREATE INDEX receipts_by_block ON receipts (block_height, seq)")
    db.execute(
        """
        CREATE TABLE transactions (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            tx_id TEXT NOT NULL UNIQUE,
            kind TEXT NOT NULL CHECK (kind IN ('grant', 'payment')),
            from_address TEXT,
            to_address TEXT NOT NULL,
            amount INTEGER NOT NULL CHECK (amount >= 0),
            job_id TEXT,
            document TEXT NOT NULL,
            block_height INTEGER
        )
        """
    )
    db.execute("CREATE INDEX transactions_by_block ON transactions (block_height, seq)")
    db.execute("CREATE INDEX transactions_from ON transactions (from_address, seq)")
    db.execute("CREATE INDEX transactions_to ON transactions (to_address, seq)")
    db.execute(
        """
        CREATE TABLE blocks (
            height INTEGER PRIMARY KEY,
            header TEXT NOT NULL,
            block_hash TEXT NOT NULL UNIQUE,
            signature TEXT NOT NULL
        )
        """
    )
    db.execute(
        """
        CREATE TABLE accounts (
            address TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            identity TEXT NOT NULL,
            balance INTEGER NOT NULL DEFAULT 0
        )
        """
    )


@migration
def m003_webhooks_and_queue_bounds(db: sqlite_utils.Database) -> None:
    db["jobs"].create_index(["client", "status"])
    db.execute(
        """
        CREATE TABLE webhooks (
            webhook_id TEXT PRIMARY KEY,
            client TEXT NOT NULL,
            url TEXT NOT NULL,
            events TEXT NOT NULL,
            secret TEXT NOT NULL,
            created_ms INTEGER NOT NULL,
            deleted_ms INTEGER
        )
        """
    )
    db.execute("CREATE INDEX webhooks_by_client ON webhooks (client, deleted_ms)")
    # The outbox: one row per event to deliver, written in the job change's own transaction.
    db.execute(
        """
        CREATE TABLE deliveries (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            event_id TEXT NOT NULL UNIQUE,
            webhook_id TEXT NOT NULL REFERENCES webhooks (webhook_id),
            event TEXT NOT NULL,
            job_id TEXT NOT NULL,
            body TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'failed')),
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt_ms INTEGER NOT NULL,
            created_ms INTEGER NOT NULL
        )
        """
    )
    db.execute("CREATE INDEX deliveries_due ON deliveries (state, next_attempt_ms)")
    db.execute("CREATE INDEX deliveries_by_webhook ON deliveries (webhook_id, seq)")
    db.execute(
        """
        CREATE TABLE delivery_attempts (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            event_id TEXT NOT NULL REFERENCES deliveries (event_id),
            attempt INTEGER NOT NULL,
            started_ms INTEGER NOT NULL,
            duration_ms INTEGER NOT NULL,
            status_code INTEGER,
            error TEXT
        )
        """
    )
    db.execute("CREATE INDEX delivery_attempts_by_event ON delivery_attempts (event_id, seq)")


@migration
def m004_miner_keys(db: sqlite_utils.Database) -> None:
    # A remote miner's own Ed25519 public key: it co-signs the results it returns.
    db.execute("ALTER TABLE miners ADD COLUMN public_key TEXT")


@migration
def m005_idempotency_keys(db: sqlite_utils.Database) -> None:
    # `Idempotency-Key` on submit: a client's key maps to the job its first request made and
    # the hash of that request's body, so a retried POST returns that job, not a second one.
    db.execute(
        """
        CREATE TABLE idempotency_keys (
            client TEXT NOT NULL,
            idempotency_key TEXT NOT NULL,
            request_hash TEXT NOT NULL,
            job_id TEXT NOT NULL,
            created_ms INTEGER NOT NULL,
            PRIMARY KEY (client, idempotency_key)
        )
        """
    )
    db.execute("CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_ms)")


@migration
def m006_job_faults(db: sqlite_utils.Database) -> None:
    # How often a job broke the built-in miner (an unexpected error while serving or
    # recording it, or the process dying while it ran): the second time it is failed
    # `POISON_JOB` instead of being claimed again.
    db.execute("ALTER TABLE jobs ADD COLUMN faults INTEGER NOT NULL DEFAULT 0")


@migration
def m007_job_queue_indexes(db: sqlite_utils.Database) -> None:
    # Claims and offers look up pending jobs by model and take turns by client, counting each
    # client's running jobs: without these, every claim scanned the whole jobs table.
    db.execute("CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, served_model, seq)")
    db.execute("CREATE INDEX IF NOT EXISTS jobs_by_client_status ON jobs (client, status)")


@migration
def m008_job_messages(db: sqlite_utils.Database) -> None:
    # A job asked as a conversation keeps its messages (JSON) for the miner's chat template
    # and the receipt's request hash; `prompt` holds them as plain text for older miners.
    db.execute("ALTER TABLE jobs ADD COLUMN messages TEXT")


@migration
def m009_job_time_indexes(db: sqlite_utils.Database) -> None:
    # The explorer's time series (`timeseries.py`) reads only the jobs that were created,
    # started or finished inside its window: range scans on these, never the whole history.
    db.execute("CREATE INDEX IF NOT EXISTS jobs_by_created ON jobs (created_ms)")
    db.execute("CREATE INDEX IF NOT EXISTS jobs_by_started ON jobs (started_ms)")
    db.execute("CREATE INDEX IF NOT EXISTS jobs_by_completed ON jobs (completed_ms)")


# What one row adds to each counter of `stats_counters`, written over the row `{r}` (NEW or
# OLD in a trigger, a table alias in the backfill). Frozen here with m010: a later change to
# what is counted is a new migration.
_JOB_COUNTERS = {
    "jobs_pending": "({r}.status = 'pending')",
    "jobs_running": "({r}.status = 'running')",
    "jobs_completed": "({r}.status = 'completed')",
    "jobs_failed": "({r}.status = 'failed')",
    "jobs_cancelled": "({r}.status = 'cancelled')",
    "completion_tokens": (
        "CASE WHEN {r}.status = 'completed' THEN coalesce({r}.completion_tokens, 0) ELSE 0 END"
    ),
    "prompt_tokens": (
        "CASE WHEN {r}.status = 'completed' THEN coalesce({r}.prompt_tokens, 0) ELSE 0 END"
    ),
    "latency_ms_sum": (
        "CASE WHEN {r}.status = 'completed' AND {r}.completed_ms IS NOT NULL"
        " THEN {r}.completed_ms - {r}.created_ms ELSE 0 END"
    ),
    "latency_count": "({r}.status = 'completed' AND {r}.completed_ms IS NOT NULL)",
}
_RECEIPT_COUNTERS = {"receipts": "1", "unsealed_receipts": "({r}.block_height IS NULL)"}
_TRANSACTION_COUNTERS = {
    "transactions": "1",
    "value_moved": "CASE WHEN {r}.kind = 'payment' THEN {r}.amount ELSE 0 END",
}
_ACCOUNT_COUNTERS = {"accounts": "1"}
# Each counted table: its counters, and the columns they read (its UPDATE trigger's `OF`): a
# lease renewal, a receipt id set on a job or a balance change fires nothing.
_COUNTED_TABLES = {
    "jobs": (
        _JOB_COUNTERS,
        "status, prompt_tokens, completion_tokens, created_ms, completed_ms",
    ),
    "receipts": (_RECEIPT_COUNTERS, "block_height"),
    "transactions": (_TRANSACTION_COUNTERS, "kind, amount"),
    "accounts": (_ACCOUNT_COUNTERS, "address"),
}


def _counter_triggers(
    db: sqlite_utils.Database, table: str, counters: dict[str, str], columns: str
) -> None:
    """AFTER INSERT, UPDATE OF `columns` and DELETE triggers on `table` that take the old
    row's share out of `stats_counters` and put the new row's in."""
    changes = {
        "INSERT": {c: f"{c} + {e.format(r='NEW')}" for c, e in counters.items()},
        f"UPDATE OF {columns}": {
            c: f"{c} - {e.format(r='OLD')} + {e.format(r='NEW')}" for c, e in counters.items()
        },
        "DELETE": {c: f"{c} - {e.format(r='OLD')}" for c, e in counters.items()},
    }
    for event, sets in changes.items():
        name = f"{table}_counters_{event.split()[0].lower()}"
        assignments = ", ".join(f"{c} = {value}" for c, value in sets.items())
        db.execute(
            f"CREATE TRIGGER {name} AFTER {event} ON {table}"
            f" BEGIN UPDATE stats_counters SET {assignments}; END"
        )


@migration
def m010_stats_counters(db: sqlite_utils.Database) -> None:
    # `/v1/stats` and `/explorer/stats` counted and summed the whole history on every read (44
    # and 72 ms at 100,000 jobs, polled by every open explorer page). Triggers keep the totals
    # in one row instead, in the transaction of every change to the rows they count, whatever
    # code path writes them, so a read costs the same at any size. The average latency is
    # kept as a sum and a count so it stays exact.
    columns = [c for counters, _ in _COUNTED_TABLES.values() for c in counters]
    db.execute(
        "CREATE TABLE stats_counters (id INTEGER PRIMARY KEY CHECK (id = 1), "
        + ", ".join(f"{c} INTEGER NOT NULL" for c in columns)
        + ")"
    )
    # Backfill from the rows already there, so an older database upgrades with right totals.
    sums = [
        f"(SELECT coalesce(sum({e.format(r=table)}), 0) FROM {table})"
        for table, (counters, _) in _COUNTED_TABLES.items()
        for e in counters.values()
    ]
    db.execute(
        f"INSERT INTO stats_counters (id, {', '.join(columns)}) VALUES (1, {', '.join(sums)})"
    )
    for table, (counters, read_columns) in _COUNTED_TABLES.items():
        _counter_triggers(db, table, counters, read_columns)


@migration
def m011_drop_duplicate_job_indexes(db: sqlite_utils.Database) -> None:
    # m007's two indexes repeat m001's `idx_jobs_status_served_model_seq` and m003's
    # `idx_jobs_client_status` column for column: every change of a job's status updated
    # four index entries where two do the same work.
    db.execute("DROP INDEX IF EXISTS jobs_by_status")
    db.execute("DROP INDEX IF EXISTS jobs_by_client_status")


def apply(path: Path) -> list[str]:
    """Bring the database at `path` up to the newest schema; return the migrations that ran."""
    import sqlite_utils

    db = sqlite_utils.Database(path)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db["_migrations"].create({"name": str, "applied_ms": int}, pk="name", if_not_exists=True)
        done = {row["name"] for row in db["_migrations"].rows}
        ran = []
        for fn in MIGRATIONS:
            if fn.__name__ in done:
                continue
            with db.conn:
                fn(db)
                db["_migrations"].insert({"name": fn.__name__, "applied_ms": now_ms()})
            ran.append(fn.__name__)
        return ran
    finally:
        db.close()
