"""The stats endpoints read counters that triggers keep (migration m010): after every kind of
change, the counters give what the full scans they replaced gave."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aitbc_node.config import JobRules
from aitbc_node.keys import Principal, create_key
from aitbc_node.ledger import format_ait
from aitbc_node.node import Node, NodeSettings
from aitbc_node.schemas import JobParams, SubmitJob
from aitbc_node.store import Store
from tests.conftest import SMOL, NodeProcess
from tests.test_miner_protocol import claim

STATUSES = ("pending", "running", "completed", "failed", "cancelled")
MODEL = "tiny"
CAPS = '["tiny"]'
CLIENT = Principal(key_id="key-test", name="client-a", role="client", identity="client-a")


# -- the reference: the full-scan queries the stats endpoints ran before the counters ---------


# Runs one query and returns its rows as tuples: the node's own connection in this process
# (a second SQLite library, stdlib sqlite3's, on a file apsw holds open in the same process
# breaks its POSIX locks), stdlib sqlite3 on a node running in another process.
Query = Callable[[str], list[tuple[Any, ...]]]


def scanned_job_stats(query: Query) -> dict[str, Any]:
    """What `Jobs.stats()` computed from the jobs table, without the miners."""
    by_status = dict.fromkeys(STATUSES, 0)
    for status, n in query("SELECT status, count(*) FROM jobs GROUP BY status"):
        by_status[status] = n
    [(completion, prompt, latency)] = query(
        "SELECT coalesce(sum(completion_tokens), 0), coalesce(sum(prompt_tokens), 0),"
        " avg(completed_ms - created_ms) FROM jobs WHERE status = 'completed'"
    )
    return {
        "jobs": {"total": sum(by_status.values()), **by_status},
        "queue_depth": by_status["pending"],
        "tokens_generated": completion,
        "prompt_tokens": prompt,
        "average_job_latency_ms": round(latency, 1) if latency is not None else None,
    }


def scanned_explorer_stats(query: Query) -> dict[str, Any]:
    """What `Explorer.stats()` computed from the ledger tables, without the miners."""
    [(height, receipts, unsealed, transactions, value_moved, accounts)] = query(
        "SELECT (SELECT max(height) FROM blocks), (SELECT count(*) FROM receipts),"
        " (SELECT count(*) FROM receipts WHERE block_height IS NULL),"
        " (SELECT count(*) FROM transactions),"
        " (SELECT coalesce(sum(amount), 0) FROM transactions WHERE kind = 'payment'),"
        " (SELECT count(*) FROM accounts)"
    )
    jobs = scanned_job_stats(query)
    return {
        "height": height,
        "receipts": receipts,
        "unsealed_receipts": unsealed,
        "transactions": transactions,
        "accounts": accounts,
        "total_value_moved": value_moved,
        "total_value_moved_ait": format_ait(value_moved),
        "jobs": jobs["jobs"],
        "tokens_generated": jobs["tokens_generated"],
    }


def scanned(query: Query) -> tuple[dict[str, Any], dict[str, Any]]:
    return scanned_job_stats(query), scanned_explorer_stats(query)


def scanned_file(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The full scans over the database of a node running in another process."""
    db = sqlite3.connect(path)
    try:
        return scanned(lambda sql: db.execute(sql).fetchall())
    finally:
        db.close()


def without_miners(stats: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v
        for k, v in stats.items()
        if k not in ("miners_online", "miners_total", "served_models")
    }


def assert_counters_match(node: Node) -> None:
    """The stats read from the counters equal the full scans, field for field."""
    jobs, explorer = scanned(
        lambda sql: [tuple(row.values()) for row in node.store.read().execute(sql)]
    )
    assert without_miners(node.jobs.stats()) == jobs
    assert without_miners(node.explorer.stats(node.miners.list())) == explorer


# -- in process: every path that writes the counted tables -----------------------------------


def open_node(data_dir: Path) -> Node:
    """A node of this process, its threads not started: the test drives every change."""
    rules = JobRules(lease_seconds=0.001, max_attempts=2, accept_unserved_models=True)
    return Node(NodeSettings(data_dir=data_dir, run_miner=False, rules=rules))


def submit(node: Node, n: int) -> list[str]:
    request = SubmitJob(prompt="count me", model=MODEL, params=JobParams(max_tokens=4))
    return [node.jobs.submit(CLIENT, request)[0]["job_id"] for _ in range(n)]


def run_every_transition(node: Node, check: Any) -> None:
    """Submit, claim, complete (with and without usage), fail, cancel (pending and running),
    hand back, lease expiry (requeued, then failed), faults (requeued, then poisoned), a
    grant, and blocks sealed a few items at a time; `check()` after each."""
    node.miners.upsert("m1", [MODEL], {}, builtin=False)
    create_key(node.store, "client", "client-a", credit=10**12)
    check()
    jobs = submit(node, 12)
    check()
    for job_id in jobs[:8]:
        node.jobs.claim_as("m1", CAPS, job_id)
    check()
    node.jobs.finish(jobs[0], "m1", result="one", prompt_tokens=3, completion_tokens=5)
    node.jobs.finish(jobs[1], "m1", result="two", prompt_tokens=7, completion_tokens=11)
    node.jobs.finish(jobs[2], "m1", result="no usage reported")
    check()
    node.jobs.finish(jobs[3], "m1", error="GPU fell over", error_code="MINER_ERROR")
    check()
    node.jobs.cancel(CLIENT, jobs[4])  # running
    node.jobs.cancel(CLIENT, jobs[8])  # pending
    check()
    assert node.jobs.release(jobs[5], "m1")
    check()
    # jobs[6] and jobs[7] hold leases of 1 ms: the first expiry requeues them...
    time.sleep(0.01)
    assert sorted(node.jobs.expire_leases()["requeued"]) == sorted(jobs[6:8])
    check()
    # ...and once claimed again, out of attempts, the next fails them.
    node.jobs.claim_as("m1", CAPS, jobs[6])
    node.jobs.claim_as("m1", CAPS, jobs[7])
    time.sleep(0.01)
    assert sorted(node.jobs.expire_leases()["failed"]) == sorted(jobs[6:8])
    check()
    # Faults: one requeues a pending job, the second fails it POISON_JOB.
    assert node.jobs.record_fault(jobs[9], "m1", "it broke") == "pending"
    assert node.jobs.record_fault(jobs[9], "m1", "it broke again") == "failed"
    check()
    node.jobs.claim_as("m1", CAPS, jobs[10])
    node.jobs.finish(jobs[10], "m1", result="late", prompt_tokens=2, completion_tokens=1)
    check()
    while node.ledger.seal(max_items=2) is not None:
        check()


def test_counters_follow_every_transition(tmp_path: Path) -> None:
    node = open_node(tmp_path / "data")
    try:
        run_every_transition(node, lambda: assert_counters_match(node))
        stats = node.jobs.stats()
        assert stats["jobs"]["completed"] == 4 and stats["jobs"]["cancelled"] == 2
        assert stats["tokens_generated"] == 17 and stats["prompt_tokens"] == 12
        explorer = node.explorer.stats(node.miners.list())
        assert explorer["unsealed_receipts"] == 0 and explorer["receipts"] == 4
    finally:
        node.store.close()


def test_counters_follow_writes_outside_the_job_code(tmp_path: Path) -> None:
    """Triggers count whatever writes the rows: a completed job's usage corrected, a
    completed job reopened, a job and a payment deleted, a payment's amount changed."""
    node = open_node(tmp_path / "data")
    try:
        run_every_transition(node, lambda: None)
        edits = [
            "UPDATE jobs SET completion_tokens = 40, prompt_tokens = NULL"
            " WHERE status = 'completed' AND completion_tokens = 5",
            "UPDATE jobs SET completed_ms = completed_ms + 1234"
            " WHERE status = 'completed' AND completion_tokens = 11",
            "UPDATE jobs SET status = 'pending', completed_ms = NULL"
            " WHERE status = 'completed' AND completion_tokens = 1",
            "UPDATE jobs SET status = 'completed', completed_ms = created_ms + 99"
            " WHERE status = 'cancelled'",
            "DELETE FROM jobs WHERE status = 'failed'",
            "UPDATE transactions SET amount = amount + 5 WHERE kind = 'payment'",
            "UPDATE transactions SET kind = 'grant' WHERE seq = (SELECT max(seq) FROM"
            " transactions WHERE kind = 'payment')",
            "UPDATE receipts SET block_height = NULL WHERE seq = (SELECT min(seq) FROM receipts)",
            "DELETE FROM receipts WHERE seq = (SELECT max(seq) FROM receipts)",
            "DELETE FROM transactions WHERE kind = 'grant'",
            "DELETE FROM accounts WHERE kind = 'miner'",
        ]
        for sql in edits:
            with node.store.write() as db:
                db.execute(sql)
                assert db.changes() >= 1, sql
            assert_counters_match(node)
    finally:
        node.store.close()


def test_an_older_database_upgrades_to_the_right_counters(tmp_path: Path) -> None:
    """A store as it was before m010 (every migration but it), with jobs in every state and
    sealed and unsealed receipts, gets its counters from its rows when it is next opened."""
    data_dir = tmp_path / "data"
    # Today's code reads the counters as it writes (a submit's queue bound), so the rows are
    # written first and m010 is then taken back out: its table, its triggers, its record.
    old = open_node(data_dir)
    try:
        run_every_transition(old, lambda: None)
        later = submit(old, 3)
        old.jobs.claim_as("m1", CAPS, later[0])  # left running
        old.jobs.claim_as("m1", CAPS, later[1])  # its receipt left unsealed
        old.jobs.finish(later[1], "m1", result="unsealed", completion_tokens=3)
    finally:
        old.store.close()
    db = sqlite3.connect(data_dir / "node.db")
    with db:
        triggers = db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'trigger' AND name LIKE '%_counters_%'"
        ).fetchall()
        assert len(triggers) == 12  # insert, update and delete on four tables
        for (trigger,) in triggers:
            db.execute(f"DROP TRIGGER {trigger}")
        db.execute("DROP TABLE stats_counters")
        db.execute("DELETE FROM _migrations WHERE name = 'm010_stats_counters'")
    names = {name for (name,) in db.execute("SELECT name FROM sqlite_master")}
    unsealed = db.execute("SELECT count(*) FROM receipts WHERE block_height IS NULL").fetchone()
    db.close()
    assert "stats_counters" not in names and unsealed == (1,)  # the last completion's
    upgraded = open_node(data_dir)  # the store's open runs m010
    try:
        ran = {r["name"] for r in upgraded.store.read().execute("SELECT name FROM _migrations")}
        assert "m010_stats_counters" in ran
        assert_counters_match(upgraded)
        stats = upgraded.jobs.stats()
        assert stats["jobs"]["running"] == 1 and stats["jobs"]["pending"] >= 2
        assert stats["average_job_latency_ms"] is not None
        # and the triggers keep them from there
        upgraded.jobs.finish(later[0], "m1", result="after", completion_tokens=9)
        assert_counters_match(upgraded)
    finally:
        upgraded.store.close()


def test_a_fresh_store_starts_at_zero(tmp_path: Path) -> None:
    store = Store(tmp_path / "node.db")
    try:
        row = store.read().one("SELECT * FROM stats_counters")
        assert row is not None and set(row.values()) == {0, 1}  # id 1, every counter 0
    finally:
        store.close()


# -- through the HTTP API of a real node ---------------------------------------------------


def test_the_stats_endpoints_match_the_full_scans(coordinator: NodeProcess) -> None:
    """A node with no built-in miner, driven by a miner over HTTP (the coordinator fixture:
    1 s leases, 2 attempts): completions, a failure, cancels, a lease that runs out; once
    the sealer has sealed everything, both endpoints say what the full scans say."""
    key = coordinator.register_miner("counter-miner")
    jobs = [coordinator.submit(f"job {i}", params={"max_tokens": 4})["job_id"] for i in range(8)]

    def post(job_id: str, action: str, **body: Any) -> dict[str, Any]:
        r = coordinator.request(
            "POST", f"/v1/jobs/{job_id}/{action}", key, json={"miner_id": "counter-miner", **body}
        )
        assert r.status_code == 200, r.text
        return r.json()

    for i, job_id in enumerate(jobs[:3]):
        assert claim(coordinator, key, "counter-miner", job_id).status_code == 200
        post(
            job_id,
            "complete",
            result=f"done {i}",
            usage={"prompt_tokens": 2, "completion_tokens": i + 1},
        )
    assert claim(coordinator, key, "counter-miner", jobs[3]).status_code == 200
    post(jobs[3], "fail", error="out of memory")
    assert claim(coordinator, key, "counter-miner", jobs[4]).status_code == 200
    for job_id in jobs[4:6]:  # running, then pending
        r = coordinator.request("POST", f"/v1/jobs/{job_id}/cancel", coordinator.client_key)
        assert r.status_code == 200, r.text
    # A lease that runs out puts the job back to pending (its first of two attempts).
    assert claim(coordinator, key, "counter-miner", jobs[6]).status_code == 200
    assert coordinator.wait_for(jobs[6], ("pending",))["attempts"] == 1

    deadline = time.monotonic() + 120
    while True:
        jobs_scan, explorer_scan = scanned_file(coordinator.data_dir / "node.db")
        if explorer_scan["unsealed_receipts"] == 0:
            break
        assert time.monotonic() < deadline, "the sealer did not seal the receipts"
        time.sleep(0.2)
    stats = coordinator.request("GET", "/v1/stats").json()
    explorer = coordinator.request("GET", "/explorer/stats").json()
    assert without_miners(stats) == jobs_scan
    assert without_miners(explorer) == explorer_scan
    assert stats["jobs"] == {
        "total": 8,
        "pending": 2,
        "running": 0,
        "completed": 3,
        "failed": 1,
        "cancelled": 2,
    }
    assert stats["tokens_generated"] == 6 and explorer["receipts"] == 3
    assert stats["miners_online"] == explorer["miners_online"] == 1
    assert explorer["miners_total"] == 1 and stats["served_models"] == [SMOL]
