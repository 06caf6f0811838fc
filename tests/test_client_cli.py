"""The client commands (`aitbc-node submit|jobs|job|cancel|receipt|stats`), run as real
subprocesses against real nodes, including one under a pseudo-terminal."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import shlex
import struct
import subprocess
import sys
import termios
import threading
import time
from typing import Any

import pytest

from aitbc_node.signing import NodeKey
from tests.conftest import (
    GENERATION_WAIT,
    LONG_PROMPT,
    ROOT,
    SMOL,
    NodeProcess,
    free_port,
    run_cli,
)

JOB_ID = re.compile(r"job-[0-9a-f]{16}")
COMMANDS = ("submit", "jobs", "job", "cancel", "receipt", "stats")
WAIT = GENERATION_WAIT  # seconds a command may take: the box is shared, generation can be slow


def client_env(node: NodeProcess | None = None, **extra: str) -> dict[str, str]:
    """The environment for a client command: no AITBC_* from outside, then `node`'s URL and
    client key as AITBC_URL and AITBC_API_KEY."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AITBC_")}
    if node is not None:
        env.update(AITBC_URL=node.url, AITBC_API_KEY=node.client_key)
    env.update(extra)
    return env


def aitbc(*args: str, env: dict[str, str] | None = None, **kw: Any) -> subprocess.CompletedProcess:
    """Run `aitbc-node ARGS` (by default with no AITBC_* variables) and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "aitbc_node", *args],
        capture_output=True,
        text=True,
        timeout=WAIT,
        cwd=ROOT,
        env=env if env is not None else client_env(),
        **kw,
    )


def flags(node: NodeProcess, key: str | None = None) -> list[str]:
    return ["--url", node.url, "--api-key", key or node.client_key]


def node_pubkey(node: NodeProcess) -> str:
    """The node's public key as its operator reads it from the data directory (pinned)."""
    shown = run_cli("keys", "show", "--json", "--data-dir", str(node.data_dir)).stdout
    return json.loads(shown)["public_key"]


def assert_api_error(proc: subprocess.CompletedProcess, code: str) -> None:
    assert proc.returncode == 3, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == ""
    assert re.fullmatch(rf"aitbc-node: error: .+ \({code}\)(;.*)?\n", proc.stderr), proc.stderr


def completed_job(node: NodeProcess) -> dict[str, Any]:
    proc = aitbc("submit", "Say hello.", "--max-tokens", "16", "--wait", "--json", *flags(node))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# -- submit ------------------------------------------------------------------------------


def test_submit_wait_json_prints_the_completed_job(node: NodeProcess) -> None:
    job = completed_job(node)
    assert JOB_ID.fullmatch(job["job_id"])
    assert job["status"] == "completed"
    assert job["result"].strip()
    assert job["model"] == SMOL  # no --model: the node's first served model
    assert job["receipt_id"].startswith("rcpt-")


def test_submit_wait_prints_the_result_and_nothing_else_when_piped(node: NodeProcess) -> None:
    proc = aitbc(
        "submit", "Name a colour.", "--max-tokens", "12", "--seed", "7", "--wait", *flags(node)
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no progress line: stderr is not a terminal
    assert "\r" not in proc.stdout
    assert proc.stdout.strip()
    # Exactly the text the node holds for the job.
    jobs = node.request("GET", "/v1/jobs", node.client_key, params={"limit": 100}).json()["jobs"]
    job = next(j for j in jobs if j["prompt"] == "Name a colour.")
    assert proc.stdout == job["result"] + "\n"


def test_submit_params_reach_the_job(node: NodeProcess) -> None:
    proc = aitbc(
        "submit",
        "Count to five.",
        "--model",
        "llama3.2",
        "--max-tokens",
        "9",
        "--temperature",
        "0",
        "--top-p",
        "0.5",
        "--seed",
        "42",
        "--stop",
        "\n\n",
        "--min-tokens",
        "3",
        "--ignore-eos",
        "--json",
        *flags(node),
    )
    assert proc.returncode == 0, proc.stderr
    job = json.loads(proc.stdout)
    assert job["model"] == "llama3.2" and job["served_model"] == SMOL
    assert job["params"] == {
        "max_tokens": 9,
        "temperature": 0.0,
        "top_p": 0.5,
        "seed": 42,
        "stop": ["\n\n"],
        "ignore_eos": True,
        "min_tokens": 3,
    }
    node.wait_for(job["job_id"], ("completed",), timeout=WAIT)


def test_submit_reads_the_prompt_from_stdin(node: NodeProcess) -> None:
    proc = aitbc("submit", "-", "--max-tokens", "4", "--json", *flags(node), input="From stdin")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["prompt"] == "From stdin"


def test_submit_prints_the_job_id_and_jobs_and_job_show_it(node: NodeProcess) -> None:
    env = client_env(node)  # URL and key from AITBC_URL and AITBC_API_KEY this time
    proc = aitbc("submit", "Say one word about owls.", "--max-tokens", "8", env=env)
    assert proc.returncode == 0, proc.stderr
    assert JOB_ID.fullmatch(proc.stdout.strip()), proc.stdout
    job_id = proc.stdout.strip()

    table = aitbc("jobs", env=env)
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split() == ["ID", "STATUS", "MODEL", "CREATED", "PROMPT"]
    row = next(r for r in rows if r.startswith(job_id))
    assert SMOL in row and "Say one word about owls." in row

    page = json.loads(aitbc("jobs", "--json", "--limit", "50", env=env).stdout)
    assert job_id in [j["job_id"] for j in page["jobs"]]
    assert set(page) == {"jobs", "next_cursor"}

    shown = aitbc("job", job_id, env=env)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(f"job       {job_id}\n")
    assert re.search(r"^status\s+(pending|running|completed)$", shown.stdout, re.M)
    assert "Say one word about owls." in shown.stdout

    node.wait_for(job_id, ("completed",), timeout=WAIT)
    as_json = json.loads(aitbc("job", job_id, "--json", env=env).stdout)
    assert as_json == node.job(job_id)
    done = aitbc("job", job_id, env=env).stdout
    assert re.search(r"^receipt\s+rcpt-[0-9a-f]{16}$", done, re.M)
    assert "\nresult:\n" in done

    completed = json.loads(aitbc("jobs", "--status", "completed", "--json", env=env).stdout)
    assert completed["jobs"] and {j["status"] for j in completed["jobs"]} == {"completed"}
    one = aitbc("jobs", "--limit", "1", env=env)
    assert len(one.stdout.splitlines()) == 2  # the header and one job
    assert re.fullmatch(r"aitbc-node: more: aitbc-node jobs --limit 1 --cursor \S+\n", one.stderr)


def test_submit_wait_on_a_terminal_shows_the_state_on_one_line(start_node) -> None:
    node = start_node("--no-miner")
    miner_key = node.register_miner("m")
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "aitbc_node", "submit", "Hi", "--model", SMOL, "--wait"],
        stdout=subprocess.PIPE,
        stderr=slave,
        text=True,
        cwd=ROOT,
        env=client_env(node),
    )
    os.close(slave)
    seen = bytearray()

    def read_terminal() -> None:
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: every writer has closed the terminal
                return
            if not chunk:
                return
            seen.extend(chunk)

    reader = threading.Thread(target=read_terminal, daemon=True)
    reader.start()

    def wait_until_shown(text: str, times: int = 1, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while seen.count(text.encode()) < times:
            assert proc.poll() is None, (proc.returncode, bytes(seen))
            assert time.monotonic() < deadline, f"{text!r} never shown: {bytes(seen)!r}"
            time.sleep(0.05)

    try:
        wait_until_shown("pending")
        job_id = JOB_ID.search(seen.decode()).group()
        wait_until_shown(f"\r{job_id}  pending  ", times=3)  # the line ticks while it waits
        r = node.request("POST", f"/v1/jobs/{job_id}/claim", miner_key, json={"miner_id": "m"})
        assert r.status_code == 200, r.text
        wait_until_shown("  running  ")
        r = node.request(
            "POST",
            f"/v1/jobs/{job_id}/complete",
            miner_key,
            json={"miner_id": "m", "result": "Hello from the terminal test"},
        )
        assert r.status_code == 200, r.text
        out, _ = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(WAIT)
    os.close(master)
    assert proc.returncode == 0
    assert out == "Hello from the terminal test\n"  # the answer alone, on stdout
    terminal = bytes(seen).decode()
    lines = terminal.split("\r")
    assert lines[0] == "", terminal  # every update starts with \r: one self-updating line
    assert "\n" not in terminal
    states = [re.fullmatch(rf"{job_id}  (\w+)  (\d+)s *", part) for part in lines[1:-2]]
    assert all(states), terminal
    assert {m.group(1) for m in states} == {"pending", "running"}
    assert [int(m.group(2)) for m in states] == sorted(int(m.group(2)) for m in states)
    assert lines[-2].strip() == "" and lines[-1] == "", terminal  # cleared at the end


class Terminal:
    """A pseudo-terminal for a command's output, read on a thread as the command writes."""

    def __init__(self) -> None:
        self.master, self.slave = pty.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
        self.seen = bytearray()
        self.reader = threading.Thread(target=self._read, daemon=True)

    def start(self) -> None:
        """Once the command has the terminal: close this side's copy and read."""
        os.close(self.slave)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 4096)
            except OSError:  # EIO: every writer has closed the terminal
                return
            if not chunk:
                return
            self.seen.extend(chunk)

    def wait_until_shown(self, text: str, proc: subprocess.Popen) -> None:
        """Until `text` is on the terminal, while `proc` is still running."""
        deadline = time.monotonic() + WAIT
        while text.encode() not in self.seen:
            assert proc.poll() is None, (proc.returncode, bytes(self.seen))
            assert time.monotonic() < deadline, f"{text!r} never shown: {bytes(self.seen)!r}"
            time.sleep(0.05)

    def text(self) -> str:
        """All that was shown once the command has ended, with the terminal's \r\n as \n."""
        self.reader.join(WAIT)
        os.close(self.master)
        return bytes(self.seen).decode().replace("\r\n", "\n")


def new_job_id(node: NodeProcess, before: set[str], proc: subprocess.Popen) -> str:
    """The id of the job a command just submitted: the one not in `before`."""
    deadline = time.monotonic() + WAIT
    while True:
        jobs = node.request("GET", "/v1/jobs", node.client_key).json()["jobs"]
        new = [j["job_id"] for j in jobs if j["job_id"] not in before]
        if new:
            return new[0]
        assert proc.poll() is None and time.monotonic() < deadline, "the job never appeared"
        time.sleep(0.05)


def job_ids(node: NodeProcess) -> set[str]:
    jobs = node.request("GET", "/v1/jobs", node.client_key, params={"limit": 100}).json()["jobs"]
    return {j["job_id"] for j in jobs}


def on_a_terminal(node: NodeProcess, *extra: str) -> tuple[subprocess.Popen, Terminal]:
    """`submit "Hi" --wait` with stdout on a pseudo-terminal (stderr piped)."""
    terminal = Terminal()
    command = ["submit", "Hi", "--model", SMOL, "--wait", *extra]
    proc = subprocess.Popen(
        [sys.executable, "-m", "aitbc_node", *command],
        stdout=terminal.slave,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=client_env(node),
    )
    terminal.start()
    return proc, terminal


SPEED_LINE = r"aitbc-node: (\d+) tokens, (\d+\.\d) tokens/s, first token after (\d+\.\d\d) s\n"


def test_submit_wait_on_a_terminal_prints_the_answer_as_it_streams(start_node) -> None:
    node = start_node("--no-miner")
    miner_key = node.register_miner("m")
    before = job_ids(node)
    proc, terminal = on_a_terminal(node)
    try:
        job_id = new_job_id(node, before, proc)
        r = node.request("POST", f"/v1/jobs/{job_id}/claim", miner_key, json={"miner_id": "m"})
        assert r.status_code == 200, r.text
        for text in ("Hello", " from"):
            r = node.request(
                "POST",
                f"/v1/jobs/{job_id}/progress",
                miner_key,
                json={"miner_id": "m", "text": text},
            )
            assert r.status_code == 200, r.text
            # On the terminal while the job still runs (and the command still waits).
            terminal.wait_until_shown(text, proc)
        r = node.request(
            "POST",
            f"/v1/jobs/{job_id}/complete",
            miner_key,
            json={
                "miner_id": "m",
                "result": "Hello from the stream",
                "usage": {"prompt_tokens": 5, "completion_tokens": 4},
            },
        )
        assert r.status_code == 200, r.text
        _, err = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert terminal.text() == "Hello from the stream\n"  # as piped, but as it came
    assert re.fullmatch(SPEED_LINE, err), err
    assert re.fullmatch(SPEED_LINE, err).group(1) == "4"

    # Streaming keeps the exit statuses: 5 when --timeout runs out, 1 for a cancelled job.
    proc, terminal = on_a_terminal(node, "--timeout", "0.5")
    _, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 5, err
    assert "gave up waiting after 0.5 s" in err
    assert terminal.text() == ""
    before = job_ids(node)
    proc, terminal = on_a_terminal(node)
    job_id = new_job_id(node, before, proc)
    assert node.request("POST", f"/v1/jobs/{job_id}/cancel", node.client_key).status_code == 200
    _, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 1
    assert err == f"aitbc-node: job {job_id} was cancelled\n"
    assert terminal.text() == ""


def test_submit_wait_streams_the_models_answer_to_a_terminal(node: NodeProcess) -> None:
    terminal = Terminal()
    before = job_ids(node)
    submit = ["submit", LONG_PROMPT, "--max-tokens", "40", "--temperature", "0", "--wait"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "aitbc_node", *submit],
        stdout=terminal.slave,
        stderr=terminal.slave,  # as a user sees it: both on the one terminal
        cwd=ROOT,
        env=client_env(node),
    )
    terminal.start()
    try:
        assert proc.wait(WAIT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    (job_id,) = job_ids(node) - before
    job = node.job(job_id)
    assert job["status"] == "completed"
    shown = terminal.text()
    # A status line (\r..., cleared) may come first if the first token was slow.
    shown = shown[shown.rfind("\r") + 1 :]
    assert shown.startswith(job["result"] + "\n"), shown
    speed = re.fullmatch(SPEED_LINE, shown.removeprefix(job["result"] + "\n"))
    assert speed, shown
    assert int(speed.group(1)) == job["usage"]["completion_tokens"]


def test_submit_wait_exits_1_when_the_job_fails_or_is_cancelled(start_node) -> None:
    node = start_node("--no-miner")
    miner_key = node.register_miner("m")
    env = client_env(node)

    def started(*extra: str) -> tuple[subprocess.Popen, str]:
        before = {
            j["job_id"] for j in node.request("GET", "/v1/jobs", node.client_key).json()["jobs"]
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", "aitbc_node", "submit", "x", "--wait", *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            jobs = node.request("GET", "/v1/jobs", node.client_key).json()["jobs"]
            new = [j["job_id"] for j in jobs if j["job_id"] not in before]
            if new:
                return proc, new[0]
            time.sleep(0.05)
        proc.kill()
        raise AssertionError("the job never appeared")

    proc, job_id = started("--json")
    node.request("POST", f"/v1/jobs/{job_id}/claim", miner_key, json={"miner_id": "m"})
    node.request(
        "POST", f"/v1/jobs/{job_id}/fail", miner_key, json={"miner_id": "m", "error": "no GPU"}
    )
    out, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 1, err
    assert json.loads(out)["status"] == "failed"
    assert err == f"aitbc-node: job {job_id} failed: no GPU (MINER_ERROR)\n"

    proc, job_id = started()
    assert node.request("POST", f"/v1/jobs/{job_id}/cancel", node.client_key).status_code == 200
    out, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 1
    assert out == ""
    assert err == f"aitbc-node: job {job_id} was cancelled\n"

    # --timeout: gives up waiting (exit 5); the job itself goes on.
    proc = aitbc("submit", "y", "--wait", "--timeout", "0.5", env=env)
    assert proc.returncode == 5, proc.stderr
    job_id = JOB_ID.search(proc.stderr).group()
    assert "gave up waiting after 0.5 s" in proc.stderr
    assert node.job(job_id)["status"] == "pending"


# -- jobs ----------------------------------------------------------------------------------


def test_the_pager_hint_keeps_the_filters(start_node) -> None:
    node = start_node("--no-miner")
    miner_key = node.register_miner("m")
    completed = []
    for n in range(3):
        job_id = node.submit(f"job {n}")["job_id"]
        node.request("POST", f"/v1/jobs/{job_id}/claim", miner_key, json={"miner_id": "m"})
        r = node.request(
            "POST",
            f"/v1/jobs/{job_id}/complete",
            miner_key,
            json={"miner_id": "m", "result": f"done {n}"},
        )
        assert r.status_code == 200, r.text
        completed.append(job_id)
    node.submit("still pending")

    first = aitbc("jobs", "--status", "completed", "--limit", "2", *flags(node))
    assert first.returncode == 0, first.stderr
    hint = re.fullmatch(r"aitbc-node: more: (.+)\n", first.stderr)
    assert hint, first.stderr
    command = shlex.split(hint.group(1))
    assert command[:2] == ["aitbc-node", "jobs"]
    assert node.client_key not in hint.group(1)  # never the secret
    cursor = command[command.index("--cursor") + 1]
    assert command[2:] == [
        "--url",
        node.url,
        "--status",
        "completed",
        "--limit",
        "2",
        "--cursor",
        cursor,
    ]
    # The hinted command, as a user pastes it (the key from the environment), goes on.
    second = aitbc(*command[1:], env=client_env(node))
    assert second.returncode == 0, second.stderr
    assert second.stderr == ""  # the last page: no hint
    shown = [line.split()[0] for out in (first, second) for line in out.stdout.splitlines()[1:]]
    assert sorted(shown) == sorted(completed)  # every completed job once, and nothing else


# -- cancel --------------------------------------------------------------------------------


def test_cancel_and_cancel_again(start_node) -> None:
    node = start_node("--no-miner", "--accept-unserved-models")
    proc = aitbc("submit", "never served", "--model", SMOL, *flags(node))
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip()
    assert node.job(job_id)["status"] == "pending"

    cancelled = aitbc("cancel", job_id, *flags(node))
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout == f"cancelled {job_id}\n"
    assert node.job(job_id)["status"] == "cancelled"
    other = aitbc("submit", "also never served", "--model", SMOL, *flags(node)).stdout.strip()
    as_json = aitbc("cancel", other, "--json", *flags(node))
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == node.job(other)
    assert node.job(other)["status"] == "cancelled"

    again = aitbc("cancel", job_id, *flags(node))
    assert_api_error(again, "JOB_ALREADY_FINISHED")
    assert f"job {job_id} is already cancelled" in again.stderr

    # The node serves no model, so there is no default one to pick.
    assert_api_error(aitbc("submit", "which model?", *flags(node)), "UNKNOWN_MODEL")
    proc = aitbc("cancel", "job-0000000000000000", "--json", *flags(node))
    assert_api_error(proc, "JOB_NOT_FOUND")


# -- receipt ------------------------------------------------------------------------------


def test_receipt_verify_valid_and_with_a_wrong_key(node: NodeProcess) -> None:
    job = completed_job(node)
    pubkey = node_pubkey(node)
    receipt_id = job["receipt_id"]

    shown = aitbc("receipt", receipt_id, "--url", node.url)  # public: no key needed
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(f"receipt    {receipt_id}\njob        {job['job_id']}\n")
    as_json = json.loads(aitbc("receipt", receipt_id, "--json", "--url", node.url).stdout)
    assert as_json == node.request("GET", f"/v1/receipts/{receipt_id}").json()

    valid = aitbc("receipt", receipt_id, "--verify", "--pubkey", pubkey, "--url", node.url)
    assert valid.returncode == 0, valid.stderr
    assert valid.stderr == ""
    assert valid.stdout.endswith(f"\nVALID: {receipt_id} is signed by {pubkey[:16]}...\n")

    # By job id, with the pinned key from the environment.
    env = client_env(node, AITBC_NODE_PUBKEY=pubkey)
    by_job = aitbc("receipt", job["job_id"], "--verify", "--json", env=env)
    assert by_job.returncode == 0, by_job.stderr
    verdict = json.loads(by_job.stdout)
    assert verdict["receipt"] == as_json
    assert verdict["verification"] == {
        "valid": True,
        "reasons": [],
        "public_key": pubkey,
        "public_key_from": "AITBC_NODE_PUBKEY",
    }

    other = NodeKey.generate().public_key_hex
    wrong = aitbc("receipt", receipt_id, "--verify", "--pubkey", other, "--url", node.url)
    assert wrong.returncode == 1
    assert f"\nINVALID: {receipt_id}" in wrong.stdout
    assert "signature does not verify with the trusted key" in wrong.stdout

    malformed = aitbc("receipt", receipt_id, "--verify", "--pubkey", "abc", "--url", node.url)
    assert malformed.returncode == 2
    assert "64 hex characters" in malformed.stderr


def test_receipt_verify_without_a_pinned_key_says_it_trusts_the_node(node: NodeProcess) -> None:
    job = completed_job(node)
    proc = aitbc("receipt", job["job_id"], "--verify", env=client_env(node))
    assert proc.returncode == 0, proc.stderr
    assert "\nVALID: " in proc.stdout
    pubkey = node_pubkey(node)
    assert "trust on first use" in proc.stderr
    assert pubkey in proc.stderr  # the key it used, to pin
    assert "--pubkey" in proc.stderr and "AITBC_NODE_PUBKEY" in proc.stderr


def test_receipt_of_a_job_that_has_none(start_node) -> None:
    node = start_node("--no-miner", "--accept-unserved-models")
    job_id = node.submit("pending forever")["job_id"]
    assert_api_error(aitbc("receipt", job_id, *flags(node)), "RECEIPT_NOT_FOUND")
    assert_api_error(
        aitbc("receipt", "rcpt-0000000000000000", "--url", node.url), "RECEIPT_NOT_FOUND"
    )


# -- stats, errors, help ------------------------------------------------------------------


def test_stats(node: NodeProcess) -> None:
    proc = aitbc("stats", "--json", "--url", node.url)
    assert proc.returncode == 0, proc.stderr
    stats = json.loads(proc.stdout)
    assert stats["served_models"] == [SMOL]
    assert stats["jobs"]["total"] >= 0
    readable = aitbc("stats", "--url", node.url)
    assert readable.returncode == 0, readable.stderr
    assert re.search(r"^jobs\s+\d+: \d+ pending, \d+ running, ", readable.stdout, re.M)
    assert re.search(rf"^models\s+{SMOL}$", readable.stdout, re.M)
    # A URL without the /api base: the node's 404, with a hint.
    wrong_base = aitbc("stats", "--url", node.url.removesuffix("/api"))
    assert_api_error(wrong_base, "NOT_FOUND")
    assert f"is {node.url.removesuffix('/api')} the API base" in wrong_base.stderr


def test_a_bad_key_exits_3(node: NodeProcess) -> None:
    for command in (["jobs"], ["submit", "hi"], ["job", "job-0000000000000000"]):
        proc = aitbc(*command, "--url", node.url, "--api-key", "ait_client_wrong")
        assert_api_error(proc, "INVALID_API_KEY")
    assert_api_error(aitbc("job", "job-0000000000000000", *flags(node)), "JOB_NOT_FOUND")


def test_an_unreachable_node_exits_4() -> None:
    # Each gives up after its --retries (2 by default; the client's tests count the tries).
    url = f"http://127.0.0.1:{free_port()}/api"
    for command in (["stats"], ["submit", "hi", "--model", SMOL], ["jobs"]):
        proc = aitbc(*command, "--url", url, "--api-key", "k")
        assert proc.returncode == 4, proc.stderr
        assert proc.stdout == ""
        assert proc.stderr.startswith(f"aitbc-node: error: cannot reach the node at {url}: ")
        assert proc.stderr.endswith("(UNREACHABLE)\n")


def test_usage_errors_exit_2(node: NodeProcess) -> None:
    no_key = aitbc("jobs", "--url", node.url)
    assert no_key.returncode == 2
    assert "no API key" in no_key.stderr and "AITBC_API_KEY" in no_key.stderr
    assert aitbc("submit", "hi", "--max-tokens", "many", *flags(node)).returncode == 2
    assert aitbc("jobs", "--status", "sleeping", *flags(node)).returncode == 2
    assert aitbc("job", *flags(node)).returncode == 2  # no JOB_ID
    bad_url = aitbc("stats", "--url", "127.0.0.1:8080/api")
    assert bad_url.returncode == 2 and "http://" in bad_url.stderr


@pytest.mark.parametrize(
    ("args", "hint"),
    [
        (["submit", "hi", "--max-token", "5"], "--max-tokens"),
        (["submit", "hi", "--wiat"], "--wait"),
        (["jobs", "--stauts", "completed"], "--status"),
        (["job", "job-0000000000000000", "--jsno"], "--json"),
        (["receipt", "rcpt-0000000000000000", "--verfy"], "--verify"),
        (["stats", "--url=http://127.0.0.1:1/api", "--retires=0"], "--retries"),
    ],
)
def test_a_flag_typo_shows_the_commands_usage_and_the_closest_flag(
    args: list[str], hint: str
) -> None:
    proc = aitbc(*args, "--api-key", "k")
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    command = args[0]
    assert proc.stderr.startswith(f"usage: aitbc-node {command} "), proc.stderr
    last = proc.stderr.splitlines()[-1]
    assert last.startswith(f"aitbc-node {command}: error: unrecognized arguments: "), last
    assert last.endswith(f" (did you mean {hint}?)"), last


def test_an_unknown_flag_with_no_close_one_gets_no_guess() -> None:
    proc = aitbc("submit", "hi", "--xyzzy", "--api-key", "k")
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage: aitbc-node submit ")
    assert proc.stderr.endswith("aitbc-node submit: error: unrecognized arguments: --xyzzy\n")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_client_command_has_help(command: str) -> None:
    proc = aitbc(command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: aitbc-node {command} ")
    text = " ".join(proc.stdout.split())
    assert "Exit status: 0 success;" in text and "4 the node could not be reached" in text
    for flag in ("--url", "--api-key", "--json", "$AITBC_URL", "$AITBC_API_KEY"):
        assert flag in text


def test_the_top_level_help_lists_the_client_commands() -> None:
    proc = aitbc("--help")
    assert proc.returncode == 0
    for command in COMMANDS:
        assert re.search(rf"^\s+{command}\s+\S", proc.stdout, re.M), command
