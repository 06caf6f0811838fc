"""The explorer's time series: the node's work over the last hour or day, from its own jobs.

A window is a fixed number of buckets (`WINDOWS`) aligned to whole bucket lengths, the last one
the bucket now running. Each bucket counts the jobs that completed or failed in it, the tokens
the completed ones generated, their latency (submit to completed: p50 and p95, nearest rank)
and the queue depth at its end.

Everything is computed from the `jobs` table rather than from a table of samples written by a
background loop: the numbers then agree with the jobs and receipts shown beside them, cover
the time before the node was upgraded or while a loop was down, and cost no writes on an idle
node. The price is that the queue depth of a past moment is reconstructed: a job is pending
from `created_ms` until it leaves the queue (`started_ms`, or `completed_ms` for one cancelled
or failed before it ran). A job put back in the queue after a lost lease has its first start
forgotten, so it counts as pending from its creation; the queue is never undercounted.

Every query is a range scan over one of the indexes of `m009_job_time_indexes` (or over the
pending jobs, which the queue's bound keeps few), grouped in SQLite, so a request costs what
the window holds, never what the whole history holds; the answer has a fixed number of points
and at most `MAX_BREAKDOWN` models and miners.
"""

from __future__ import annotations

from typing import Any

from aitbc_node.clock import now_ms, rfc3339
from aitbc_node.store import Connection, Store

# The window's name: (number of points, bucket length in ms).
WINDOWS: dict[str, tuple[int, int]] = {"hour": (60, 60_000), "day": (48, 1_800_000)}
# Models and miners listed per window, busiest first.
MAX_BREAKDOWN = 50

# A unary `+` keeps a column's index out of the plan, so each statement scans only the range
# of its time index: an index on `status` or `started_ms IS NULL` would reach back through
# the whole history.
# Nearest-rank percentiles in integer arithmetic (SQLite may lack ceil()): the k-th of n
# sorted values, k = ceil(p * n).
_PERCENTILES = """
WITH done AS (
    SELECT {bucket} AS b, completed_ms - created_ms AS ms FROM jobs
    WHERE completed_ms >= :start AND completed_ms < :end AND +status = 'completed'
), ranked AS (
    SELECT b, ms, row_number() OVER (PARTITION BY b ORDER BY ms) AS k,
        count(*) OVER (PARTITION BY b) AS n
    FROM done
)
SELECT b, max(CASE WHEN k = (n + 1) / 2 THEN ms END) AS p50,
    max(CASE WHEN k = (95 * n + 99) / 100 THEN ms END) AS p95
FROM ranked GROUP BY b
"""
_ENDED = """
SELECT (completed_ms - :start) / :step AS b,
    sum(status = 'completed') AS completed, sum(status = 'failed') AS failed,
    coalesce(sum(CASE WHEN status = 'completed' THEN completion_tokens END), 0) AS tokens
FROM jobs WHERE completed_ms >= :start AND completed_ms < :end GROUP BY b
"""
# Into the queue, by bucket.
_CREATED = """
SELECT (created_ms - :start) / :step AS b, count(*) AS n FROM jobs
WHERE created_ms >= :start AND created_ms < :end GROUP BY b
"""
# Out of the queue, by bucket: started, or ended without starting. `before` counts those
# created before the window, which were in the queue when it began.
_STARTED = """
SELECT (started_ms - :start) / :step AS b, count(*) AS n, sum(+created_ms < :start) AS before
FROM jobs WHERE started_ms >= :start AND started_ms < :end GROUP BY b
"""
_ENDED_UNSTARTED = """
SELECT (completed_ms - :start) / :step AS b, count(*) AS n, sum(+created_ms < :start) AS before
FROM jobs WHERE completed_ms >= :start AND completed_ms < :end AND +started_ms IS NULL
GROUP BY b
"""
# Still in the queue now, and already in it when the window began.
_PENDING_BEFORE = """
SELECT count(*) AS n FROM jobs WHERE status = 'pending' AND +created_ms < :start
"""
_BREAKDOWN = """
SELECT {column} AS name, count(*) AS n, coalesce(sum(completion_tokens), 0) AS tokens,
    sum(completed_ms - started_ms) AS busy_ms
FROM jobs WHERE completed_ms >= :start AND completed_ms < :end AND +status = 'completed'
    AND {column} IS NOT NULL
GROUP BY {column} ORDER BY n DESC, name LIMIT {limit}
"""
_BY_BUCKET = _PERCENTILES.format(bucket="(completed_ms - :start) / :step")
_WHOLE_WINDOW = _PERCENTILES.format(bucket="0")
# Every statement `timeseries` runs, for tests that check their query plans.
STATEMENTS = (
    _BY_BUCKET,
    _WHOLE_WINDOW,
    _ENDED,
    _CREATED,
    _STARTED,
    _ENDED_UNSTARTED,
    _PENDING_BEFORE,
    _BREAKDOWN.format(column="served_model", limit=MAX_BREAKDOWN),
    _BREAKDOWN.format(column="miner_id", limit=MAX_BREAKDOWN),
)


def _rate(tokens: int, ms: int | None) -> float:
    """Tokens per second over `ms` milliseconds, to three decimals (0 over no time)."""
    return round(tokens * 1000 / ms, 3) if ms and ms > 0 else 0.0


def _by_bucket(db: Connection, sql: str, args: dict[str, int]) -> dict[int, dict[str, Any]]:
    return {row["b"]: row for row in db.execute(sql, args)}


def _work(rows: list[dict[str, Any]], key: str, span_ms: int) -> list[dict[str, Any]]:
    return [
        {
            key: r["name"],
            "jobs_completed": r["n"],
            "tokens": r["tokens"],
            "tokens_per_second": _rate(r["tokens"], span_ms),
            "generation_tokens_per_second": _rate(r["tokens"], r["busy_ms"])
            if r["busy_ms"]
            else None,
        }
        for r in rows
    ]


def timeseries(store: Store, window: str, now: int | None = None) -> dict[str, Any]:
    """The points of `window` ("hour" or "day") ending now, with the window's totals and its
    completed work by model and by miner."""
    points, step = WINDOWS[window]
    now = now_ms() if now is None else now
    end = (now // step + 1) * step  # the end of the bucket now running
    start = end - points * step
    args = {"start": start, "end": end, "step": step}
    db = store.read()
    ended = _by_bucket(db, _ENDED, args)
    latency = _by_bucket(db, _BY_BUCKET, args)
    created = _by_bucket(db, _CREATED, args)
    started = _by_bucket(db, _STARTED, args)
    unstarted = _by_bucket(db, _ENDED_UNSTARTED, args)
    pending_before = db.one(_PENDING_BEFORE, {"start": start})
    # The queue when the window began: still pending, or left it during the window.
    queue = (pending_before["n"] if pending_before else 0) + sum(
        r["before"] for r in (*started.values(), *unstarted.values())
    )
    out = []
    for i in range(points):
        bucket_start = start + i * step
        queue += created.get(i, {}).get("n", 0)
        queue -= started.get(i, {}).get("n", 0) + unstarted.get(i, {}).get("n", 0)
        done = ended.get(i, {})
        tokens = done.get("tokens", 0)
        lat = latency.get(i, {})
        out.append(
            {
                "start": rfc3339(bucket_start),
                "jobs_completed": done.get("completed", 0),
                "jobs_failed": done.get("failed", 0),
                "tokens": tokens,
                # The bucket now running has lasted only until now.
                "tokens_per_second": _rate(tokens, min(step, now - bucket_start)),
                "queue_depth": max(queue, 0),
                "latency_p50_ms": lat.get("p50"),
                "latency_p95_ms": lat.get("p95"),
            }
        )
    whole = db.one(_WHOLE_WINDOW, args) or {}
    span = now - start
    tokens = sum(p["tokens"] for p in out)
    return {
        "window": window,
        "bucket_seconds": step // 1000,
        "start": rfc3339(start),
        "end": rfc3339(now),
        "points": out,
        "totals": {
            "jobs_completed": sum(p["jobs_completed"] for p in out),
            "jobs_failed": sum(p["jobs_failed"] for p in out),
            "tokens": tokens,
            "tokens_per_second": _rate(tokens, span),
            "queue_depth": out[-1]["queue_depth"],
            "latency_p50_ms": whole.get("p50"),
            "latency_p95_ms": whole.get("p95"),
        },
        "models": _work(
            db.execute(_BREAKDOWN.format(column="served_model", limit=MAX_BREAKDOWN), args),
            "model",
            span,
        ),
        "miners": _work(
            db.execute(_BREAKDOWN.format(column="miner_id", limit=MAX_BREAKDOWN), args),
            "miner_id",
            span,
        ),
    }
