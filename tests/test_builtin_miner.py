"""The built-in miner on the real model: cancels, engine errors, restarts and clean shutdown."""

from __future__ import annotations

import re
import sqlite3
import time
from datetime import datetime

from tests.conftest import GENERATION_WAIT, LONG_PARAMS, LONG_PROMPT, LONG_TOKENS, NodeProcess
from tests.test_jobs_api import assert_error


def wait_until(predicate, what: str, timeout: float = GENERATION_WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def moment(rfc3339: str) -> float:
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


def miner_state(node: NodeProcess) -> dict:
    return node.request("GET", "/health").json()["miner"]


def test_cancel_during_generation_stops_the_miner(start_node) -> None:
    node = start_node("--log-level", "info")
    job_id = node.submit(LONG_PROMPT, params=LONG_PARAMS)["job_id"]
    node.wait_for_text(job_id, 20)  # the miner is generating it now
    assert miner_state(node)["current_job"] == job_id
    r = node.request("POST", f"/v1/jobs/{job_id}/cancel", node.client_key)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    wait_until(lambda: miner_state(node)["current_job"] != job_id, "the miner to drop the job")
    # It stopped generating at the cancel: uncancelled, it would have run to max_tokens.
    stopped = re.search(rf"job {job_id} was cancelled after (\d+) tokens", node.output())
    assert stopped, node.output()
    assert int(stopped[1]) < LONG_TOKENS
    job = node.job(job_id)
    assert job["status"] == "cancelled" and job["result"] is None and job["usage"] is None
    # ...and it serves the next job.
    follow_up = node.submit("Say yes.", params={"max_tokens": 4})
    done = node.wait_for(follow_up["job_id"], ("completed",), timeout=GENERATION_WAIT)
    assert done["result"] and done["miner_id"] == job["miner_id"]
    assert node.job(job_id)["status"] == "cancelled"


def test_an_engine_error_fails_the_job_with_the_reason(start_node) -> None:
    node = start_node("--ctx-size", "128")
    job = node.submit("tell me a story " * 100, params={"max_tokens": 8})
    job = node.wait_for(job["job_id"], ("completed", "failed"))
    assert job["status"] == "failed"
    assert job["error_code"] == "ENGINE_ERROR"
    assert "context" in job["error"]
    assert job["result"] is None
    # the miner carries on with the next job
    ok = node.submit("Hi", params={"max_tokens": 4})
    assert node.wait_for(ok["job_id"], ("completed", "failed"))["status"] == "completed"


def test_restart_after_sigkill_requeues_the_builtin_miners_job(start_node) -> None:
    node = start_node()
    done = node.submit("Say one.", params={"max_tokens": 3})
    node.wait_for(done["job_id"], ("completed",))
    # Long enough to be cut short by the kill; short enough to finish after the restart.
    job_id = node.submit(LONG_PROMPT, params={**LONG_PARAMS, "max_tokens": 200})["job_id"]
    node.wait_for_text(job_id)  # mid-generation
    node.kill()
    # the process died with the job running and the lease still live
    row = (
        sqlite3.connect(node.data_dir / "node.db")
        .execute("SELECT status, attempts FROM jobs WHERE job_id = ?", (job_id,))
        .fetchone()
    )
    assert row == ("running", 1)
    again = start_node(data_dir=node.data_dir)
    job = again.wait_for(job_id, ("completed", "failed"), timeout=GENERATION_WAIT)
    assert job["status"] == "completed" and job["result"]
    assert job["attempts"] == 2
    # nothing from before the crash was lost
    assert again.job(done["job_id"])["status"] == "completed"
    assert again.client_key == node.client_key


def test_restart_keeps_a_remote_miners_claim(start_node) -> None:
    coordinator = start_node("--no-miner", "--lease-seconds", "30")
    key = coordinator.register_miner("remote-1")
    job_id = coordinator.submit("held across a restart")["job_id"]
    r = coordinator.request("POST", f"/v1/jobs/{job_id}/claim", key, json={"miner_id": "remote-1"})
    assert r.status_code == 200
    coordinator.kill()
    again = start_node("--no-miner", "--lease-seconds", "30", data_dir=coordinator.data_dir)
    job = again.job(job_id)
    assert job["status"] == "running" and job["miner_id"] == "remote-1"
    r = again.request(
        "POST",
        f"/v1/jobs/{job_id}/complete",
        key,
        json={"miner_id": "remote-1", "result": "finished after the restart"},
    )
    assert r.status_code == 200, r.text
    assert again.job(job_id)["status"] == "completed"


def test_sigterm_stops_cleanly_and_hands_the_job_back(start_node) -> None:
    node = start_node()
    job_id = node.submit(LONG_PROMPT, params=LONG_PARAMS)["job_id"]
    node.wait_for_text(job_id, 20)  # the miner is generating it now
    assert miner_state(node)["current_job"] == job_id
    assert node.terminate() == 0
    assert "stopped cleanly" in node.output()
    # Back in the queue uncounted, not finished: the signal cut the generation short.
    conn = sqlite3.connect(node.data_dir / "node.db")
    status, attempts, miner = conn.execute(
        "SELECT status, attempts, miner_id FROM jobs WHERE job_id = ?", (job_id,)
    ).fetchone()
    assert (status, attempts, miner) == ("pending", 0, None)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    # the next start serves it, as its first attempt
    again = start_node(data_dir=node.data_dir)
    again.wait_for_text(job_id)
    assert miner_state(again)["current_job"] == job_id
    assert again.job(job_id)["attempts"] == 1


def test_cancel_of_a_finished_job_is_409(node: NodeProcess) -> None:
    job = node.submit("Hi", params={"max_tokens": 2})
    node.wait_for(job["job_id"], ("completed",))
    r = node.request("POST", f"/v1/jobs/{job['job_id']}/cancel", node.client_key)
    assert_error(r, 409, "JOB_ALREADY_FINISHED")


def test_heartbeats_keep_a_long_job_alive_past_its_lease(start_node) -> None:
    # One attempt only: had the lease lapsed once, the job would fail with LEASE_EXPIRED.
    lease = 5
    node = start_node("--lease-seconds", str(lease), "--max-attempts", "1")
    job_id = node.submit(LONG_PROMPT, params=LONG_PARAMS)["job_id"]
    node.wait_for_text(job_id)
    first_lease = moment(node.job(job_id)["lease_expires_at"])

    def outlived_its_leases() -> bool:
        job = node.job(job_id)
        assert job["attempts"] == 1, job
        if job["status"] == "completed":  # a machine fast enough to finish first
            assert moment(job["completed_at"]) > first_lease, f"within its first lease: {job}"
            return True
        assert job["status"] == "running", job
        return time.time() > first_lease + 2 * lease and moment(job["lease_expires_at"]) > (
            first_lease + lease
        )

    wait_until(outlived_its_leases, "the job to outlive its first leases")
