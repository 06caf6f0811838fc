"""Shared test fixtures: real node processes on real ports with the real embedded model.

`NodeProcess` starts `python -m aitbc_node serve` in a subprocess with its own data directory,
waits until `/api/health` answers, and reads the keys the node wrote on first start.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from aitbc_node.models import EMBEDDED_NAME
from aitbc_node.store import Store

SMOL = EMBEDDED_NAME
ROOT = Path(__file__).resolve().parent.parent

# A generation that is long by its token count, not by the machine's speed: given this prompt,
# the greedy embedded model keeps listing numbers until max_tokens runs out (checked to 2000
# tokens; "Count from 1 to 10000, one number per line:" stops by itself at 20). Tests that
# interrupt a generation use all of it; those that wait for the end ask for fewer tokens.
LONG_PROMPT = "List the numbers from 1 to 1000 separated by commas: 1, 2, 3,"
LONG_TOKENS = 2000
LONG_PARAMS = {"max_tokens": LONG_TOKENS, "temperature": 0, "seed": 7}
# How long a test waits for an event that needs the model to generate: an upper bound for a
# slow or busy machine, never a budget that a test asserts.
GENERATION_WAIT = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, timeout: float = 120) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the `aitbc-node` command in a subprocess."""
    proc = subprocess.run(
        [sys.executable, "-m", "aitbc_node", *args],
        capture_output=True,
        text=True,
        timeout=300,  # a bound, not a budget: a loaded box starts Python slowly
        cwd=ROOT,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"aitbc-node {' '.join(args)} failed:\n{proc.stderr}")
    return proc


class NodeProcess:
    """A node server in a subprocess, and an HTTP client for it."""

    def __init__(
        self,
        data_dir: Path,
        *args: str,
        port: int | None = None,
        env: dict[str, str] | None = None,
        port_flag: bool = True,
    ) -> None:
        self.data_dir = data_dir
        self.args = list(args)
        self.port = port or free_port()
        # Extra environment for the process; without `port_flag` no --port is passed, so the
        # port comes from AITBC_PORT or a config file (which must then say `self.port`).
        self.env = env or {}
        self.port_flag = port_flag
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.proc: subprocess.Popen[str] | None = None
        # Above the 30 s long polls of `wait_for`, with room for a loaded machine.
        self.http = httpx.Client(timeout=120)
        self.log_path = data_dir.parent / f"{data_dir.name}-server.log"

    def start(self, timeout: float = 300) -> NodeProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "a")  # noqa: SIM115 - the server process owns it
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "aitbc_node",
                "serve",
                *(["--port", str(self.port)] if self.port_flag else []),
                "--data-dir",
                str(self.data_dir),
                *self.args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
            env={**os.environ, **self.env},
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited at start:\n{self.output()}")
            try:
                if self.http.get(f"{self.url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        else:
            raise AssertionError(f"node did not answer in {timeout}s:\n{self.output()}")
        self.credentials = json.loads((self.data_dir / "credentials.json").read_text())
        return self

    def output(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    @property
    def client_key(self) -> str:
        return self.credentials["client"]

    @property
    def admin_key(self) -> str:
        return self.credentials["admin"]

    def kill(self) -> None:
        """SIGKILL: the process dies with no chance to clean up."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(60)

    def terminate(self, timeout: float = 120) -> int:
        """SIGTERM and wait for the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    # -- HTTP helpers --------------------------------------------------------------------

    def request(self, method: str, path: str, key: str | None = None, **kw: Any) -> httpx.Response:
        headers = kw.pop("headers", {})
        if key is not None:
            headers["X-Api-Key"] = key
        return self.http.request(method, f"{self.url}{path}", headers=headers, **kw)

    def submit(self, prompt: str = "Say hello.", key: str | None = None, **body: Any) -> dict:
        body.setdefault("model", SMOL)
        r = self.request(
            "POST", "/v1/jobs", key or self.client_key, json={"prompt": prompt, **body}
        )
        assert r.status_code == 201, r.text
        return r.json()

    def job(self, job_id: str, key: str | None = None) -> dict:
        r = self.request("GET", f"/v1/jobs/{job_id}", key or self.client_key)
        assert r.status_code == 200, r.text
        return r.json()

    def wait_for(
        self,
        job_id: str,
        statuses: tuple[str, ...],
        timeout: float = 300,
        key: str | None = None,
        poll: float = 0.05,
    ) -> dict:
        """Wait until the job is in one of `statuses`: by long-polling (`?wait=`) when they
        are all terminal, else by polling every `poll` seconds."""
        terminal = {"completed", "failed", "cancelled"}
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            params = (
                {"wait": f"{min(max(remaining, 0), 30):.2f}"} if terminal >= set(statuses) else {}
            )
            r = self.request("GET", f"/v1/jobs/{job_id}", key or self.client_key, params=params)
            assert r.status_code == 200, r.text
            job = r.json()
            if job["status"] in statuses:
                return job
            if job["status"] in terminal or time.monotonic() > deadline:
                raise AssertionError(f"job is {job['status']}, wanted {statuses}: {job}")
            if not params:
                time.sleep(poll)

    def wait_for_text(
        self, job_id: str, chars: int = 1, timeout: float = GENERATION_WAIT, key: str | None = None
    ) -> str:
        """Read the job's stream until `chars` characters of text have come (the miner is
        generating it now); returns the text so far."""
        text = ""
        deadline = time.monotonic() + timeout
        with self.http.stream(
            "GET",
            f"{self.url}/v1/jobs/{job_id}/stream",
            headers={"X-Api-Key": key or self.client_key},
        ) as response:
            assert response.status_code == 200, response.read()
            for line in response.iter_lines():
                if line.startswith("event:") and line.split(":", 1)[1].strip() == "job":
                    raise AssertionError(f"job {job_id} ended after {text!r}")
                if line.startswith("data:") and line[5:].strip():
                    text += json.loads(line[5:]).get("text", "")
                if len(text) >= chars:
                    return text
                assert time.monotonic() < deadline, f"only {text!r} in {timeout} s"
        raise AssertionError(f"the stream of {job_id} ended after {text!r}")

    def new_key(self, role: str, name: str) -> str:
        return run_cli(
            "keys", "create", "--role", role, "--name", name, "--data-dir", str(self.data_dir)
        ).stdout.strip()

    def register_miner(self, name: str, capabilities: list[str] | None = None) -> str:
        """Make a miner key for `name` and register it; returns the key."""
        key = self.new_key("miner", name)
        r = self.request(
            "POST",
            "/v1/miners/register",
            key,
            json={"miner_id": name, "capabilities": capabilities or [SMOL], "gpu_info": {}},
        )
        assert r.status_code == 200, r.text
        return key


@pytest.fixture(scope="session")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """One node with the built-in miner on the embedded model, shared by the session."""
    proc = NodeProcess(
        tmp_path_factory.mktemp("shared") / "data", "--alias", "llama3.2=" + SMOL
    ).start()
    yield proc
    proc.stop()


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Any]:
    """Start nodes of this test's own (`start_node(*flags)`); all are stopped at the end."""
    started: list[NodeProcess] = []

    def start(*args: str, data_dir: Path | None = None, port: int | None = None) -> NodeProcess:
        proc = NodeProcess(data_dir or tmp_path / f"node{len(started)}", *args, port=port).start()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def coordinator(start_node: Any) -> NodeProcess:
    """A node with no built-in miner and short leases, for driving the miner protocol."""
    return start_node("--no-miner", "--lease-seconds", "1", "--max-attempts", "2")


def db_snapshot(data_dir: Path) -> list[str]:
    """Every row of every table of a node's database, as SQL text, read with stdlib sqlite3."""
    import sqlite3

    conn = sqlite3.connect(data_dir / "node.db")
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


def _serve_env_names() -> set[str]:
    """The environment variables `serve` reads its settings from (AITBC_<FLAG>)."""
    from aitbc_node import settings_sources
    from aitbc_node.cli import build_parser

    serve = settings_sources.subparser(build_parser(), "serve")
    return {o.env for o in settings_sources.options(serve)} | {settings_sources.CONFIG_ENV}


# A developer's own data directory, serve settings and config file must never leak into the
# tests' nodes (every `serve` flag reads AITBC_<FLAG> and ~/.config/aitbc-node/config.toml).
for _name in _serve_env_names():
    os.environ.pop(_name, None)
os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="aitbc-test-config-")


class MinerProcess:
    """`aitbc-node miner` in a subprocess."""

    def __init__(self, coordinator: NodeProcess, name: str, data_dir: Path, *args: str) -> None:
        self.name = name
        self.key = coordinator.new_key("miner", name)
        self.log = data_dir / f"miner-{name}.log"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "aitbc_node",
                "miner",
                "--coordinator",
                coordinator.url,
                "--api-key",
                self.key,
                "--data-dir",
                str(data_dir / f"miner-{name}"),
                "--log-level",
                "info",
                *args,
            ],
            stdout=open(self.log, "w"),  # noqa: SIM115 - the process owns it
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )

    def wait_registered(self, coordinator: NodeProcess, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while True:
            miners = coordinator.request("GET", "/v1/miners").json()["miners"]
            if any(m["miner_id"] == self.name and m["online"] for m in miners):
                return
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.1)

    def stop(self) -> None:
        stop_process(self.proc)


@pytest.fixture
def start_miner(tmp_path: Path) -> Iterator:
    """Start `aitbc-node miner` processes (`start_miner(coordinator, name, *flags)`),
    registered when returned; all are stopped at the end."""
    started: list[MinerProcess] = []

    def start(coordinator: NodeProcess, name: str, *args: str) -> MinerProcess:
        miner = MinerProcess(coordinator, name, tmp_path, *args)
        started.append(miner)
        miner.wait_registered(coordinator)
        return miner

    yield start
    for miner in started:
        miner.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's Chromium driven by Playwright, one per test module (tests/browser.py)."""
    from playwright.sync_api import sync_playwright

    from tests.browser import launch

    with sync_playwright() as playwright:
        chromium = launch(playwright)
        yield chromium
        chromium.close()


def count_commits(store: Store) -> list[int]:
    """A list that grows by one at every commit of the store's writer."""
    commits: list[int] = []

    def hook() -> bool:
        commits.append(1)
        return False  # go on with the commit

    store._writer.set_commit_hook(hook)
    return commits
