"""Faults stay local: a job cannot kill the built-in miner, a full disk answers 507 and heals,
and every background loop is supervised and reports its state."""

from __future__ import annotations

import itertools
import json
import os
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest

from aitbc_node.background import Backoff, Loop, Supervised
from tests.conftest import SMOL, NodeProcess, run_cli
from tests.test_jobs_api import assert_error

# Generous bounds on events: a busy 2-core machine runs the model slowly.
JOB_TIMEOUT = 300
SHORT = {"max_tokens": 4, "temperature": 0}
# Greedy SmolLM2 keeps counting until max_tokens runs out: a job that runs for a while.
LONG_PROMPT = "List the numbers from 1 to 1000 separated by commas: 1, 2, 3,"
LONG_PARAMS = {"max_tokens": 1000, "temperature": 0}
PARAMS = '{"max_tokens": 4, "temperature": 0, "top_p": 0.95, "seed": null, "stop": []}'
# Two jobs no miner can finish, as rows written before the API checked such text:
POISON = {
    # params whose stop string is a lone UTF-16 surrogate (valid JSON, no UTF-8 form): the
    # job runs, then hashing its request for the receipt raises.
    "surrogate": ("'Say hi.'", PARAMS.replace("[]", '["\\ud800"]')),
    # a prompt of bytes that are not UTF-8: the row cannot even be read back to claim it.
    "bad-utf8": ("CAST(X'5361792068692EEDA080' AS TEXT)", PARAMS),
}


def wait_until(predicate, timeout: float, what: str, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)


def health(node: NodeProcess) -> dict:
    r = node.request("GET", "/health")
    assert r.status_code == 200, r.text
    return r.json()


def job_row(data_dir: Path, job_id: str) -> dict:
    """A job's state read straight from the store (a poison job may not survive the API's
    views, nor its prompt a read)."""
    conn = sqlite3.connect(data_dir / "node.db", timeout=30)
    conn.row_factory = sqlite3.Row
    try:
        row = conn.execute(
            "SELECT status, error_code, error, attempts FROM jobs WHERE job_id = ?", (job_id,)
        ).fetchone()
        return dict(row) if row else {}
    finally:
        conn.close()


def insert_poison_jobs(data_dir: Path, suffix: str) -> list[str]:
    """Write one pending job of each poison kind straight into a stopped node's store."""
    conn = sqlite3.connect(data_dir / "node.db")
    job_ids = []
    try:
        with conn:
            (client,) = conn.execute(
                "SELECT identity FROM api_keys WHERE role = 'client' ORDER BY created_ms LIMIT 1"
            ).fetchone()
            for kind, (prompt_sql, params) in POISON.items():
                job_ids.append(f"job-poison-{kind}-{suffix}")
                conn.execute(
                    "INSERT INTO jobs (job_id, client, prompt, model, served_model, params,"
                    f" status, created_ms) VALUES (?, ?, {prompt_sql}, ?, ?, ?, 'pending', ?)",
                    (job_ids[-1], client, SMOL, SMOL, params, int(time.time() * 1000)),
                )
    finally:
        conn.close()
    return job_ids


def wait_for_poison(data_dir: Path, job_ids: list[str]) -> None:
    """Each job ends failed `POISON_JOB`, after its second fault."""
    for job_id in job_ids:
        wait_until(
            lambda job_id=job_id: job_row(data_dir, job_id)["status"] not in ("pending", "running"),
            JOB_TIMEOUT,
            f"{job_id} to end",
        )
        row = job_row(data_dir, job_id)
        assert row["status"] == "failed" and row["error_code"] == "POISON_JOB", row
        assert "broke the built-in miner 2 times" in row["error"], row


def assert_miner_serves(node: NodeProcess) -> None:
    """The built-in miner is alive: it completes a normal job, and health says so."""
    job = node.submit("Say yes.", params=SHORT)
    done = node.wait_for(job["job_id"], ("completed", "failed"), timeout=JOB_TIMEOUT)
    assert done["status"] == "completed", done
    assert health(node)["miner"]["state"] in ("idle", "busy"), health(node)
    # The job is seen completed a moment before the miner counts it as a success.
    wait_until(
        lambda: health(node)["loops"]["miner"]["state"] == "running", 60, "the miner's report"
    )


def test_a_poison_job_is_failed_and_the_miner_lives_on(start_node, tmp_path: Path) -> None:
    flags = ("--max-tokens-limit", "64")
    data_dir = tmp_path / "data"
    start_node(*flags, data_dir=data_dir).stop()
    first = insert_poison_jobs(data_dir, "1")
    node = start_node(*flags, data_dir=data_dir)
    wait_for_poison(data_dir, first)
    assert "CanonicalError" in job_row(data_dir, first[0])["error"]
    assert "UnicodeDecodeError" in job_row(data_dir, first[1])["error"]
    assert health(node)["loops"]["miner"]["last_error"]
    assert_miner_serves(node)

    # The same after a restart, with the first poison jobs still in the store.
    node.stop()
    second = insert_poison_jobs(data_dir, "2")
    again = start_node(*flags, data_dir=data_dir)
    wait_for_poison(data_dir, second)
    assert_miner_serves(again)
    assert all(job_row(data_dir, j)["error_code"] == "POISON_JOB" for j in first)


def test_a_job_that_crashes_the_node_twice_is_failed_poison_job(start_node) -> None:
    node = start_node()
    job_id = node.submit(LONG_PROMPT, params=LONG_PARAMS)["job_id"]
    for crash in (1, 2):
        node.wait_for(job_id, ("running",), timeout=JOB_TIMEOUT)
        node.kill()  # the process dies with the job in hand, as if the job had killed it
        assert job_row(node.data_dir, job_id)["status"] == "running", crash
        node = start_node(data_dir=node.data_dir)
    job = node.job(job_id)
    assert job["status"] == "failed" and job["error_code"] == "POISON_JOB", job
    assert "died" in job["error"]
    assert_miner_serves(node)


# -- a full disk ---------------------------------------------------------------------------


def mount_tmpfs(path: Path, size: str) -> None:
    """Mount a small tmpfs at `path`, or skip saying why that is impossible here."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs for the disk-full test needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


def fill(path: Path) -> None:
    """Write `path` until the file system has no byte left."""
    with open(path, "wb", buffering=0) as f:
        for chunk in (1 << 20, 1 << 12, 1):
            block = b"\0" * chunk
            while True:
                try:
                    f.write(block)
                except OSError:
                    break


def test_a_full_disk_answers_507_and_the_node_heals(start_node, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"  # the server's log lives beside it, off the small disk
    mount_tmpfs(data_dir, "8m")
    node: NodeProcess | None = None
    try:
        node = start_node("--lease-seconds", "5", data_dir=data_dir)
        assert_miner_serves(node)
        held = node.submit(LONG_PROMPT, params={"max_tokens": 150, "temperature": 0})["job_id"]
        node.wait_for(held, ("running",), timeout=JOB_TIMEOUT)
        filler = data_dir / "filler"
        fill(filler)
        # Big prompts make every commit need new pages, so the WAL must grow: it cannot.
        answers = []
        for i in range(200):
            r = node.request(
                "POST",
                "/v1/jobs",
                node.client_key,
                json={"prompt": f"{i} " + "x" * 60_000, "model": SMOL, "params": SHORT},
            )
            answers.append(r.status_code)
            if r.status_code != 201:
                break
        assert set(answers) <= {201, 507}, answers
        full = assert_error(r, 507, "STORAGE_FULL")
        assert "disk" in full["detail"]
        assert int(r.headers["Retry-After"]) > 0
        report = health(node)
        assert report["status"] == "ok" and report["miner"]["state"] != "stopped", report
        # The miner finishes the job in hand but cannot record it: the job goes back, the
        # miner lives on and says why it is waiting.
        wait_until(
            lambda: "disk" in (health(node)["loops"]["miner"]["last_error"] or ""),
            JOB_TIMEOUT,
            "the miner to meet the full disk",
        )
        assert health(node)["miner"]["state"] != "stopped"
        assert set(report["loops"]) == {
            "miner",
            "lease_reaper",
            "block_sealer",
            "webhook_dispatcher",
        }
        # The CLI on the full disk: one clear line, no traceback.
        keys = run_cli(
            "keys",
            "create",
            "--role",
            "client",
            "--name",
            "late",
            "--data-dir",
            str(data_dir),
            check=False,
        )
        assert keys.returncode != 0, keys.stdout
        assert "Traceback" not in keys.stderr
        assert len(keys.stderr.strip().splitlines()) == 1, keys.stderr
        assert "disk" in keys.stderr
        assert node.proc is not None and node.proc.poll() is None

        filler.unlink()
        assert node.wait_for(held, ("completed", "failed"), timeout=JOB_TIMEOUT)["result"]
        assert_miner_serves(node)
        node.stop()
        verified = run_cli("verify", "--data-dir", str(data_dir), check=False)
        assert verified.returncode == 0 and verified.stdout.startswith("VALID"), (
            verified.stdout + verified.stderr
        )
    finally:
        if node is not None:
            node.stop()
        subprocess.run(["umount", str(data_dir)], check=False)


# -- supervision ---------------------------------------------------------------------------


def test_a_loop_whose_step_raises_retries_and_reports_it() -> None:
    calls = []

    def step() -> float:
        calls.append(time.monotonic())
        if len(calls) <= 3:
            raise RuntimeError(f"pass {len(calls)} broke")
        return 0.01

    loop = Loop("test-loop", step, retry_seconds=0.05, max_retry_seconds=0.2)
    loop.start()
    try:
        wait_until(lambda: len(calls) >= 6, 30, "the loop to carry on after failures")
        status = loop.status()
        assert status["state"] == "running" and status["failures"] == 0, status
        assert status["last_error"] == "RuntimeError: pass 3 broke" and status["last_error_at"]
        # The retries backed off, doubling: at least 0.05, 0.1 and 0.2 s after each failure.
        gaps = [b - a for a, b in itertools.pairwise(calls[:4])]
        assert all(
            gap >= 0.95 * least for gap, least in zip(gaps, (0.05, 0.1, 0.2), strict=True)
        ), gaps
    finally:
        loop.stop()
    assert loop.status()["state"] == "stopped"


def test_a_dead_thread_is_restarted_and_reported_stopped_meanwhile() -> None:
    class Crash(BaseException):
        """Something that ends a thread whatever it catches."""

    runs = []
    release = threading.Event()

    def body() -> None:
        runs.append(1)
        if len(runs) == 1:
            raise Crash("the loop itself broke")
        release.wait()

    supervised = Supervised("test-supervised", body, backoff=Backoff(0.5, 0.5))
    supervised.start()
    try:
        wait_until(lambda: supervised.status()["state"] == "stopped", 30, "the crash")
        status = supervised.status()
        assert "Crash: the loop itself broke" in status["reason"], status
        wait_until(lambda: supervised.running, 30, "the restart")
        status = supervised.status()
        assert status["state"] == "running" and status["restarts"] == 1, status
        assert status["last_error"] == "Crash: the loop itself broke"
    finally:
        supervised.stop_event.set()
        release.set()
        supervised.join(10)
    assert len(runs) == 2


def test_health_reports_every_loop(start_node) -> None:
    node = start_node("--max-tokens-limit", "64")
    report = health(node)
    assert set(report["loops"]) == {"miner", "lease_reaper", "block_sealer", "webhook_dispatcher"}
    for name, loop in report["loops"].items():
        assert loop["state"] == "running", (name, loop)
        assert loop["last_error"] is None and loop["restarts"] == 0, (name, loop)
    assert report["loops"]["webhook_dispatcher"]["senders_running"] >= 1
    # The fields clients and the explorer page read are all still there.
    assert {"status", "version", "models", "default_model", "miner", "node"} <= set(report)
    json.dumps(report)
    coordinator = start_node("--no-miner")
    loops = health(coordinator)["loops"]
    assert "miner" not in loops and loops["lease_reaper"]["state"] == "running"
