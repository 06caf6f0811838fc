"""A claim-next long poll that found nothing is woken by the next job, even one submitted in
the very group of writes its own claim was in.

The node's own application and store in this process, driven over httpx's ASGI transport
(requests served at once on the test's own event loop), so the test can hold the store's
writer thread busy and queue the claim and the submit behind it: the writer then runs them
as one group, the claim first.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from aitbc_node.api import create_app
from aitbc_node.keys import create_key
from aitbc_node.node import Node, NodeSettings
from tests.conftest import SMOL


def test_a_waiting_claim_is_woken_by_a_job_submitted_in_its_own_group(tmp_path: Path) -> None:
    node = Node(NodeSettings(data_dir=tmp_path / "data", run_miner=False))
    miner_key, _ = create_key(node.store, "miner", "m1")
    client_key, _ = create_key(node.store, "client", "c1")

    tasks = node.store._tasks  # the writes queued for the writer thread

    async def until(condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 60
        while not condition():
            assert time.monotonic() < deadline, f"{what} never happened"
            await asyncio.sleep(0.01)

    async def scenario() -> tuple[Any, Any]:
        transport = httpx.ASGITransport(app=create_app(node))
        async with httpx.AsyncClient(transport=transport, base_url="http://node") as http:
            r = await http.post(
                "/api/v1/miners/register",
                json={"miner_id": "m1", "capabilities": [SMOL]},
                headers={"X-Api-Key": miner_key},
            )
            assert r.status_code == 200, r.text
            # The writer is held busy: what is queued meanwhile runs as one group, in order.
            started, release = threading.Event(), threading.Event()

            def hold_the_writer() -> None:
                started.set()
                release.wait(120)

            busy = asyncio.ensure_future(node.store.run(hold_the_writer))
            await until(started.is_set, "the writer taking the busy write")
            claim = asyncio.ensure_future(
                http.post(
                    "/api/v1/jobs/claim-next",
                    json={"miner_id": "m1", "wait": 60},
                    headers={"X-Api-Key": miner_key},
                )
            )
            await until(lambda: tasks.qsize() == 1, "the claim queued")
            submit = asyncio.ensure_future(
                http.post(
                    "/api/v1/jobs",
                    json={"prompt": "wake the miner", "model": SMOL},
                    headers={"X-Api-Key": client_key},
                )
            )
            await until(lambda: tasks.qsize() == 2, "the submit queued behind it")
            release.set()
            await busy
            submitted = await submit
            # Well inside the claim's wait: a wake-up lost here would leave it the full 60 s.
            claimed = await asyncio.wait_for(claim, 30)
            return submitted, claimed

    try:
        submitted, claimed = asyncio.run(scenario())
        assert submitted.status_code == 201, submitted.text
        assert claimed.status_code == 200, claimed.text
        job_id = submitted.json()["job_id"]
        assert [job["job_id"] for job in claimed.json()["jobs"]] == [job_id]
        assert node.jobs.peek(job_id)["status"] == "running"
    finally:
        node.stop()
