"""A job's two busy requests (submit, claim-next) in their plain form are answered beside
Litestar (`hotpath.HotRoutes`), exactly as Litestar answers them; every other form of them
reaches Litestar, with the body already read handed on.

The node's own application and store in this process, over httpx's ASGI transport, with a
recorder between `HotRoutes` and Litestar that notes every request reaching Litestar. A
request sent with an `Origin` header always goes to Litestar (CORS is Litestar's), which
gives each fast answer a Litestar answer to the same request to compare with.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from aitbc_node.api import create_app
from aitbc_node.hotpath import HotRoutes
from aitbc_node.keys import create_key
from aitbc_node.node import Node, NodeSettings
from tests.conftest import SMOL

TO_LITESTAR = {"Origin": "http://elsewhere.example"}
# Values that differ between two answers to the same request: ids and times.
_VARYING = re.compile(r'"(job-[0-9a-f]+|\d{4}-\d\d-\d\dT[0-9:.]+Z)"')


class Recorder:
    """ASGI app: notes the path and query of every request, then lets `app` answer it."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.seen: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            query = scope["query_string"].decode()
            origin = any(name.lower() == b"origin" for name, _ in scope["headers"])
            self.seen.append(
                scope["path"] + (f"?{query}" if query else "") + (" +origin" if origin else "")
            )
        await self.app(scope, receive, send)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    node = Node(NodeSettings(data_dir=tmp_path / "data", run_miner=False))
    try:
        yield node
    finally:
        node.stop()


def masked(response: httpx.Response, renewed: int = 0) -> tuple[int, str, str, str]:
    """What two answers to the same request share: status, content type, body without its
    ids and times (and without the first `renewed` renewed jobs), and whether a content
    length was sent."""
    text = _VARYING.sub('"-"', response.text)
    if renewed:
        text = text.replace('"renewed":[' + ",".join(['"-"'] * renewed) + "]", '"renewed":[]')
    return (
        response.status_code,
        response.headers.get("content-type", ""),
        text,
        str("content-length" in response.headers),
    )


def run(node: Node, scenario: Any) -> Any:
    recorder = Recorder(create_app(node))
    transport = httpx.ASGITransport(app=HotRoutes(recorder, node))

    async def main() -> Any:
        async with httpx.AsyncClient(transport=transport, base_url="http://node") as http:
            return await scenario(http, recorder)

    return asyncio.run(main())


def test_plain_submits_and_claims_are_answered_beside_litestar_as_litestar_answers(
    node: Node,
) -> None:
    miner_key, _ = create_key(node.store, "miner", "m1")
    client_key, _ = create_key(node.store, "client", "c1")
    as_client, as_miner = {"X-Api-Key": client_key}, {"X-Api-Key": miner_key}

    async def scenario(http: httpx.AsyncClient, recorder: Recorder) -> None:
        r = await http.post(
            "/api/v1/miners/register",
            json={"miner_id": "m1", "capabilities": [SMOL]},
            headers=as_miner,
        )
        assert r.status_code == 200, r.text
        assert recorder.seen == ["/api/v1/miners/register"]
        job = {"prompt": "hi", "model": SMOL, "params": {"max_tokens": 4}}

        fast = await http.post("/api/v1/jobs", json=job, headers=as_client)
        slow = await http.post("/api/v1/jobs", json=job, headers={**as_client, **TO_LITESTAR})
        assert fast.status_code == 201, fast.text
        assert masked(fast) == masked(slow)
        # The same bytes, but for the ids and times: key order and number formats included.
        assert fast.json().keys() == slow.json().keys()

        claim = {"miner_id": "m1", "max_jobs": 1}
        fast = await http.post("/api/v1/jobs/claim-next", json=claim, headers=as_miner)
        slow = await http.post(
            "/api/v1/jobs/claim-next", json=claim, headers={**as_miner, **TO_LITESTAR}
        )
        assert fast.status_code == 200, fast.text
        assert len(fast.json()["jobs"]) == 1 and len(slow.json()["jobs"]) == 1
        assert fast.json()["jobs"][0]["job_id"] != slow.json()["jobs"][0]["job_id"]
        # The second claim also renews the first one's job.
        assert slow.json()["renewed"] == [fast.json()["jobs"][0]["job_id"]]
        assert masked(fast) == masked(slow, renewed=1)

        # A submit that waits for its job's end: answered once a miner has finished it.
        waited = asyncio.ensure_future(
            http.post("/api/v1/jobs?wait=30", json=job, headers=as_client)
        )
        claimed: list[Any] = []
        for _ in range(600):
            r = await http.post("/api/v1/jobs/claim-next", json=claim, headers=as_miner)
            claimed = r.json()["jobs"]
            if claimed:
                break
            await asyncio.sleep(0.05)
        assert claimed, "the waiting submit's job was never pending"
        results = [{"job_id": claimed[0]["job_id"], "result": "hello"}]
        r = await http.post(
            "/api/v1/jobs/claim-next", json={**claim, "results": results}, headers=as_miner
        )
        assert [(o["job_id"], o["job"]["status"]) for o in r.json()["results"]] == [
            (claimed[0]["job_id"], "completed")
        ]
        done = await asyncio.wait_for(waited, 60)
        assert done.status_code == 201, done.text
        assert done.json()["status"] == "completed" and done.json()["result"] == "hello"
        assert done.json()["receipt_id"]

        # Errors the handlers raise: the API's shape, with the same words as Litestar's.
        for path, body, headers, status in [
            ("/api/v1/jobs", {**job, "model": "nope"}, as_client, 400),
            ("/api/v1/jobs", job, {}, 401),
            ("/api/v1/jobs", job, {"X-Api-Key": "ait_client_wrong"}, 401),
            ("/api/v1/jobs", job, as_miner, 403),
            ("/api/v1/jobs/claim-next", {"miner_id": "m2"}, as_miner, 403),
            ("/api/v1/jobs/claim-next", claim, as_client, 403),
        ]:
            fast = await http.post(path, json=body, headers=headers)
            slow = await http.post(path, json=body, headers={**headers, **TO_LITESTAR})
            assert fast.status_code == status, (path, body, fast.text)
            assert masked(fast) == masked(slow)
            assert set(fast.json()) == {"detail", "error_code"}

        # Only the requests sent to Litestar reached it.
        assert [seen for seen in recorder.seen if "+origin" not in seen] == [
            "/api/v1/miners/register"
        ]
        assert len(recorder.seen) == 1 + 2 + 6

    run(node, scenario)
    metrics = node.metrics.render().decode()
    # Counted in /metrics under the route's template, as Litestar's responses are.
    assert 'route="/api/v1/jobs",status="201"' in metrics
    assert 'route="/api/v1/jobs/claim-next",status="200"' in metrics
    assert 'route="/api/v1/jobs",status="403"' in metrics


def test_requests_not_in_the_plain_form_reach_litestar_with_their_body(node: Node) -> None:
    miner_key, _ = create_key(node.store, "miner", "m1")
    client_key, _ = create_key(node.store, "client", "c1")
    as_client = {"X-Api-Key": client_key}
    job = {"prompt": "hi", "model": SMOL}

    async def scenario(http: httpx.AsyncClient, recorder: Recorder) -> list[Any]:
        r = await http.post(
            "/api/v1/miners/register",
            json={"miner_id": "m1", "capabilities": [SMOL]},
            headers={"X-Api-Key": miner_key},
        )
        assert r.status_code == 200, r.text
        answers = []
        for query, body, headers in [
            # Decoded by the fast path, refused there, so Litestar answers with the body
            # handed on: its error names the unknown field, which only the body holds.
            ("", {**job, "temperatur": 1}, as_client),
            ("", {"prompt": 5}, as_client),
            ("?wait=61", job, as_client),
            ("?wait=1e-1", job, as_client),
            ("?wait=0.1&wait=0.2", job, as_client),
            ("?other=1", job, as_client),
            ("", job, {**as_client, "Idempotency-Key": "k-1"}),
        ]:
            r = await http.post(f"/api/v1/jobs{query}", json=body, headers=headers)
            answers.append((r.status_code, r.json()))
        # An empty body, and one without a Content-Length (sent in chunks).
        r = await http.post("/api/v1/jobs", content=b"", headers=as_client)
        answers.append((r.status_code, r.json()))

        async def chunks() -> Any:
            yield b'{"prompt": "hi", '
            yield b'"model": "' + SMOL.encode() + b'"}'

        r = await http.post("/api/v1/jobs", content=chunks(), headers=as_client)
        answers.append((r.status_code, r.json()))
        r = await http.post("/api/v1/jobs/claim-next?wait=1", json={"miner_id": "m1"}, headers={})
        answers.append((r.status_code, r.json()))
        assert recorder.seen == [
            "/api/v1/miners/register",
            "/api/v1/jobs",
            "/api/v1/jobs",
            "/api/v1/jobs?wait=61",
            "/api/v1/jobs?wait=1e-1",
            "/api/v1/jobs?wait=0.1&wait=0.2",
            "/api/v1/jobs?other=1",
            "/api/v1/jobs",
            "/api/v1/jobs",
            "/api/v1/jobs",
            "/api/v1/jobs/claim-next?wait=1",
        ]
        return answers

    answers = run(node, scenario)
    statuses = [status for status, _ in answers]
    assert statuses[0] == 400 and "temperatur" in answers[0][1]["detail"], answers[0]
    assert answers[0][1]["error_code"] in ("UNKNOWN_FIELDS", "UNKNOWN_PARAMS")
    assert statuses[1] == 400 and "prompt" in answers[1][1]["detail"], answers[1]
    assert statuses[2] == 400 and "wait" in answers[2][1]["detail"], answers[2]
    # Litestar takes these as it always has: a wait in exponent form, one of two waits, an
    # unknown query ignored, and an Idempotency-Key with its checks.
    assert statuses[3:7] == [201, 201, 201, 201], answers[3:7]
    assert answers[7] == (
        400,
        {"detail": "the body must be a JSON object", "error_code": "INVALID_BODY"},
    )
    assert statuses[8] == 201, answers[8]
    assert statuses[9] == 401, answers[9]
