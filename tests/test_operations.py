"""Operations, against real node processes: one node per data directory, one role per identity,
slow and idle clients, request ids, the logs, the start-up requeue message and file modes."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import resource
import selectors
import socket
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from aitbc_node.errors import Conflict
from tests.conftest import (
    GENERATION_WAIT,
    LONG_PARAMS,
    LONG_PROMPT,
    ROOT,
    NodeProcess,
    free_port,
    run_cli,
    stop_process,
)

# How long a test waits for the node to close a connection it should close: a bound on an
# event, far above the timeouts the nodes here are started with.
CLOSE_WAIT = 120
REQUEST_ID = re.compile(r"[0-9a-f]{16}")


def raise_fd_limit() -> int:
    """This process may open as many files as its hard limit allows (thousands of sockets)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def wait_closed(socks: list[socket.socket], timeout: float = CLOSE_WAIT) -> dict[int, bytes]:
    """Wait until the node has closed every socket; returns what each one received."""
    received = {s.fileno(): b"" for s in socks}
    open_ = set(received)
    with selectors.DefaultSelector() as sel:
        for s in socks:
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        while open_:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{len(open_)} of {len(socks)} connections still open")
            for key, _ in sel.select(min(left, 1.0)):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                try:
                    data = s.recv(65536)
                except ConnectionResetError:
                    data = b""
                except BlockingIOError:
                    continue
                if data:
                    received[s.fileno()] += data
                else:
                    open_.discard(s.fileno())
                    sel.unregister(s)
    return received


def close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        s.close()


class LoggedNode(NodeProcess):
    """A node whose stderr (its logs) is kept apart from its stdout (the banner)."""

    def start(self, timeout: float = 300) -> LoggedNode:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.err_path = self.data_dir.parent / f"{self.data_dir.name}-stderr.log"
        with open(self.log_path, "a") as out, open(self.err_path, "a") as err:
            self.proc = subprocess.Popen(
                [
                    *(sys.executable, "-m", "aitbc_node", "serve", "--port", str(self.port)),
                    *("--data-dir", str(self.data_dir), *self.args),
                ],
                stdout=out,
                stderr=err,
                text=True,
                cwd=ROOT,
            )
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"node exited at start:\n{self.logs()}"
            assert time.monotonic() < deadline, f"node did not answer:\n{self.logs()}"
            try:
                if self.http.get(f"{self.url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        self.credentials = json.loads((self.data_dir / "credentials.json").read_text())
        return self

    def logs(self) -> str:
        return self.err_path.read_text() if self.err_path.exists() else ""


@pytest.fixture
def start_logged(tmp_path: Path) -> Any:
    started: list[LoggedNode] = []

    def start(*args: str) -> LoggedNode:
        node = LoggedNode(tmp_path / f"logged{len(started)}", *args).start()
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop()


def cancel_while_generating(node: NodeProcess) -> str:
    """Run a long job on the built-in miner and cancel it mid-generation (the miner logs that
    at INFO); returns the cancel's request id."""
    job_id = node.submit(LONG_PROMPT, params=LONG_PARAMS)["job_id"]
    node.wait_for_text(job_id)
    r = node.request("POST", f"/v1/jobs/{job_id}/cancel", node.client_key)
    assert r.status_code == 200, r.text
    wait_until(
        lambda: node.request("GET", "/health").json()["miner"]["state"] == "idle",
        GENERATION_WAIT,
        "the miner to drop the cancelled job",
    )
    return r.headers["x-request-id"]


# -- one data directory, one node -----------------------------------------------------------


def test_a_second_node_on_a_data_directory_is_refused_and_leaves_the_first_alone(
    start_node,
) -> None:
    first = start_node()
    job_id = first.submit(LONG_PROMPT, params=LONG_PARAMS)["job_id"]
    first.wait_for_text(job_id)
    running = first.job(job_id)
    assert running["status"] == "running"

    second = subprocess.run(
        [
            *(sys.executable, "-m", "aitbc_node", "serve", "--no-miner"),
            *("--port", str(free_port()), "--data-dir", str(first.data_dir)),
        ],
        capture_output=True,
        text=True,
        timeout=120,  # it exits at once; without the lock it would serve (and requeue)
        cwd=ROOT,
    )
    assert second.returncode != 0
    assert f"PID {first.proc.pid}" in second.stderr, second.stderr
    assert "Traceback" not in second.stderr
    assert second.stdout == ""  # no banner: it never served
    job = first.job(job_id)
    assert job["status"] == "running"
    assert (job["attempts"], job["started_at"]) == (running["attempts"], running["started_at"])

    # Commands that read the store or make keys work beside the running node.
    key = first.new_key("client", "beside-a-running-node")
    assert first.request("GET", "/v1/whoami", key).json()["identity"] == "beside-a-running-node"
    assert (
        "beside-a-running-node" in run_cli("keys", "list", "--data-dir", str(first.data_dir)).stdout
    )
    run_cli("verify", "--data-dir", str(first.data_dir))

    # A SIGKILL drops the lock with the process; the next start says what it requeued.
    first.kill()
    restarted = start_node("--no-miner", data_dir=first.data_dir)
    assert restarted.job(job_id)["status"] == "pending"
    assert "built-in miner's interrupted jobs: 1 requeued, 0 failed" in restarted.output()


def test_a_no_miner_restart_does_not_count_remote_leases_as_the_built_in_miners(
    start_node,
) -> None:
    node = start_node("--no-miner", "--lease-seconds", "5")
    miner_key = node.register_miner("remote-1")
    job_id = node.submit("Say hi.")["job_id"]
    r = node.request("POST", f"/v1/jobs/{job_id}/claim", miner_key, json={"miner_id": "remote-1"})
    assert r.status_code == 200, r.text
    node.kill()
    db = sqlite3.connect(node.data_dir / "node.db")
    row = db.execute("SELECT status, lease_expires_ms FROM jobs WHERE job_id = ?", (job_id,))
    status, lease_expires_ms = row.fetchone()
    db.close()
    assert status == "running"  # killed before the reaper could take it back
    wait_until(lambda: time.time() * 1000 > lease_expires_ms + 100, 60, "the lease to run out")

    restarted = start_node("--no-miner", "--log-level", "info", data_dir=node.data_dir)
    assert restarted.job(job_id)["status"] == "pending"
    output = restarted.output()
    assert "built-in miner's interrupted jobs" not in output
    assert "remote miners' jobs whose lease ran out while the node was down: 1 requeued" in output


# -- one identity, one role -------------------------------------------------------------------


def test_an_identity_name_keeps_its_role(tmp_path: Path) -> None:
    from aitbc_node import keys
    from aitbc_node.store import Store

    data = str(tmp_path / "data")
    run_cli("keys", "create", "--role", "admin", "--name", "boss", "--data-dir", data)
    revoked = run_cli("keys", "create", "--role", "miner", "--name", "rig", "--data-dir", data)
    run_cli("keys", "revoke", "rig", "--data-dir", data)
    before = run_cli("keys", "list", "--json", "--data-dir", data).stdout

    for role, name in (("client", "boss"), ("miner", "boss"), ("client", "rig")):
        r = run_cli(
            "keys", "create", "--role", role, "--name", name, "--data-dir", data, check=False
        )
        assert r.returncode != 0 and r.stdout == ""
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
        assert "one role" in r.stderr, r.stderr
    assert run_cli("keys", "list", "--json", "--data-dir", data).stdout == before
    assert revoked.stdout.startswith("ait_miner_")

    # The rule lives in the key store itself: 409 IDENTITY_ROLE_CONFLICT.
    store = Store(tmp_path / "data" / "node.db")
    try:
        with pytest.raises(Conflict) as refused:
            keys.create_key(store, "client", "boss")
        assert refused.value.status == 409
        assert refused.value.error_code == "IDENTITY_ROLE_CONFLICT"
        key, row = keys.create_key(store, "miner", "rig")  # its own role again is fine
        assert row["identity"] == "rig" and key.startswith("ait_miner_")
    finally:
        store.close()


def test_a_stored_identity_collision_is_reported_by_verify_and_at_start(start_node) -> None:
    node = start_node("--no-miner")
    assert node.terminate() == 0
    run_cli("verify", "--data-dir", str(node.data_dir))
    # What an older node let `keys create --role client --name admin` write.
    db = sqlite3.connect(node.data_dir / "node.db")
    with db:
        db.execute(
            "INSERT INTO api_keys (key_id, key_hash, name, role, identity, created_ms)"
            " VALUES ('key-0123456789ab', ?, 'admin', 'client', 'admin', ?)",
            ("0" * 64, int(time.time() * 1000)),
        )
    db.close()

    verify = run_cli("verify", "--data-dir", str(node.data_dir), check=False)
    assert verify.returncode == 1
    assert verify.stdout.startswith("INVALID: identity 'admin'"), verify.stdout
    assert "admin" in verify.stdout and "client" in verify.stdout

    restarted = start_node("--no-miner", data_dir=node.data_dir)
    warnings = [line for line in restarted.output().splitlines() if "identity 'admin'" in line]
    assert warnings and " WARNING " in warnings[-1], restarted.output()


# -- slow and idle clients ------------------------------------------------------------------


def test_slowloris_connections_are_closed_once_their_head_is_overdue(start_node) -> None:
    raise_fd_limit()
    node = start_node("--no-miner", "--header-timeout", "2")
    slow = []
    for _ in range(200):
        s = socket.create_connection(("127.0.0.1", node.port))
        s.sendall(b"GET /api/health HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # never finished
        slow.append(s)
    try:
        # A client that keeps sending, a byte at a time, is cut off all the same.
        trickle = socket.create_connection(("127.0.0.1", node.port))
        trickle.sendall(b"GET /api/health HTTP/1.1\r\nHost: x\r\n")
        trickle.settimeout(0.2)
        answer, deadline = b"", time.monotonic() + CLOSE_WAIT
        while time.monotonic() < deadline:
            try:
                trickle.sendall(b"X-Trickle: 1\r\n")
                chunk = trickle.recv(65536)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
            if not chunk:
                break
            answer += chunk
        else:
            raise AssertionError("a trickling client kept its connection open")
        trickle.close()
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error_code"] == "REQUEST_TIMEOUT"

        assert httpx.get(f"{node.url}/health", timeout=60).status_code == 200
        received = wait_closed(slow)
        assert all(r.startswith(b"HTTP/1.1 408") for r in received.values())
    finally:
        close_all(slow)
    assert httpx.get(f"{node.url}/health", timeout=60).status_code == 200


def test_a_kept_alive_connection_is_timed_out_only_on_a_head_that_is_overdue(start_node) -> None:
    """Requests on one connection for longer than the head timeout each get their answer
    (the timer of an earlier head must not cut a later one short); then a head left
    unfinished is answered 408 and the connection closed."""
    node = start_node("--no-miner", "--header-timeout", "1")
    sock = socket.create_connection(("127.0.0.1", node.port))
    try:
        served = 0
        until = time.monotonic() + 3.5
        while time.monotonic() < until:
            sock.sendall(b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n")
            head, _ = read_response(sock)
            assert head.startswith(b"HTTP/1.1 200"), head
            served += 1
            time.sleep(0.25)  # each head well within the timeout, the series well past it
        assert served >= 4
        sock.sendall(b"GET /api/health HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # never finished
        received = wait_closed([sock])
        assert received[sock.fileno()].startswith(b"HTTP/1.1 408"), received
    finally:
        sock.close()


def test_idle_connections_neither_stop_the_node_nor_stay_open(start_node) -> None:
    if raise_fd_limit() < 2500:
        pytest.skip("this process may not open 2,000 sockets (RLIMIT_NOFILE hard limit)")
    node = start_node("--no-miner", "--header-timeout", "5", "--keep-alive-timeout", "2")
    idle = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(2000)]
    try:
        r = httpx.get(f"{node.url}/health", timeout=60)
        assert r.status_code == 200 and r.json()["status"] == "ok"
        # A kept-alive connection that goes quiet after a request is closed too.
        kept = socket.create_connection(("127.0.0.1", node.port))
        kept.sendall(b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n")
        received = wait_closed([*idle, kept])
        assert received[kept.fileno()].startswith(b"HTTP/1.1 200")
        # Sockets that never sent a byte are closed without an answer.
        assert not any(received[s.fileno()] for s in idle)
        kept.close()
    finally:
        close_all(idle)
    assert httpx.get(f"{node.url}/health", timeout=60).status_code == 200


def read_responses(sock: socket.socket, methods: list[str]) -> list[tuple[bytes, bytes]]:
    """The responses to requests sent back to back with these methods, in order: each one's
    head and body (none for a HEAD)."""
    sock.settimeout(CLOSE_WAIT)
    data, answers = b"", []
    for method in methods:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"closed before a whole response head: {data!r}"
            data += chunk
        head, data = data.split(b"\r\n\r\n", 1)
        announced = re.search(rb"(?im)^content-length: *(\d+)", head)
        assert announced, head
        length = 0 if method == "HEAD" else int(announced.group(1))
        while len(data) < length:
            chunk = sock.recv(65536)
            assert chunk, f"closed before a whole response body: {head!r}"
            data += chunk
        answers.append((head, data[:length]))
        data = data[length:]
    assert data == b"", f"more than {len(methods)} responses: {data!r}"
    return answers


def read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """One HTTP/1.1 response with a content-length from `sock`: its head and its body."""
    return read_responses(sock, ["GET"])[0]


def too_large_post(api_key: str | None = None) -> tuple[bytes, bytes]:
    """The head and the body of a `POST /api/v1/jobs` whose body (2 MiB) is over the limit."""
    body = b'{"prompt": "' + b"x" * (2 << 20) + b'"}'
    head = b"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    if api_key is not None:
        head += b"X-Api-Key: " + api_key.encode() + b"\r\n"
    head += b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    return head, body


def test_a_kept_alive_connection_serves_its_next_request_after_an_early_413(start_node) -> None:
    """A body announced too large is answered 413 before it has come; the connection stays
    usable. Its bytes are never taken for the next request's head: here 200 KiB of it come
    with its head (more than a head may be), the rest once the answer is read, and then the
    next request (was: answered 400 "Request head too large" as the body's end was read, for
    about one client in twenty that reused its connection)."""
    node = start_node("--no-miner")
    post, body = too_large_post(node.client_key)
    get = b"GET /api/v1/jobs HTTP/1.1\r\nHost: x\r\nX-Api-Key: " + node.client_key.encode()
    get += b"\r\n\r\n"
    with socket.create_connection(("127.0.0.1", node.port)) as s:
        s.sendall(post + body[: 200 << 10])
        head, answer = read_response(s)
        assert head.startswith(b"HTTP/1.1 413 "), head
        assert json.loads(answer)["error_code"] == "BODY_TOO_LARGE"
        s.sendall(body[200 << 10 :])
        # Let the node read the body's end on its own first (an answer then would be wrong).
        with selectors.DefaultSelector() as sel:
            sel.register(s, selectors.EVENT_READ)
            sel.select(2.0)
        s.sendall(get)
        head, answer = read_response(s)
        assert head.startswith(b"HTTP/1.1 200 "), (head, answer)
        assert json.loads(answer)["jobs"] == []


def test_a_connection_idle_after_an_early_413_and_its_body_is_closed(start_node) -> None:
    """The body's bytes stop uvicorn's keep-alive timer (armed by the early answer); the
    head timer closes the connection once no next request comes."""
    node = start_node("--no-miner", "--header-timeout", "2", "--keep-alive-timeout", "2")
    post, body = too_large_post()
    s = socket.create_connection(("127.0.0.1", node.port))
    try:
        s.sendall(post + body[: 200 << 10])
        head, _ = read_response(s)
        assert head.startswith(b"HTTP/1.1 413 "), head
        s.sendall(body[200 << 10 :])
        assert wait_closed([s])[s.fileno()] == b""
    finally:
        s.close()


def test_requests_sent_back_to_back_are_answered_in_order_each_whole(start_node) -> None:
    """Requests sent back to back on one connection (pipelined), answers without a body (to
    a HEAD) and an interim `100 Continue` go through the guarded protocol's bookkeeping of
    where one request ends and the next begins: each gets every byte of its answer, in
    order."""
    node = start_node("--no-miner")
    key = node.client_key.encode()
    health = b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n"
    whoami = b"GET /api/v1/whoami HTTP/1.1\r\nHost: x\r\nX-Api-Key: " + key + b"\r\n\r\n"
    head_only = b"HEAD /api/health HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", node.port)) as s:
        s.sendall(health + head_only + whoami + head_only + health)
        answers = read_responses(s, ["GET", "HEAD", "GET", "HEAD", "GET"])
        statuses = [head.split(b" ", 2)[1] for head, _ in answers]
        assert statuses == [b"200", b"405", b"200", b"405", b"200"], answers
        assert json.loads(answers[0][1])["status"] == "ok"
        assert json.loads(answers[2][1])["role"] == "client"
        assert answers[4][1] == answers[0][1]

        body = json.dumps({"receipt": {"receipt_id": "rcpt-0"}}).encode()
        s.sendall(
            b"POST /api/v1/receipts/verify HTTP/1.1\r\nHost: x\r\n"
            + b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
            + b"Content-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
        )
        interim = b""
        while not interim.endswith(b"\r\n\r\n"):
            chunk = s.recv(1)
            assert chunk, f"closed before 100 Continue: {interim!r}"
            interim += chunk
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(body)
        head, answer = read_response(s)
        assert head.startswith(b"HTTP/1.1 200 "), (head, answer)
        assert json.loads(answer)["valid"] is False


def test_a_request_that_is_not_http_gets_the_api_error_shape(start_node) -> None:
    node = start_node("--no-miner")
    for raw in (b"NOT HTTP AT ALL\r\n\r\n", b"GET /api/health HTTP/1.1\r\nHost: x\r\n\x00\r\n\r\n"):
        s = socket.create_connection(("127.0.0.1", node.port))
        s.sendall(raw)
        answer = wait_closed([s])[s.fileno()]
        s.close()
        assert answer.startswith(b"HTTP/1.1 400 "), answer
        head, body = answer.split(b"\r\n\r\n", 1)
        assert b"content-type: application/json" in head.lower()
        assert json.loads(body)["error_code"] == "INVALID_REQUEST"


def test_connections_past_the_bound_are_refused_with_503(start_node) -> None:
    node = start_node("--no-miner", "--max-connections", "20", "--header-timeout", "60")
    held = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(25)]
    try:
        r = httpx.get(f"{node.url}/health", timeout=60)
        assert r.status_code == 503
        assert r.json()["error_code"] == "TOO_MANY_CONNECTIONS"
        assert r.headers["retry-after"] == "1"
    finally:
        close_all(held)
    wait_until(
        lambda: httpx.get(f"{node.url}/health", timeout=60).status_code == 200,
        CLOSE_WAIT,
        "the node to take connections again",
    )
    assert "refusing connections" in node.output()


# -- request ids and the logs ---------------------------------------------------------------


def test_every_response_carries_a_request_id(start_node) -> None:
    node = start_node("--no-miner")
    ids = []
    for path, key in (("/health", None), ("/v1/whoami", None), ("/no/such/thing", None)):
        r = node.request("GET", path, key)
        assert REQUEST_ID.fullmatch(r.headers["x-request-id"]), (path, r.headers)
        ids.append(r.headers["x-request-id"])
    assert len(set(ids)) == 3
    mine = node.request("GET", "/health", headers={"X-Request-Id": "trace-42.a:b"})
    assert mine.headers["x-request-id"] == "trace-42.a:b"
    for bad in ("two words", "x" * 65, "é"):
        r = node.request("GET", "/health", headers={"X-Request-Id": bad.encode()})
        assert REQUEST_ID.fullmatch(r.headers["x-request-id"])


def test_a_500_is_logged_with_its_traceback_and_request_id(start_node) -> None:
    node = start_node("--no-miner", "--accept-unserved-models")
    job_id = node.submit("Say hi.")["job_id"]
    # A row the code cannot read (written behind the node's back) makes a real bug-shaped 500.
    db = sqlite3.connect(node.data_dir / "node.db")
    with db:
        db.execute("UPDATE jobs SET params = '{not json' WHERE job_id = ?", (job_id,))
    db.close()
    r = node.request("GET", f"/v1/jobs/{job_id}", node.client_key)
    assert r.status_code == 500
    assert r.json() == {"detail": "internal server error", "error_code": "INTERNAL_ERROR"}
    request_id = r.headers["x-request-id"]
    assert "Traceback" not in r.text
    wait_until(lambda: request_id in node.output(), 60, "the 500 in the log")
    output = node.output()
    start = output.index(request_id)
    line_start = output.rfind("\n", 0, start) + 1
    assert " ERROR " in output[line_start:start], output
    assert output[start:].split("\n", 1)[1].startswith("Traceback"), output[start:]
    assert "JSONDecodeError" in output[start:]


def test_litestar_500s_are_logged_and_answered_in_the_api_shape(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from litestar import Litestar, MediaType, get
    from litestar.exceptions import HTTPException

    from aitbc_node.api import handle_http_exception, handle_unexpected
    from aitbc_node.requestlog import RequestLog

    @get("/unserializable", media_type=MediaType.TEXT, sync_to_thread=False)
    def unserializable() -> Any:
        # Litestar cannot render an object as text/plain: it raises its own 500, an
        # HTTPException ("Unable to serialize response content"), not a plain exception.
        return {"value": 1}

    app = Litestar(
        [unserializable],
        exception_handlers={HTTPException: handle_http_exception, Exception: handle_unexpected},
        logging_config=None,
    )

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=RequestLog(app))
        async with httpx.AsyncClient(transport=transport, base_url="http://node") as client:
            return await client.get("/unserializable", headers={"X-Request-Id": "rid-1"})

    with caplog.at_level(logging.ERROR):
        r = asyncio.run(call())
    assert r.status_code == 500
    assert r.json() == {"detail": "internal server error", "error_code": "INTERNAL_ERROR"}
    assert r.headers["x-request-id"] == "rid-1"
    errors = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert errors and errors[0].exc_info is not None


def test_log_level_error_prints_no_info_lines(start_logged) -> None:
    node = start_logged("--log-level", "error")
    cancel_while_generating(node)
    assert node.terminate() == 0
    logs = node.logs()
    assert "INFO" not in logs, logs
    for line in logs.splitlines():  # any line left must be in the node's own format
        assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (ERROR|CRITICAL) \S+: ", line)


def test_json_logs_and_the_access_log(start_logged) -> None:
    node = start_logged("--log-level", "info", "--log-format", "json", "--access-log")
    cancel_id = cancel_while_generating(node)
    health_id = node.request("GET", "/health").headers["x-request-id"]
    assert node.terminate() == 0
    entries = [json.loads(line) for line in node.logs().splitlines()]
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    cancelled = [
        e for e in entries if e["logger"] == "aitbc_node.miner" and "cancel" in e["message"]
    ]
    assert cancelled and cancelled[0]["level"] == "INFO"
    access = {e["request_id"]: e for e in entries if e["logger"] == "aitbc_node.access"}
    assert access[health_id]["method"] == "GET" and access[health_id]["path"] == "/api/health"
    assert access[health_id]["status"] == 200 and access[health_id]["duration_ms"] >= 0
    assert access[cancel_id]["method"] == "POST" and access[cancel_id]["status"] == 200


def test_the_text_access_log_prints_whatever_the_level(start_logged) -> None:
    node = start_logged("--no-miner", "--access-log")  # --log-level warning, the default
    request_id = node.request("GET", "/no/such/thing").headers["x-request-id"]
    assert node.terminate() == 0
    line = next(x for x in node.logs().splitlines() if x.endswith(f"request_id={request_id}"))
    assert re.fullmatch(
        r"\S+Z INFO aitbc_node\.access: GET /api/no/such/thing 404 [\d.]+ms client=127\.0\.0\.1 "
        r"request_id=[0-9a-f]{16}",
        line,
    ), line


# -- file modes -------------------------------------------------------------------------------


def test_the_data_directory_and_database_are_the_owners_alone(start_node, tmp_path: Path) -> None:
    fresh = tmp_path / "fresh" / "data"
    run_cli("keys", "create", "--role", "client", "--name", "first", "--data-dir", str(fresh))
    assert mode(fresh) == 0o700
    for path in fresh.glob("node.db*"):
        assert mode(path) == 0o600, path

    node = start_node("--no-miner", data_dir=tmp_path / "served")
    assert mode(node.data_dir) == 0o700
    names = {p.name for p in node.data_dir.iterdir()}
    assert {"node.db", "node.db-wal", "node.db-shm", "node.key", "credentials.json"} <= names
    for path in node.data_dir.iterdir():
        assert mode(path) == 0o600, path

    # A database an older version left 0644 is made private when it is next opened.
    (fresh / "node.db").chmod(0o644)
    run_cli("keys", "list", "--data-dir", str(fresh))
    assert mode(fresh / "node.db") == 0o600


def test_the_miners_key_directory_is_private(tmp_path: Path) -> None:
    miner_dir = tmp_path / "miner"
    proc = subprocess.Popen(
        [
            *(
                sys.executable,
                "-m",
                "aitbc_node",
                "miner",
                "--coordinator",
                "http://127.0.0.1:9/api",
            ),
            *("--api-key", "ait_miner_x", "--data-dir", str(miner_dir)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        stop_process(proc)
    assert proc.returncode != 0 and "cannot reach the coordinator" in err, err
    assert mode(miner_dir) == 0o700
    assert [mode(p) for p in miner_dir.iterdir()] == [0o600]
