"""Prometheus `/metrics` on real nodes: scraped, parsed with prometheus_client's own parser,
and compared before and after real jobs (built-in miner, remote miner, expired lease,
webhook deliveries, sealed blocks)."""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families

from aitbc_node.metrics import MAX_MODELS, OTHER_MODEL
from tests.conftest import GENERATION_WAIT, LONG_PROMPT, SMOL, NodeProcess
from tests.test_jobs_api import assert_error
from tests.test_webhooks import ALLOW_LOOPBACK, Receiver, register

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
METRICS_KEY = "scrape-me-0123456789"
HISTOGRAMS = (
    "aitbc_job_queue_wait_seconds",
    "aitbc_job_time_to_first_token_seconds",
    "aitbc_job_generation_seconds",
    "aitbc_job_tokens_per_second",
)

SUBMIT_201 = {"method": "POST", "route": "/api/v1/jobs", "status": "201"}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def metrics_url(node: NodeProcess) -> str:
    return node.url.removesuffix("/api") + "/metrics"


def scrape(node: NodeProcess, headers: dict[str, str] | None = None) -> Samples:
    """Every sample of one scrape, by name and labels."""
    r = node.http.get(metrics_url(node), headers=headers or {})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == CONTENT_TYPE
    samples: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; a series not there yet counts as 0."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def scrape_until(
    node: NodeProcess, headers: dict[str, str], ready: Callable[[Samples], bool]
) -> Samples:
    """Scrape until `ready(samples)` (for what moves in background threads); the bound is
    generous, not a budget."""
    deadline = time.monotonic() + 60
    while not ready(samples := scrape(node, headers)):
        assert time.monotonic() < deadline, "the metrics did not move in time"
        time.sleep(0.1)
    return samples


def test_two_jobs_move_the_counters_and_histograms_by_their_usage(start_node) -> None:
    node = start_node("--metrics-key", METRICS_KEY, *ALLOW_LOOPBACK, "--webhook-retry-base", "0.1")
    bearer = {"Authorization": f"Bearer {METRICS_KEY}"}

    # --metrics-key: 401 in the API's error shape without the key or with another one.
    body = assert_error(node.http.get(metrics_url(node)), 401, "MISSING_API_KEY")
    assert "--metrics-key" in body["detail"]
    wrong = node.http.get(metrics_url(node), headers={"Authorization": "Bearer nope"})
    assert_error(wrong, 401, "INVALID_API_KEY")
    assert wrong.headers["www-authenticate"] == "Bearer"
    client_key = node.http.get(metrics_url(node), headers={"X-Api-Key": node.client_key})
    assert_error(client_key, 401, "INVALID_API_KEY")  # only the metrics key opens it
    assert scrape(node, {"X-Api-Key": METRICS_KEY})

    receiver = Receiver()
    try:
        receiver.statuses = [500]  # the first attempt fails, its retry delivers
        register(node, receiver.url, ["job.completed"])
        before = scrape(node, bearer)
        started = time.monotonic()
        params = {"max_tokens": 12, "temperature": 0, "seed": 1}
        ids = [node.submit(LONG_PROMPT, params=params)["job_id"] for _ in range(2)]
        jobs = [node.wait_for(job_id, ("completed",), timeout=GENERATION_WAIT) for job_id in ids]
        after = scrape(node, bearer)
        elapsed = time.monotonic() - started
        receiver.wait_for(3)
        # The webhook counters and the sealer move after the jobs, in their own threads.
        later = scrape_until(
            node,
            bearer,
            lambda s: (
                value(s, "aitbc_webhook_deliveries_total") >= 2
                and moved(before, s, "aitbc_blocks_sealed_total") >= 1
            ),
        )
    finally:
        receiver.server.shutdown()

    model = {"model": SMOL}
    assert moved(before, after, "aitbc_jobs", status="completed", model=SMOL) == 2
    assert value(after, "aitbc_jobs", status="pending", model=SMOL) == 0
    assert value(after, "aitbc_queue_depth") == 0
    assert value(after, "aitbc_miners_online") >= 1
    completion = sum(job["usage"]["completion_tokens"] for job in jobs)
    prompt = sum(job["usage"]["prompt_tokens"] for job in jobs)
    assert completion > 0 and prompt > 0
    assert moved(before, after, "aitbc_completion_tokens_total", **model) == completion
    assert moved(before, after, "aitbc_prompt_tokens_total", **model) == prompt

    for name in HISTOGRAMS:
        assert moved(before, after, f"{name}_count", **model) == 2, name
        # every observation falls in the +Inf bucket
        assert value(after, f"{name}_bucket", le="+Inf", **model) == value(
            after, f"{name}_count", **model
        )
    seconds = {name: moved(before, after, f"{name}_sum", **model) for name in HISTOGRAMS}
    # Plausible sums: within the time the two jobs took from submit to result, and time to
    # first token within generation time (times are whole milliseconds, so a claim can
    # follow a submit within the same one: queue wait may sum to 0).
    assert 0 <= seconds["aitbc_job_queue_wait_seconds"] <= 2 * elapsed
    assert 0 < seconds["aitbc_job_generation_seconds"] <= 2 * elapsed
    assert seconds["aitbc_job_time_to_first_token_seconds"] >= 0
    assert (
        seconds["aitbc_job_time_to_first_token_seconds"] <= seconds["aitbc_job_generation_seconds"]
    )
    assert seconds["aitbc_job_tokens_per_second"] > 0

    # Requests by route template and status: the submits, and the refused scrapes.
    submits = moved(before, after, "aitbc_http_requests_total", **SUBMIT_201)
    assert submits >= 2
    refused = value(
        after, "aitbc_http_requests_total", method="GET", route="/metrics", status="401"
    )
    assert refused >= 3
    polls = [
        labels
        for (name, labels) in after
        if name == "aitbc_http_requests_total" and dict(labels)["route"].startswith("/api/v1/jobs/")
    ]
    assert polls and all(dict(labels)["route"] == "/api/v1/jobs/{job_id}" for labels in polls)
    assert not any("job-" in dict(labels).get("route", "") for (_, labels) in after)

    assert value(later, "aitbc_webhook_deliveries_total") == 2
    assert value(later, "aitbc_webhook_delivery_failures_total", final="false") == 1
    assert value(later, "aitbc_webhook_delivery_failures_total", final="true") == 0


def test_remote_miner_timings_and_an_expired_lease(start_node) -> None:
    # Public by default; no built-in miner; leases of one second that a silent miner loses.
    node = start_node(
        "--no-miner", "--lease-seconds", "1", "--max-attempts", "2", "--accept-unserved-models"
    )
    r = node.http.get(metrics_url(node))
    assert r.status_code == 200 and r.headers["content-type"] == CONTENT_TYPE
    key = node.register_miner("remote-1")
    before = scrape(node)
    assert value(before, "aitbc_miners_online") == 1

    def run(prompt: str, progress: str | None, usage: dict[str, int]) -> None:
        job_id = node.submit(prompt)["job_id"]
        claim = {"miner_id": "remote-1"}
        assert node.request("POST", f"/v1/jobs/{job_id}/claim", key, json=claim).status_code == 200
        if progress is not None:
            report = {"miner_id": "remote-1", "text": progress}
            r = node.request("POST", f"/v1/jobs/{job_id}/progress", key, json=report)
            assert r.status_code == 200, r.text
        done = {"miner_id": "remote-1", "result": (progress or "") + " done", "usage": usage}
        r = node.request("POST", f"/v1/jobs/{job_id}/complete", key, json=done)
        assert r.status_code == 200, r.text

    run("with progress", "Hello", {"prompt_tokens": 5, "completion_tokens": 7})
    run("without progress", None, {"prompt_tokens": 3, "completion_tokens": 4})
    middle = scrape(node)
    model = {"model": SMOL}
    assert moved(before, middle, "aitbc_jobs", status="completed", model=SMOL) == 2
    assert moved(before, middle, "aitbc_completion_tokens_total", **model) == 11
    assert moved(before, middle, "aitbc_prompt_tokens_total", **model) == 8
    assert moved(before, middle, "aitbc_job_generation_seconds_count", **model) == 2
    assert moved(before, middle, "aitbc_job_queue_wait_seconds_count", **model) == 2
    # Time to first token is known only for the job whose miner reported text as it went.
    assert moved(before, middle, "aitbc_job_time_to_first_token_seconds_count", **model) == 1

    # A claim whose miner goes silent: the reaper requeues it when its lease runs out.
    lost = node.submit("lost")["job_id"]
    claim = {"miner_id": "remote-1"}
    assert node.request("POST", f"/v1/jobs/{lost}/claim", key, json=claim).status_code == 200
    assert value(scrape(node), "aitbc_jobs", status="running", model=SMOL) == 1
    node.wait_for(lost, ("pending",))
    after = scrape(node)
    assert moved(before, after, "aitbc_leases_expired_total", outcome="requeued") == 1
    assert moved(before, after, "aitbc_leases_expired_total", outcome="failed") == 0
    assert value(after, "aitbc_queue_depth") == 1
    assert value(after, "aitbc_jobs", status="pending", model=SMOL) == 1

    # Clients may name any model here: the jobs gauge keeps to MAX_MODELS label values, the
    # rest added up under (other), and the queue depth still counts every pending job.
    for i in range(MAX_MODELS + 10):
        node.submit("which model?", model=f"unserved-{i:02d}")
    flood = scrape(node)
    pending = {
        dict(labels)["model"]: n
        for (name, labels), n in flood.items()
        if name == "aitbc_jobs" and dict(labels)["status"] == "pending"
    }
    assert len(pending) == MAX_MODELS and OTHER_MODEL in pending
    assert sum(pending.values()) == value(flood, "aitbc_queue_depth") == MAX_MODELS + 11


def test_no_metrics_turns_the_route_off(start_node) -> None:
    node = start_node("--no-miner", "--no-metrics")
    assert_error(node.http.get(metrics_url(node)), 404, "NOT_FOUND")
    assert node.request("GET", "/health").status_code == 200
