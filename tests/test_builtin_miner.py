"""The built-in miner on the real model: cancels, engine errors, restarts and clean shutdown."""

from __future__ import annotations

import sqlite3
import time
from datetime import datetime

from tests.conftest import NodeProcess
from tests.test_jobs_api import assert_error

# Greedy SmolLM2 keeps listing numbers until max_tokens runs out (~100 tokens/s here), where
# "Count from 1 to 1000" stops by itself after about 20.
LONG_PROMPT = "List the numbers from 1 to 1000 separated by commas: 1, 2, 3,"
LONG_PARAMS = {"max_tokens": 1000, "temperature": 0}


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def miner_state(node: NodeProcess) -> dict:
    return node.request("GET", "/health").json()["miner"]


def test_cancel_during_generation_stops_the_miner(start_node) -> None:
    node = start_node()
    job_id = node.submit(LONG_PROMPT, params=LONG_PARAMS)["job_id"]
    node.wait_for(job_id, ("running",), timeout=10)
    wait_until(lambda: miner_state(node)["current_job"] == job_id, 5, "the miner to start")
    time.sleep(0.5)
    r = node.request("POST", f"/v1/jobs/{job_id}/cancel", node.client_key)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    # Uncancelled, this job would keep the miner busy for many seconds more.
    wait_until(lambda: miner_state(node)["state"] == "idle", 3, "the miner to drop the job")
    job = node.job(job_id)
    assert job["status"] == "cancelled" and job["result"] is None
    follow_up = node.submit("Say yes.", params={"max_tokens": 4})
    assert node.wait_for(follow_up["job_id"], ("completed",), timeout=10)["result"]
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
    job_id = node.submit(LONG_PROMPT, params={"max_tokens": 200, "temperature": 0})["job_id"]
    node.wait_for(job_id, ("running",), timeout=10)
    node.kill()
    # the process died with the job running and the lease still live
    row = (
        sqlite3.connect(node.data_dir / "node.db")
        .execute("SELECT status, attempts FROM jobs WHERE job_id = ?", (job_id,))
        .fetchone()
    )
    assert row == ("running", 1)
    again = start_node(data_dir=node.data_dir)
    job = again.wait_for(job_id, ("completed", "failed"), timeout=60)
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
    node.wait_for(job_id, ("running",), timeout=10)
    wait_until(lambda: miner_state(node)["current_job"] == job_id, 5, "the miner to start")
    started = time.monotonic()
    assert node.terminate(timeout=20) == 0
    assert time.monotonic() - started < 15
    assert "stopped cleanly" in node.output()
    conn = sqlite3.connect(node.data_dir / "node.db")
    status, attempts, miner = conn.execute(
        "SELECT status, attempts, miner_id FROM jobs WHERE job_id = ?", (job_id,)
    ).fetchone()
    assert (status, attempts, miner) == ("pending", 0, None)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    # the next start serves it
    again = start_node(data_dir=node.data_dir)
    job = again.wait_for(job_id, ("completed",), timeout=90)
    assert job["result"]


def test_cancel_of_a_finished_job_is_409(node: NodeProcess) -> None:
    job = node.submit("Hi", params={"max_tokens": 2})
    node.wait_for(job["job_id"], ("completed",))
    r = node.request("POST", f"/v1/jobs/{job['job_id']}/cancel", node.client_key)
    assert_error(r, 409, "JOB_ALREADY_FINISHED")


def test_heartbeats_keep_a_long_job_alive_past_its_lease(start_node) -> None:
    # One attempt only: had the lease lapsed once, the job would fail with LEASE_EXPIRED.
    node = start_node("--lease-seconds", "1", "--max-attempts", "1")
    job = node.submit(LONG_PROMPT, params=LONG_PARAMS)
    done = node.wait_for(job["job_id"], ("completed", "failed"), timeout=120)
    assert done["status"] == "completed", done
    assert done["attempts"] == 1
    started = datetime.fromisoformat(done["started_at"].replace("Z", "+00:00"))
    completed = datetime.fromisoformat(done["completed_at"].replace("Z", "+00:00"))
    assert (completed - started).total_seconds() > 2  # it really outlived the lease
