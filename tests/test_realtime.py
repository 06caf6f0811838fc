"""Long-polling, token streaming, rate limits and queue bounds, against real nodes."""

from __future__ import annotations

import json
import queue
import select
import socket
import threading
import time
from typing import Any
from urllib.parse import urlencode

from tests.conftest import GENERATION_WAIT, LONG_PARAMS, LONG_PROMPT, SMOL, NodeProcess
from tests.test_jobs_api import assert_error


def read_stream(
    node: NodeProcess,
    job_id: str,
    events: list,
    key: str | None = None,
    arrived: queue.Queue | None = None,
) -> None:
    """Collect a job's server-sent events as (time, event, data) until the `job` event; each
    also goes to `arrived`, after ("open", None) once the stream has begun."""
    with node.http.stream(
        "GET",
        f"{node.url}/v1/jobs/{job_id}/stream",
        headers={"X-Api-Key": key or node.client_key},
        timeout=GENERATION_WAIT,
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        if arrived is not None:
            arrived.put(("open", None))
        event = None
        for line in response.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                events.append((time.time(), event, json.loads(line.split(":", 1)[1])))
                if arrived is not None:
                    arrived.put(events[-1][1:])
                if event == "job":
                    return


def send_long_poll(node: NodeProcess, path: str, key: str, **params: Any) -> socket.socket:
    """Send a long-polling GET on a connection of its own; returns the socket its answer will
    come on. A request on another connection is answered before this returns, so the node has
    the poll in hand by then."""
    sock = socket.create_connection(("127.0.0.1", node.port))
    sock.settimeout(GENERATION_WAIT)
    sock.sendall(
        f"GET /api{path}?{urlencode(params)} HTTP/1.1\r\nHost: 127.0.0.1:{node.port}\r\n"
        f"X-Api-Key: {key}\r\nConnection: close\r\n\r\n".encode()
    )
    assert node.request("GET", "/health").status_code == 200
    return sock


def still_waiting(sock: socket.socket) -> bool:
    """Nothing has come back on `sock` yet."""
    return not select.select([sock], [], [], 0)[0]


def answer(sock: socket.socket) -> tuple[int, Any]:
    """The status and JSON body of the response on `sock` (the node closes it after)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_wait_returns_as_soon_as_the_job_ends(start_node) -> None:
    # How soon is measured by tests/bench/wait_latency.py; here, that the end wakes it.
    node = start_node("--no-miner")
    key = node.register_miner("m")
    job_id = node.submit("wait for me")["job_id"]
    node.request("POST", f"/v1/jobs/{job_id}/claim", key, json={"miner_id": "m"})
    started = time.monotonic()
    poll = send_long_poll(node, f"/v1/jobs/{job_id}", node.client_key, wait=60)
    assert still_waiting(poll)
    r = node.request(
        "POST", f"/v1/jobs/{job_id}/complete", key, json={"miner_id": "m", "result": "now"}
    )
    assert r.status_code == 200
    status, job = answer(poll)
    assert status == 200 and job["status"] == "completed" and job["result"] == "now"
    assert time.monotonic() - started < 60  # the completion answered it, not its 60 s running out


def test_wait_times_out_with_the_current_state(start_node) -> None:
    node = start_node("--no-miner", "--accept-unserved-models")
    job_id = node.submit("nobody serves me")["job_id"]
    started = time.monotonic()
    r = node.request("GET", f"/v1/jobs/{job_id}", node.client_key, params={"wait": 0.5})
    assert r.json()["status"] == "pending"
    # It waited the 0.5 s asked for, and answered without holding on to the 60 s maximum.
    assert 0.45 < time.monotonic() - started < 60
    for bad in ("61", "-1", "soon"):
        r = node.request("GET", f"/v1/jobs/{job_id}", node.client_key, params={"wait": bad})
        assert_error(r, 400, "INVALID_WAIT")


def test_available_wait_answers_when_a_matching_job_arrives(start_node) -> None:
    node = start_node("--no-miner")
    key = node.register_miner("m", [SMOL])
    started = time.monotonic()
    poll = send_long_poll(node, "/v1/jobs/available", key, miner_id="m", wait=60)
    assert still_waiting(poll)
    job_id = node.submit("for the waiting miner")["job_id"]
    status, offer = answer(poll)
    assert status == 200 and [j["job_id"] for j in offer["jobs"]] == [job_id]
    assert time.monotonic() - started < 60  # the new job answered it, not its 60 s running out


def test_stream_delivers_text_before_completion_and_it_equals_the_result(node) -> None:
    # 200 tokens that do not stop early: the job still runs when its first text arrives.
    job_id = node.submit(LONG_PROMPT, params={**LONG_PARAMS, "max_tokens": 200})["job_id"]
    events: list = []
    arrived: queue.Queue = queue.Queue()
    reader = threading.Thread(target=read_stream, args=(node, job_id, events, None, arrived))
    reader.start()
    assert arrived.get(timeout=GENERATION_WAIT) == ("open", None)
    kind, _ = arrived.get(timeout=GENERATION_WAIT)
    assert kind == "text" and node.job(job_id)["status"] == "running"  # text while it ran
    reader.join(GENERATION_WAIT)
    assert not reader.is_alive()
    texts = [data["text"] for _, kind, data in events if kind == "text"]
    _, kind, job = events[-1]
    assert kind == "job" and job["status"] == "completed"
    assert len(texts) > 5  # token by token, not one lump at the end
    assert "".join(texts) == job["result"]


def test_a_late_stream_first_gets_the_text_so_far(node) -> None:
    # 300 tokens that do not stop early: it still runs after the first 30 characters.
    job_id = node.submit(LONG_PROMPT, params={**LONG_PARAMS, "max_tokens": 300})["job_id"]
    seen = node.wait_for_text(job_id, 30)  # an early stream, left after 30 characters
    assert node.job(job_id)["status"] == "running"
    events: list = []
    read_stream(node, job_id, events)  # joins late, mid-generation
    texts = [data["text"] for _, kind, data in events if kind == "text"]
    job = events[-1][2]
    assert texts[0].startswith(seen)  # the backlog arrives first, in one piece
    assert "".join(texts) == job["result"]


def test_remote_miner_progress_reaches_the_stream(start_node) -> None:
    node = start_node("--no-miner")
    key = node.register_miner("m")
    job_id = node.submit("stream me")["job_id"]
    node.request("POST", f"/v1/jobs/{job_id}/claim", key, json={"miner_id": "m"})
    events: list = []
    arrived: queue.Queue = queue.Queue()
    reader = threading.Thread(target=read_stream, args=(node, job_id, events, None, arrived))
    reader.start()
    assert arrived.get(timeout=GENERATION_WAIT) == ("open", None)
    for piece in ("Hello", ", wor", "ld"):
        r = node.request(
            "POST", f"/v1/jobs/{job_id}/progress", key, json={"miner_id": "m", "text": piece}
        )
        assert r.status_code == 200
        # Each piece reaches the stream before the next is sent: one event each.
        assert arrived.get(timeout=GENERATION_WAIT) == ("text", {"text": piece})
    node.request(
        "POST",
        f"/v1/jobs/{job_id}/complete",
        key,
        json={"miner_id": "m", "result": "Hello, world!"},
    )
    reader.join(GENERATION_WAIT)
    assert not reader.is_alive()
    texts = [data["text"] for _, kind, data in events if kind == "text"]
    assert "".join(texts) == "Hello, world!"
    assert texts[:3] == ["Hello", ", wor", "ld"]
    other = node.register_miner("other")
    r = node.request(
        "POST", f"/v1/jobs/{job_id}/progress", other, json={"miner_id": "other", "text": "x"}
    )
    assert_error(r, 409, "JOB_ALREADY_FINISHED")


def test_rate_limit_gives_429_with_an_honest_retry_after(start_node) -> None:
    node = start_node("--no-miner", "--rate", "client=2/3")
    # Enough requests to run out of tokens even where each one takes a good part of a second.
    statuses = [node.request("GET", "/v1/jobs", node.client_key) for _ in range(30)]
    assert [r.status_code for r in statuses[:3]] == [200, 200, 200]
    limited = [r for r in statuses if r.status_code == 429]
    assert limited
    err = assert_error(limited[0], 429, "RATE_LIMITED")
    assert "2 requests a second" in err["detail"]
    retry_after = int(limited[0].headers["retry-after"])
    assert 1 <= retry_after <= 1
    time.sleep(retry_after)  # what the node asked for: the bucket has a token again
    assert node.request("GET", "/v1/jobs", node.client_key).status_code == 200
    # each key has its own bucket
    other = node.new_key("client", "fresh")
    assert node.request("GET", "/v1/jobs", other).status_code == 200


def test_public_reads_are_limited_per_address(start_node) -> None:
    node = start_node("--no-miner", "--rate", "public=1/2")
    time.sleep(2)  # at 1 a second, the 2 tokens that the start-up health checks took are back
    codes = [node.request("GET", "/health").status_code for _ in range(30)]
    assert codes[:2] == [200, 200] and 429 in codes


def test_pending_bounds_give_queue_full(start_node) -> None:
    node = start_node(
        "--no-miner",
        "--accept-unserved-models",
        "--max-pending-per-client",
        "2",
        "--max-pending",
        "3",
    )
    for _ in range(2):
        node.submit("queued")
    r = node.request("POST", "/v1/jobs", node.client_key, json={"prompt": "x", "model": SMOL})
    err = assert_error(r, 429, "QUEUE_FULL")
    assert "your queue" in err["detail"] and int(r.headers["retry-after"]) >= 1
    other = node.new_key("client", "other")
    node.submit("third overall", key=other)
    r = node.request("POST", "/v1/jobs", other, json={"prompt": "x", "model": SMOL})
    assert "this node's queue" in assert_error(r, 429, "QUEUE_FULL")["detail"]


def test_shutdown_answers_long_polls_instead_of_waiting_for_them(start_node) -> None:
    node = start_node("--no-miner", "--accept-unserved-models")
    job_id = node.submit("never served")["job_id"]
    poll = send_long_poll(node, f"/v1/jobs/{job_id}", node.client_key, wait=60)
    started = time.monotonic()
    assert node.terminate() == 0
    status, job = answer(poll)
    assert time.monotonic() - started < 60  # answered at the shutdown, not after its 60 s
    assert status == 200 and job["status"] == "pending"


def test_the_streams_keep_alive_is_a_comment_alone() -> None:
    """A keep-alive (sent while a job waits or generates slowly) must carry no `data:` line:
    EventSource clients would receive one as an empty message, and readers that parse every
    data line as JSON fail on it."""
    from aitbc_node.api import KEEP_ALIVE

    encoded = KEEP_ALIVE.encode().decode()
    assert encoded.startswith(":") and "data:" not in encoded and encoded.endswith("\r\n\r\n")
