"""Webhooks against a real HTTP receiver started by the test."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.conftest import NodeProcess
from tests.test_jobs_api import assert_error

# Receivers here listen on 127.0.0.1, which webhooks may reach only when the operator allows it.
ALLOW_LOOPBACK = ("--webhook-allow", "127.0.0.1/32")


class Receiver:
    """A webhook receiver on 127.0.0.1 that records what it gets and answers as told."""

    def __init__(self) -> None:
        self.received: list[dict] = []
        self.statuses: list[int] = []  # answers to give, in order; then 200
        self.hang_seconds = 0.0
        self.location: str | None = None  # sent with a 3xx answer
        self.gets: list[str] = []  # paths of any GET (a followed redirect would be one)
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.lock:
                    receiver.received.append(
                        {
                            # header names are case-insensitive: keep them lowercased
                            "headers": {k.lower(): v for k, v in self.headers.items()},
                            "body": body,
                            "at": time.monotonic(),
                        }
                    )
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                if receiver.hang_seconds:
                    time.sleep(receiver.hang_seconds)
                self.send_response(status)
                if 300 <= status < 400 and receiver.location:
                    self.send_header("Location", receiver.location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self) -> None:
                with receiver.lock:
                    receiver.gets.append(self.path)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, count: int, timeout: float = 20) -> list[dict]:
        deadline = time.monotonic() + timeout
        while len(self.received) < count:
            assert time.monotonic() < deadline, f"got {len(self.received)} of {count} requests"
            time.sleep(0.02)
        return self.received


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.server.shutdown()


def signature_is_valid(secret: str, request: dict, max_age: float = 300) -> bool:
    """What a receiver does: check the HMAC over "<t>.<body>" and that t is recent."""
    header = request["headers"]["aitbc-signature"]
    fields = dict(part.split("=", 1) for part in header.split(","))
    expected = hmac.new(
        secret.encode(), fields["t"].encode() + b"." + request["body"], hashlib.sha256
    ).hexdigest()
    fresh = abs(time.time() - int(fields["t"])) < max_age
    return fresh and hmac.compare_digest(expected, fields["v1"])


def register(node: NodeProcess, url: str, events=None, key: str | None = None) -> dict:
    body = {"url": url} if events is None else {"url": url, "events": events}
    r = node.request("POST", "/v1/webhooks", key or node.client_key, json=body)
    assert r.status_code == 201, r.text
    return r.json()


def only_delivery(node: NodeProcess, webhook_id: str, until, timeout: float = 20) -> dict:
    """A webhook's one delivery, once `until(delivery)` holds."""
    deadline = time.monotonic() + timeout
    while True:
        (delivery,) = node.request(
            "GET", f"/v1/webhooks/{webhook_id}/deliveries", node.client_key
        ).json()["deliveries"]
        if until(delivery):
            return delivery
        assert time.monotonic() < deadline, f"delivery stayed {delivery}"
        time.sleep(0.05)


def run_as_miner(node: NodeProcess, key: str, miner: str, job_id: str, outcome: str) -> None:
    r = node.request("POST", f"/v1/jobs/{job_id}/claim", key, json={"miner_id": miner})
    assert r.status_code == 200, r.text
    body = (
        {"miner_id": miner, "result": "done"}
        if outcome == "complete"
        else {"miner_id": miner, "error": "boom"}
    )
    assert node.request("POST", f"/v1/jobs/{job_id}/{outcome}", key, json=body).status_code == 200


def test_completed_failed_and_cancelled_each_deliver_one_signed_event(
    start_node, receiver: Receiver
) -> None:
    node = start_node("--no-miner", *ALLOW_LOOPBACK)
    hook = register(node, receiver.url, ["job.completed", "job.failed", "job.cancelled"])
    assert hook["secret"].startswith("whsec_") and hook["webhook_id"].startswith("wh-")
    key = node.register_miner("hooker")
    done, failed, cancelled = (node.submit(f"job {i}")["job_id"] for i in range(3))
    run_as_miner(node, key, "hooker", done, "complete")
    run_as_miner(node, key, "hooker", failed, "fail")
    node.request("POST", f"/v1/jobs/{cancelled}/cancel", node.client_key)
    requests = receiver.wait_for(3)
    time.sleep(0.3)
    assert len(receiver.received) == 3  # one each, no more
    by_job = {}
    for request in requests:
        assert signature_is_valid(hook["secret"], request)
        body = json.loads(request["body"])
        assert request["headers"]["aitbc-event"] == body["event"]
        assert request["headers"]["aitbc-event-id"] == body["event_id"]
        by_job[body["job"]["job_id"]] = body
    assert by_job[done]["event"] == "job.completed"
    assert by_job[done]["receipt_id"] == by_job[done]["job"]["receipt_id"] is not None
    assert by_job[done]["job"]["result"] == "done"
    assert by_job[failed]["event"] == "job.failed" and by_job[failed]["receipt_id"] is None
    assert by_job[cancelled]["event"] == "job.cancelled"
    # a forged body does not pass the receiver's check
    # (a change every event's body has: deliveries may arrive in any order)
    forged = dict(requests[0], body=requests[0]["body"].replace(b'"event"', b'"evil"', 1))
    assert forged["body"] != requests[0]["body"]
    assert not signature_is_valid(hook["secret"], forged)
    deliveries = node.request(
        "GET", f"/v1/webhooks/{hook['webhook_id']}/deliveries", node.client_key
    ).json()["deliveries"]
    assert {d["state"] for d in deliveries} == {"delivered"}
    assert all(d["attempts"][0]["status_code"] == 200 for d in deliveries)


def test_only_subscribed_events_of_my_own_jobs_fire(start_node, receiver: Receiver) -> None:
    node = start_node("--no-miner", *ALLOW_LOOPBACK)
    register(node, receiver.url, ["job.cancelled"])
    key = node.register_miner("m")
    other = node.new_key("client", "someone-else")
    mine = node.submit("mine")["job_id"]
    theirs = node.submit("theirs", key=other)["job_id"]
    node.request("POST", f"/v1/jobs/{theirs}/cancel", other)
    run_as_miner(node, key, "m", mine, "complete")  # not subscribed
    cancelled = node.submit("to cancel")["job_id"]
    node.request("POST", f"/v1/jobs/{cancelled}/cancel", node.client_key)
    receiver.wait_for(1)
    time.sleep(0.5)
    assert [json.loads(r["body"])["job"]["job_id"] for r in receiver.received] == [cancelled]


def test_500_three_times_then_200_delivers_on_the_fourth_attempt(
    start_node, receiver: Receiver
) -> None:
    node = start_node("--no-miner", *ALLOW_LOOPBACK, "--webhook-retry-base", "0.2")
    hook = register(node, receiver.url)
    receiver.statuses = [500, 500, 500]
    key = node.register_miner("m")
    job_id = node.submit("retry me")["job_id"]
    run_as_miner(node, key, "m", job_id, "complete")
    requests = receiver.wait_for(4)
    ids = {r["headers"]["aitbc-event-id"] for r in requests}
    assert len(ids) == 1  # the same event, retried
    gaps = [b["at"] - a["at"] for a, b in itertools.pairwise(requests)]
    assert gaps[1] > gaps[0] * 1.2  # backing off
    delivery = only_delivery(node, hook["webhook_id"], lambda d: d["state"] == "delivered")
    assert [a["status_code"] for a in delivery["attempts"]] == [500, 500, 500, 200]
    assert all(a["duration_ms"] >= 0 and a["at"] for a in delivery["attempts"])


def test_an_event_survives_a_sigkill_between_attempts(start_node, receiver: Receiver) -> None:
    node = start_node("--no-miner", *ALLOW_LOOPBACK, "--webhook-retry-base", "3")
    hook = register(node, receiver.url)
    receiver.statuses = [503]
    key = node.register_miner("m")
    job_id = node.submit("survive")["job_id"]
    run_as_miner(node, key, "m", job_id, "complete")
    first = receiver.wait_for(1)[0]
    delivery = only_delivery(node, hook["webhook_id"], lambda d: bool(d["attempts"]))
    assert delivery["attempts"][0]["status_code"] == 503
    node.kill()
    again = start_node(
        "--no-miner", *ALLOW_LOOPBACK, "--webhook-retry-base", "3", data_dir=node.data_dir
    )
    second = receiver.wait_for(2, timeout=30)[1]
    assert second["headers"]["aitbc-event-id"] == first["headers"]["aitbc-event-id"]
    assert signature_is_valid(hook["secret"], second)
    assert json.loads(second["body"])["job"]["job_id"] == job_id
    assert again.job(job_id)["status"] == "completed"


def test_a_receiver_that_never_answers_does_not_delay_completion(
    start_node, receiver: Receiver
) -> None:
    node = start_node("--no-miner", *ALLOW_LOOPBACK, "--webhook-timeout", "20")
    register(node, receiver.url)
    receiver.hang_seconds = 15
    key = node.register_miner("m")
    jobs = [node.submit(f"j{i}")["job_id"] for i in range(3)]
    started = time.monotonic()
    for job_id in jobs:
        run_as_miner(node, key, "m", job_id, "complete")
    receiver.wait_for(1)
    assert time.monotonic() - started < 5  # three claims and completions, not 15 s each
    for job_id in jobs:
        assert node.job(job_id)["status"] == "completed"


def test_webhook_registration_is_validated_and_private(start_node) -> None:
    # example.com is allowed by name, so registering it needs no DNS lookup.
    node = start_node("--no-miner", "--webhook-allow", "example.com")
    for url in ("not a url", "ftp://example.com/x", "http://", "http://host:99999/x", "", 5):
        r = node.request("POST", "/v1/webhooks", node.client_key, json={"url": url})
        assert_error(r, 400, "INVALID_URL")
    r = node.request(
        "POST",
        "/v1/webhooks",
        node.client_key,
        json={"url": "https://example.com/x", "events": ["job.exploded"]},
    )
    assert_error(r, 400, "INVALID_EVENTS")
    hook = register(node, "https://example.com/hook")
    listed = node.request("GET", "/v1/webhooks", node.client_key).json()["webhooks"]
    assert [h["webhook_id"] for h in listed] == [hook["webhook_id"]]
    assert "secret" not in listed[0]
    other = node.new_key("client", "nosy")
    assert node.request("GET", "/v1/webhooks", other).json()["webhooks"] == []
    r = node.request("DELETE", f"/v1/webhooks/{hook['webhook_id']}", other)
    assert_error(r, 403, "NOT_YOUR_WEBHOOK")
    r = node.request("GET", f"/v1/webhooks/{hook['webhook_id']}/deliveries", other)
    assert_error(r, 403, "NOT_YOUR_WEBHOOK")
    assert node.request("DELETE", f"/v1/webhooks/{hook['webhook_id']}", node.client_key).json()[
        "deleted"
    ]
    assert node.request("GET", "/v1/webhooks", node.client_key).json()["webhooks"] == []
    r = node.request("DELETE", f"/v1/webhooks/{hook['webhook_id']}", node.client_key)
    assert_error(r, 404, "WEBHOOK_NOT_FOUND")
