"""The explorer's charts: `GET /api/explorer/timeseries` against real nodes and a real store,
and the overview's SVG charts in Debian's Chromium (through Playwright)."""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect

from aitbc_node import timeseries
from aitbc_node.store import Store

try:
    from tests.browser import PHONE, Watch, screenshot
    from tests.conftest import GENERATION_WAIT, SMOL, NodeProcess
except ModuleNotFoundError:  # plain `pytest`: tests/ is on sys.path, the repository root is not
    from browser import PHONE, Watch, screenshot
    from conftest import GENERATION_WAIT, SMOL, NodeProcess

UI_WAIT = 120_000  # ms: a bound for a busy machine, not a budget
expect.set_options(timeout=UI_WAIT)
DESKTOP_TALL = {"width": 1280, "height": 900}
JOBS = 3
POINT_FIELDS = {
    "start",
    "jobs_completed",
    "jobs_failed",
    "tokens",
    "tokens_per_second",
    "queue_depth",
    "latency_p50_ms",
    "latency_p95_ms",
}


def ms(stamp: str) -> int:
    """Epoch milliseconds of the node's RFC 3339 time."""
    return round(datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() * 1000)


def series(node: NodeProcess, window: str = "hour") -> dict[str, Any]:
    r = node.request("GET", "/explorer/timeseries", params={"window": window})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def busy_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeProcess, list]]:
    """A node of this module's own (so its numbers are exactly its jobs) that has run a few
    short jobs on the built-in miner."""
    proc = NodeProcess(tmp_path_factory.mktemp("charts") / "data").start()
    try:
        ids = [
            proc.submit(f"Count to {n}.", params={"max_tokens": 8, "seed": n})["job_id"]
            for n in range(JOBS)
        ]
        jobs = [proc.wait_for(i, ("completed",), timeout=GENERATION_WAIT) for i in ids]
        yield proc, jobs
    finally:
        proc.stop()


# -- the endpoint --------------------------------------------------------------------------


@pytest.mark.parametrize("window, points, seconds", [("hour", 60, 60), ("day", 48, 1800)])
def test_points_add_up_to_the_jobs(
    busy_node: tuple[NodeProcess, list], window: str, points: int, seconds: int
) -> None:
    node, jobs = busy_node
    data = series(node, window)
    assert data["window"] == window and data["bucket_seconds"] == seconds
    assert len(data["points"]) == points
    assert all(set(p) == POINT_FIELDS for p in data["points"])
    starts = [ms(p["start"]) for p in data["points"]]
    assert all(b - a == seconds * 1000 for a, b in itertools.pairwise(starts))
    assert (
        starts[0] == ms(data["start"])
        and starts[-1] <= ms(data["end"]) < starts[-1] + seconds * 1000
    )

    tokens = sum(j["usage"]["completion_tokens"] for j in jobs)
    assert 0 < tokens <= 8 * JOBS
    assert sum(p["jobs_completed"] for p in data["points"]) == JOBS
    assert sum(p["jobs_failed"] for p in data["points"]) == 0
    assert sum(p["tokens"] for p in data["points"]) == tokens
    # Each job in the bucket its completion time falls in.
    for job in jobs:
        done = ms(job["completed_at"])
        bucket = next(
            p for p, s in zip(data["points"], starts, strict=True) if s <= done < s + seconds * 1000
        )
        assert bucket["jobs_completed"] >= 1 and bucket["latency_p50_ms"] is not None
    for p, s in zip(data["points"], starts, strict=True):
        elapsed = min(seconds * 1000, ms(data["end"]) - s)
        assert p["tokens_per_second"] == pytest.approx(p["tokens"] * 1000 / elapsed, abs=0.001)
        assert 0 <= p["queue_depth"] <= JOBS
        if p["jobs_completed"] == 0:
            assert p["latency_p50_ms"] is None and p["latency_p95_ms"] is None

    latencies = sorted(ms(j["completed_at"]) - ms(j["created_at"]) for j in jobs)
    totals = data["totals"]
    assert totals["jobs_completed"] == JOBS and totals["tokens"] == tokens
    assert totals["queue_depth"] == 0
    # Nearest rank of three: the middle one and the largest.
    assert totals["latency_p50_ms"] == latencies[1]
    assert totals["latency_p95_ms"] == latencies[2]

    assert [m["model"] for m in data["models"]] == [SMOL]
    assert [m["miner_id"] for m in data["miners"]] == ["builtin"]
    for work in (data["models"][0], data["miners"][0]):
        assert work["jobs_completed"] == JOBS and work["tokens"] == tokens
        assert work["generation_tokens_per_second"] > 0
    # The miners list keeps its tutorial fields.
    miners = node.request("GET", "/v1/miners").json()["miners"]
    assert "builtin" in [m["miner_id"] for m in miners]


@pytest.mark.parametrize("bad", ["week", "", "HOUR", "hour;day"])
def test_a_bad_window_is_a_400(busy_node: tuple[NodeProcess, list], bad: str) -> None:
    node, _ = busy_node
    r = node.request("GET", "/explorer/timeseries", params={"window": bad})
    assert r.status_code == 400, r.text
    body = r.json()
    assert set(body) == {"detail", "error_code"} and body["error_code"] == "INVALID_WINDOW"
    assert body["detail"].startswith("window")


def test_the_openapi_document_describes_it(busy_node: tuple[NodeProcess, list]) -> None:
    node, _ = busy_node
    doc = node.request("GET", "/schema/openapi.json").json()
    op = doc["paths"]["/api/explorer/timeseries"]["get"]
    assert op["tags"] == ["explorer"] and "security" not in op
    assert {p["name"] for p in op["parameters"]} == {"window"}
    ref = op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    schema = doc["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert {"points", "totals", "models", "miners"} <= set(schema["properties"])
    assert "400" in op["responses"]


def test_failed_cancelled_and_waiting_jobs(coordinator: NodeProcess) -> None:
    """Failed jobs count as failed, a job cancelled in the queue and one still waiting count
    in the queue depth, a remote miner's reported tokens in the totals."""
    key = coordinator.register_miner("charter")

    def claimed(prompt: str) -> str:
        job_id = coordinator.submit(prompt)["job_id"]
        r = coordinator.request(
            "POST", f"/v1/jobs/{job_id}/claim", key, json={"miner_id": "charter"}
        )
        assert r.status_code == 200, r.text
        return job_id

    failed = claimed("fail me")
    r = coordinator.request(
        "POST", f"/v1/jobs/{failed}/fail", key, json={"miner_id": "charter", "error": "no GPU"}
    )
    assert r.status_code == 200, r.text
    done = claimed("finish me")
    r = coordinator.request(
        "POST",
        f"/v1/jobs/{done}/complete",
        key,
        json={
            "miner_id": "charter",
            "result": "done",
            "usage": {"prompt_tokens": 3, "completion_tokens": 5},
        },
    )
    assert r.status_code == 200, r.text
    cancelled = coordinator.submit("never mind")["job_id"]
    assert coordinator.request(
        "POST", f"/v1/jobs/{cancelled}/cancel", coordinator.client_key
    ).is_success
    coordinator.submit("wait for me")

    data = series(coordinator)
    totals = data["totals"]
    assert (totals["jobs_completed"], totals["jobs_failed"], totals["tokens"]) == (1, 1, 5)
    assert totals["queue_depth"] == 1 and data["points"][-1]["queue_depth"] == 1
    assert data["miners"] == [
        {
            "miner_id": "charter",
            "jobs_completed": 1,
            "tokens": 5,
            "tokens_per_second": data["miners"][0]["tokens_per_second"],
            "generation_tokens_per_second": data["miners"][0]["generation_tokens_per_second"],
        }
    ]


# -- the queries, on a real store with a long history ---------------------------------------

NOW = 1_800_000_000_000  # a minute boundary: the bucket now running starts here
MIN = 60_000


def add_job(store: Store, n: int, status: str, created: int, **times: Any) -> None:
    with store.write() as db:
        db.execute(
            "INSERT INTO jobs (job_id, client, prompt, model, served_model, params, status,"
            " created_ms, started_ms, completed_ms, completion_tokens, miner_id)"
            " VALUES (?, 'c', 'p', 'm', 'm', '{}', ?, ?, ?, ?, ?, ?)",
            (
                f"job-{n}",
                status,
                created,
                times.get("started"),
                times.get("completed"),
                times.get("tokens"),
                times.get("miner", "x"),
            ),
        )


def test_queue_depth_is_rebuilt_from_the_jobs(tmp_path: Path) -> None:
    store = Store(tmp_path / "node.db")
    try:
        # Long before the window: done, so nowhere in it.
        add_job(
            store,
            1,
            "completed",
            NOW - 300 * MIN,
            started=NOW - 299 * MIN,
            completed=NOW - 298 * MIN,
            tokens=9,
        )
        # Waiting since before the window: in the queue all along.
        add_job(store, 2, "pending", NOW - 120 * MIN)
        # Queued before the window, started 10 minutes into it.
        add_job(
            store,
            3,
            "completed",
            NOW - 70 * MIN,
            started=NOW - 49 * MIN,
            completed=NOW - 49 * MIN + 500,
            tokens=4,
        )
        # Cancelled while queued, 3 minutes after it came.
        add_job(store, 4, "cancelled", NOW - 5 * MIN, completed=NOW - 2 * MIN)
        # Queued a minute and a half ago, started and failed in the next minute.
        add_job(store, 5, "failed", NOW - 90_000, started=NOW - 20_000, completed=NOW - 10_000)
        data = timeseries.timeseries(store, "hour", now=NOW + 30_000)
    finally:
        store.close()
    points = data["points"]
    assert len(points) == 60 and points[-1]["start"].endswith(":00.000Z")
    depth = [p["queue_depth"] for p in points]
    # Bucket i spans [NOW - (59 - i) min, NOW - (58 - i) min).
    assert depth[:10] == [2] * 10  # jobs 2 and 3 until job 3 starts
    assert depth[10:54] == [1] * 44
    assert depth[54:57] == [2] * 3  # job 4 waiting
    assert depth[57:] == [2, 1, 1]  # job 4 gone, job 5 waiting, then running
    assert [p["jobs_completed"] for p in points].index(1) == 10
    assert points[10]["tokens"] == 4 and points[10]["latency_p50_ms"] == 21 * MIN + 500
    assert points[58]["jobs_failed"] == 1
    assert points[-1]["tokens_per_second"] == 0
    assert points[10]["tokens_per_second"] == pytest.approx(4 / 60, abs=0.001)
    assert data["totals"]["jobs_completed"] == 1 and data["totals"]["tokens"] == 4


def test_every_query_is_a_range_scan(tmp_path: Path) -> None:
    """No statement scans the whole jobs table: the cost follows the window, not the history."""
    store = Store(tmp_path / "node.db")
    try:
        db = store.read()
        for sql in timeseries.STATEMENTS:
            plan = [
                r["detail"]
                for r in db.execute("EXPLAIN QUERY PLAN " + sql, {"start": 1, "end": 2, "step": 1})
            ]
            assert not [d for d in plan if re.match(r"SCAN jobs\b", d)], (sql, plan)
            assert any(d.startswith("SEARCH jobs USING") for d in plan), (sql, plan)
    finally:
        store.close()


# -- the page ------------------------------------------------------------------------------


def open_page(browser: Browser, viewport: dict[str, int]) -> tuple[Page, Watch]:
    context = browser.new_context(viewport=viewport)
    context.set_default_timeout(UI_WAIT)
    page = context.new_page()
    return page, Watch.attach(page)


def root(node: NodeProcess) -> str:
    return node.url.removesuffix("/api") + "/"


def test_charts_render_the_jobs(busy_node: tuple[NodeProcess, list], browser: Browser) -> None:
    node, jobs = busy_node
    tokens = sum(j["usage"]["completion_tokens"] for j in jobs)
    page, watch = open_page(browser, DESKTOP_TALL)
    try:
        page.goto(root(node))
        expect(page.locator("#live")).to_have_text("Live")
        # The page polls every 1.5 s but reads the series only every few seconds.
        starts = []
        for _ in range(2):
            with page.expect_response(lambda r: "/explorer/timeseries" in r.url) as read:
                pass
            starts.append(read.value.request.timing["startTime"])
        assert starts[1] - starts[0] >= 4_900, starts
        completed = page.locator("#chart-completed")
        expect(completed.locator("figcaption")).to_contain_text("Jobs completed / min")
        expect(page.locator("#chart-completed-s")).to_contain_text(f"{JOBS} jobs in the last hour")
        # The completed-jobs series draws bars of some height, within the chart.
        heights = completed.locator("svg rect").evaluate_all(
            "rs => rs.map(r => r.getBBox().height)"
        )
        assert heights and all(h > 0 for h in heights), heights
        assert completed.locator("svg rect").first.bounding_box()["height"] > 0
        # The latest values as text: the page agrees with the API once both read the same
        # minute (the page reads the series every few seconds).
        deadline = time.monotonic() + UI_WAIT / 1000
        while True:
            last = series(node)["points"][-1]
            shown = page.locator("#chart-completed-v").inner_text()
            if shown == str(last["jobs_completed"]) and series(node)["points"][-1] == last:
                break
            assert time.monotonic() < deadline, (shown, last)
            time.sleep(0.5)
        expect(page.locator("#chart-tps-s")).to_contain_text(f"{tokens} tokens in the last hour")
        expect(page.locator("#chart-queue-v")).to_have_text("0")
        expect(page.locator("#chart-latency svg path.k-acc")).to_have_attribute(
            "d", re.compile("^M")
        )
        for name in ("completed", "tps", "queue", "latency"):
            svg = page.locator(f"#chart-{name} svg")
            expect(svg).to_have_attribute("role", "img")
            assert page.locator(f"#chart-{name}-t").inner_text().strip()
        # The miners panel: per-miner and per-model numbers over the window.
        expect(page.locator("#miners")).to_contain_text(f"Last hour: {JOBS} jobs · {tokens} tokens")
        expect(page.locator("#models-work")).to_contain_text(SMOL)
        screenshot(page, "charts-desktop")

        # The toggle reads the day's series and says so.
        with page.expect_response(lambda r: "window=day" in r.url):
            page.get_by_role("button", name="Last day").click()
        expect(page.get_by_role("button", name="Last day")).to_have_attribute(
            "aria-pressed", "true"
        )
        expect(page.locator("#chart-completed figcaption")).to_contain_text("/ 30 min")
        expect(page.locator("#chart-completed-s")).to_contain_text(f"{JOBS} jobs in the last day")
        # The choice survives a reload.
        page.reload()
        expect(page.locator("#chart-completed-s")).to_contain_text("in the last day")
        watch.assert_clean()
    finally:
        page.context.close()


def test_charts_on_a_phone(busy_node: tuple[NodeProcess, list], browser: Browser) -> None:
    node, _ = busy_node
    page, watch = open_page(browser, PHONE)
    try:
        page.goto(root(node))
        expect(page.locator("#chart-completed-s")).to_contain_text(f"{JOBS} jobs in the")
        expect(page.locator("#chart-completed svg rect").first).to_be_visible()
        width = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
        assert width[0] <= width[1], f"horizontal overflow: {width}"
        screenshot(page, "charts-phone")
        screenshot(page.locator("#charts"), "charts-phone-activity")
        watch.assert_clean()
    finally:
        page.context.close()
