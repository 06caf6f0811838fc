"""Benchmark: how soon long polls answer, and how soon processes stop, on this machine.

    .venv/bin/python tests/bench/wait_latency.py [--runs 20] [--stops 3]

The tests check that these things happen (a long poll answers when its job ends, a stop cuts a
wait short); this measures how soon, against the budgets the tests once asserted:

1. Job long poll: `GET /v1/jobs/{id}?wait=60` parked on a running job; from sending the
   completion to the poll's answer (budget 50 ms).
2. `CoordinatorClient.wait_for_job` on a running job: from sending the completion to the call
   returning (budget 50 ms).
3. Work long poll: `GET /v1/jobs/available?wait=60` parked for a miner; from sending a new job
   to the poll's answer (budget 100 ms).
4. Shutdown with a parked long poll: from SIGTERM to the poll's answer, and to the exit
   (budget 5 s, where the poll asked for 60 s).
5. An idle remote miner (`aitbc-node miner`) in its 30 s long poll: from SIGTERM to its exit
   (budget 5 s).
6. A node whose built-in miner is generating: from SIGTERM to its exit (budget 15 s).

--runs repeats 1-3, --stops repeats 4-6 (each of those starts a process). It starts its own
nodes on free ports with temporary data directories. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from aitbc_node.client import CoordinatorClient
from tests.conftest import LONG_PARAMS, LONG_PROMPT, SMOL, MinerProcess, NodeProcess
from tests.test_realtime import answer, send_long_poll


def report(name: str, ms: list[float], budget_ms: float) -> None:
    worst = max(ms)
    verdict = "within" if worst <= budget_ms else "OVER"
    print(
        f"{name}: median {statistics.median(ms):.1f} ms, max {worst:.1f} ms over {len(ms)} runs"
        f" ({verdict} the former budget of {budget_ms:g} ms)"
    )


def claimed_job(node: NodeProcess, miner_key: str, prompt: str) -> str:
    job_id = node.submit(prompt)["job_id"]
    r = node.request("POST", f"/v1/jobs/{job_id}/claim", miner_key, json={"miner_id": "m"})
    assert r.status_code == 200, r.text
    return job_id


def complete(node: NodeProcess, miner_key: str, job_id: str) -> None:
    r = node.request(
        "POST", f"/v1/jobs/{job_id}/complete", miner_key, json={"miner_id": "m", "result": "ok"}
    )
    assert r.status_code == 200, r.text


def job_poll_ms(node: NodeProcess, miner_key: str, runs: int) -> list[float]:
    out = []
    for i in range(runs):
        job_id = claimed_job(node, miner_key, f"poll {i}")
        poll = send_long_poll(node, f"/v1/jobs/{job_id}", node.client_key, wait=60)
        sent = time.perf_counter()
        complete(node, miner_key, job_id)
        status, job = answer(poll)
        out.append((time.perf_counter() - sent) * 1000)
        assert status == 200 and job["status"] == "completed", job
    return out


def client_wait_ms(node: NodeProcess, miner_key: str, runs: int) -> list[float]:
    out = []
    with CoordinatorClient(node.url, node.client_key) as client:
        asked = threading.Event()
        client.client.event_hooks["request"].append(lambda _request: asked.set())
        for i in range(runs):
            job_id = claimed_job(node, miner_key, f"client {i}")
            asked.clear()
            returned: list[float] = []

            def wait(job_id: str = job_id, returned: list[float] = returned) -> None:
                client.wait_for_job(job_id, timeout=120)
                returned.append(time.perf_counter())

            waiter = threading.Thread(target=wait)
            waiter.start()
            asked.wait(60)
            node.request("GET", "/health")  # answered after the long poll arrived
            sent = time.perf_counter()
            complete(node, miner_key, job_id)
            waiter.join(120)
            out.append((returned[0] - sent) * 1000)
    return out


def work_poll_ms(node: NodeProcess, miner_key: str, runs: int) -> list[float]:
    out = []
    for i in range(runs):
        poll = send_long_poll(node, "/v1/jobs/available", miner_key, miner_id="m", wait=60)
        sent = time.perf_counter()
        job_id = node.submit(f"work {i}")["job_id"]
        status, offer = answer(poll)
        out.append((time.perf_counter() - sent) * 1000)
        assert status == 200 and [j["job_id"] for j in offer["jobs"]] == [job_id], offer
        r = node.request("POST", f"/v1/jobs/{job_id}/claim", miner_key, json={"miner_id": "m"})
        assert r.status_code == 200, r.text
        complete(node, miner_key, job_id)
    return out


def shutdown_ms(tmp: Path, stops: int) -> tuple[list[float], list[float]]:
    answered, exited = [], []
    for i in range(stops):
        node = NodeProcess(tmp / f"shutdown{i}", "--no-miner", "--accept-unserved-models")
        node.start()
        try:
            job_id = node.submit("never served")["job_id"]
            poll = send_long_poll(node, f"/v1/jobs/{job_id}", node.client_key, wait=60)
            sent = time.perf_counter()
            node.proc.send_signal(signal.SIGTERM)
            answer(poll)
            answered.append((time.perf_counter() - sent) * 1000)
            node.proc.wait(120)
            exited.append((time.perf_counter() - sent) * 1000)
        finally:
            node.stop()
    return answered, exited


def idle_miner_ms(tmp: Path, stops: int) -> list[float]:
    out = []
    coordinator = NodeProcess(tmp / "coordinator", "--no-miner").start()
    try:
        for i in range(stops):
            miner = MinerProcess(coordinator, f"idle-{i}", tmp)
            try:
                miner.wait_registered(coordinator)
                time.sleep(1)  # into its long poll (a benchmark may nap; a test may not)
                out.append(sigterm_ms(miner.proc))
            finally:
                miner.stop()
    finally:
        coordinator.stop()
    return out


def sigterm_ms(proc: subprocess.Popen) -> float:
    """Milliseconds from SIGTERM to `proc`'s exit."""
    sent = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    proc.wait(120)
    return (time.perf_counter() - sent) * 1000


def busy_node_ms(tmp: Path, stops: int) -> list[float]:
    out = []
    for i in range(stops):
        node = NodeProcess(tmp / f"busy{i}").start()
        try:
            job_id = node.submit(LONG_PROMPT, params=LONG_PARAMS)["job_id"]
            node.wait_for_text(job_id)
            out.append(sigterm_ms(node.proc))
        finally:
            node.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--stops", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        unlimited = ("--rate", "client=0", "--rate", "miner=0", "--rate", "public=0")
        node = NodeProcess(tmp / "polls", "--no-miner", *unlimited).start()
        try:
            miner_key = node.register_miner("m", [SMOL])
            job_ms = job_poll_ms(node, miner_key, args.runs)
            client_ms = client_wait_ms(node, miner_key, args.runs)
            work_ms = work_poll_ms(node, miner_key, args.runs)
        finally:
            node.stop()
        answered, exited = shutdown_ms(tmp, args.stops)
        idle_ms = idle_miner_ms(tmp, args.stops)
        busy_ms = busy_node_ms(tmp, args.stops)

    report("1. job long poll, completion -> answer", job_ms, 50)
    report("2. wait_for_job, completion -> return", client_ms, 50)
    report("3. work long poll, new job -> answer", work_ms, 100)
    report("4. SIGTERM -> parked long poll answered", answered, 5000)
    report("4. SIGTERM -> node exited", exited, 5000)
    report("5. SIGTERM -> idle remote miner exited", idle_ms, 5000)
    report("6. SIGTERM -> generating node exited", busy_ms, 15000)


if __name__ == "__main__":
    main()
