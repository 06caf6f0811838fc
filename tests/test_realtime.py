"""Long-polling, token streaming, rate limits and queue bounds, against real nodes."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime

import httpx

from tests.conftest import SMOL, NodeProcess
from tests.test_jobs_api import assert_error


def read_stream(node: NodeProcess, job_id: str, events: list, key: str | None = None) -> None:
    """Collect a job's server-sent events as (time, event, data) until the `job` event."""
    with node.http.stream(
        "GET",
        f"{node.url}/v1/jobs/{job_id}/stream",
        headers={"X-Api-Key": key or node.client_key},
        timeout=60,
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in response.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                events.append((time.time(), event, json.loads(line.split(":", 1)[1])))
                if event == "job":
                    return


def test_wait_returns_as_soon_as_the_job_ends(start_node) -> None:
    node = start_node("--no-miner")
    key = node.register_miner("m")
    job_id = node.submit("wait for me")["job_id"]
    node.request("POST", f"/v1/jobs/{job_id}/claim", key, json={"miner_id": "m"})
    answer: dict = {}

    def long_poll() -> None:
        client = httpx.Client(timeout=30)
        r = client.get(
            f"{node.url}/v1/jobs/{job_id}",
            params={"wait": 20},
            headers={"X-Api-Key": node.client_key},
        )
        answer["at"], answer["job"] = time.monotonic(), r.json()

    waiter = threading.Thread(target=long_poll)
    waiter.start()
    time.sleep(0.5)
    assert "job" not in answer  # still waiting
    completing = time.monotonic()
    r = node.request(
        "POST", f"/v1/jobs/{job_id}/complete", key, json={"miner_id": "m", "result": "now"}
    )
    assert r.status_code == 200
    waiter.join(10)
    assert answer["job"]["status"] == "completed" and answer["job"]["result"] == "now"
    assert answer["at"] - completing < 0.05


def test_wait_times_out_with_the_current_state(start_node) -> None:
    node = start_node("--no-miner", "--accept-unserved-models")
    job_id = node.submit("nobody serves me")["job_id"]
    started = time.monotonic()
    r = node.request("GET", f"/v1/jobs/{job_id}", node.client_key, params={"wait": 0.5})
    assert r.json()["status"] == "pending"
    assert 0.45 < time.monotonic() - started < 5
    for bad in ("61", "-1", "soon"):
        r = node.request("GET", f"/v1/jobs/{job_id}", node.client_key, params={"wait": bad})
        assert_error(r, 400, "INVALID_WAIT")


def test_available_wait_answers_when_a_matching_job_arrives(start_node) -> None:
    node = start_node("--no-miner")
    key = node.register_miner("m", [SMOL])
    answer: dict = {}

    def long_poll() -> None:
        client = httpx.Client(timeout=30)
        r = client.get(
            f"{node.url}/v1/jobs/available",
            params={"miner_id": "m", "wait": 20},
            headers={"X-Api-Key": key},
        )
        answer["at"], answer["jobs"] = time.monotonic(), r.json()["jobs"]

    waiter = threading.Thread(target=long_poll)
    waiter.start()
    time.sleep(0.5)
    assert "jobs" not in answer
    submitted = time.monotonic()
    job_id = node.submit("for the waiting miner")["job_id"]
    waiter.join(10)
    assert [j["job_id"] for j in answer["jobs"]] == [job_id]
    assert answer["at"] - submitted < 0.1


def test_stream_delivers_text_before_completion_and_it_equals_the_result(node) -> None:
    job_id = node.submit(
        "Count from 1 to 100, one number per line.",
        params={"max_tokens": 200, "temperature": 0},
    )["job_id"]
    events: list = []
    read_stream(node, job_id, events)
    texts = [(at, data["text"]) for at, kind, data in events if kind == "text"]
    _, kind, job = events[-1]
    assert kind == "job" and job["status"] == "completed"
    assert len(texts) > 5  # token by token, not one lump at the end
    completed_at = datetime.fromisoformat(job["completed_at"].replace("Z", "+00:00"))
    assert texts[0][0] < completed_at.timestamp()  # text arrived while the job ran
    assert "".join(t for _, t in texts) == job["result"]


def test_a_late_stream_first_gets_the_text_so_far(node) -> None:
    job_id = node.submit(
        "List the numbers from 1 to 1000 separated by commas: 1, 2, 3,",
        params={"max_tokens": 300, "temperature": 0},
    )["job_id"]
    seen = ""
    with node.http.stream(
        "GET", f"{node.url}/v1/jobs/{job_id}/stream", headers={"X-Api-Key": node.client_key}
    ) as early:
        for line in early.iter_lines():
            if line.startswith("data:"):
                seen += json.loads(line[5:]).get("text", "")
            if len(seen) >= 30:
                break
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
    reader = threading.Thread(target=read_stream, args=(node, job_id, events))
    reader.start()
    for piece in ("Hello", ", wor", "ld"):
        r = node.request(
            "POST", f"/v1/jobs/{job_id}/progress", key, json={"miner_id": "m", "text": piece}
        )
        assert r.status_code == 200
        time.sleep(0.1)
    node.request(
        "POST",
        f"/v1/jobs/{job_id}/complete",
        key,
        json={"miner_id": "m", "result": "Hello, world!"},
    )
    reader.join(10)
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
    statuses = [node.request("GET", "/v1/jobs", node.client_key) for _ in range(6)]
    assert [r.status_code for r in statuses[:3]] == [200, 200, 200]
    limited = [r for r in statuses if r.status_code == 429]
    assert limited
    err = assert_error(limited[0], 429, "RATE_LIMITED")
    assert "2 requests a second" in err["detail"]
    retry_after = int(limited[0].headers["retry-after"])
    assert 1 <= retry_after <= 1
    time.sleep(retry_after)
    assert node.request("GET", "/v1/jobs", node.client_key).status_code == 200
    # each key has its own bucket
    other = node.new_key("client", "fresh")
    assert node.request("GET", "/v1/jobs", other).status_code == 200


def test_public_reads_are_limited_per_address(start_node) -> None:
    node = start_node("--no-miner", "--rate", "public=1/2")
    time.sleep(2)  # refill what the start-up health checks took
    codes = [node.request("GET", "/health").status_code for _ in range(4)]
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
    answer: dict = {}

    def long_poll() -> None:
        r = httpx.get(
            f"{node.url}/v1/jobs/{job_id}",
            params={"wait": 60},
            headers={"X-Api-Key": node.client_key},
            timeout=90,
        )
        answer["job"] = r.json()

    waiter = threading.Thread(target=long_poll)
    waiter.start()
    time.sleep(0.5)
    started = time.monotonic()
    assert node.terminate(timeout=30) == 0
    waiter.join(10)
    assert time.monotonic() - started < 5  # not the 60 s the poll asked for
    assert answer["job"]["status"] == "pending"
