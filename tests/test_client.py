"""The Python client library (`aitbc_node.client`) against real nodes: long-polling, retries
and Retry-After, typed errors, streaming, the async twin, and receipts verified here."""

from __future__ import annotations

import asyncio
import inspect
import json
import threading
import time
from typing import Any

import pytest

from aitbc_node.client import (
    AsyncCoordinatorClient,
    CoordinatorClient,
    CoordinatorError,
    CoordinatorUnavailable,
    JobFailed,
)
from aitbc_node.signing import NodeKey
from tests.conftest import GENERATION_WAIT, LONG_PROMPT, SMOL, NodeProcess, free_port, run_cli

WAIT = GENERATION_WAIT  # seconds a job may take: the box is shared, generation can be slow


def pinned_key(node: NodeProcess) -> str:
    """The node's public key as its operator reads it from the data directory."""
    shown = run_cli("keys", "show", "--json", "--data-dir", str(node.data_dir)).stdout
    return json.loads(shown)["public_key"]


def test_wait_for_job_long_polls_once_for_the_completed_job(start_node) -> None:
    # How soon it returns is measured by tests/bench/wait_latency.py.
    node = start_node("--no-miner")
    miner_key = node.register_miner("m")
    with CoordinatorClient(node.url, node.client_key) as client:
        job_id = client.submit_job("long-poll me", model=SMOL)["job_id"]
        r = node.request("POST", f"/v1/jobs/{job_id}/claim", miner_key, json={"miner_id": "m"})
        assert r.status_code == 200, r.text
        sent: list[Any] = []
        polling = threading.Event()

        def on_request(request: Any) -> None:
            sent.append(request)
            polling.set()

        client.client.event_hooks["request"].append(on_request)
        done: dict = {}
        waiter = threading.Thread(
            target=lambda: done.update(job=client.wait_for_job(job_id, timeout=WAIT))
        )
        waiter.start()
        assert polling.wait(WAIT)
        r = node.request(
            "POST", f"/v1/jobs/{job_id}/complete", miner_key, json={"miner_id": "m", "result": "ok"}
        )
        assert r.status_code == 200, r.text
        waiter.join(WAIT)
        assert not waiter.is_alive()
    assert done["job"]["status"] == "completed" and done["job"]["result"] == "ok"
    # One request that the node held until the job ended: no polling with naps in between.
    assert [(r.method, r.url.path) for r in sent] == [("GET", f"/api/v1/jobs/{job_id}")]
    assert float(sent[0].url.params["wait"]) >= 30


def test_a_429_is_retried_after_retry_after(start_node) -> None:
    node = start_node("--no-miner", "--rate", "client=1/1")
    with CoordinatorClient(node.url, node.client_key, retries=3) as client:
        assert client.list_jobs() == {"jobs": [], "next_cursor": None}
        started = time.monotonic()
        assert client.list_jobs()["jobs"] == []  # 429 on the node, then a retry that works
        assert time.monotonic() - started >= 0.9
    impatient = CoordinatorClient(node.url, node.client_key, retries=0)
    with impatient, pytest.raises(CoordinatorError) as caught:
        impatient.list_jobs()
    error = caught.value
    assert error.status == 429
    assert error.error_code == "RATE_LIMITED"
    assert error.retry_after is not None and error.retry_after >= 1
    assert "rate limit" in error.detail


def test_errors_carry_status_and_error_code(node: NodeProcess) -> None:
    with CoordinatorClient(node.url, node.client_key) as client:
        with pytest.raises(CoordinatorError) as caught:
            client.get_job("job-0000000000000000")
        assert (caught.value.status, caught.value.error_code) == (404, "JOB_NOT_FOUND")
        assert caught.value.detail

        with pytest.raises(CoordinatorError) as caught:
            client.submit_job("hi", model="no-such-model")
        assert (caught.value.status, caught.value.error_code) == (400, "UNKNOWN_MODEL")
        assert SMOL in caught.value.detail  # it names the models that are served

        # submitted with a wait, the answer is the ended job (on a slow box, its state then)
        job = client.submit_job("hi", max_tokens=4, wait=60)
        if job["status"] in ("pending", "running"):
            job = client.wait_for_job(job["job_id"], WAIT)
        assert job["status"] == "completed" and job["receipt_id"]
        with pytest.raises(CoordinatorError) as caught:
            client.cancel_job(job["job_id"])
        assert (caught.value.status, caught.value.error_code) == (409, "JOB_ALREADY_FINISHED")

    with CoordinatorClient(node.url, "ait_client_not_a_key") as stranger:
        with pytest.raises(CoordinatorError) as caught:
            stranger.list_jobs()
        assert (caught.value.status, caught.value.error_code) == (401, "INVALID_API_KEY")
        assert not isinstance(caught.value, CoordinatorUnavailable)


def test_a_closed_port_raises_coordinator_unavailable() -> None:
    url = f"http://127.0.0.1:{free_port()}/api"
    with CoordinatorClient(url, "k", retries=2, backoff=0.05) as client:
        sent: list[Any] = []
        client.client.event_hooks["request"].append(sent.append)
        started = time.monotonic()
        with pytest.raises(CoordinatorUnavailable) as caught:
            client.health()
        assert time.monotonic() - started >= 0.15  # it backed off 0.05 s, then 0.1 s
        assert caught.value.status == 0 and caught.value.error_code == "UNREACHABLE"
        assert [r.method for r in sent] == ["GET"] * 3  # the first try and 2 retries, no more
        with pytest.raises(CoordinatorUnavailable):
            client.submit_job("hi", model=SMOL)  # a refused connection: safe to retry a POST
        assert [r.method for r in sent[3:]] == ["POST"] * 3


def test_the_client_calls_on_a_real_job(node: NodeProcess) -> None:
    pubkey = pinned_key(node)
    with CoordinatorClient(node.url, node.client_key) as client:
        assert client.health()["status"] == "ok"
        assert client.default_model() == SMOL
        submitted = client.submit_job("Say hello.", max_tokens=16, temperature=0, seed=3)
        assert submitted["status"] in ("pending", "running")
        job = client.wait_for_job(submitted["job_id"], WAIT)
        assert job["status"] == "completed" and job["result"]
        assert client.get_job(job["job_id"]) == job

        listed = client.list_jobs(status="completed", limit=50)
        assert job["job_id"] in [j["job_id"] for j in listed["jobs"]]
        assert {j["status"] for j in listed["jobs"]} == {"completed"}

        receipt = client.get_receipt(job["receipt_id"])
        assert receipt["job_id"] == job["job_id"]
        receipts = client.list_receipts(client=receipt["client_address"], limit=50)
        assert receipt in [entry["receipt"] for entry in receipts["receipts"]]

        verdict = client.verify_receipt(receipt, pubkey)
        assert verdict.valid, verdict.reasons
        other = client.verify_receipt(receipt, NodeKey.generate().public_key_hex)
        assert not other.valid and other.reasons
        # By id, against the key the node shows (trust on first use), which is now pinned.
        assert client.verify_receipt(job["receipt_id"]).valid
        assert client.node_public_key == pubkey
        tampered = {**receipt, "completion_tokens": receipt["completion_tokens"] + 1}
        assert not client.verify_receipt(tampered, pubkey).valid

        stats = client.stats()
        assert stats["jobs"]["completed"] >= 1 and stats["served_models"] == [SMOL]


def test_cancel_job(start_node) -> None:
    node = start_node("--no-miner", "--accept-unserved-models")
    with CoordinatorClient(node.url, node.client_key) as client:
        job = client.submit_job("wait in the queue", model=SMOL)
        cancelled = client.cancel_job(job["job_id"])
        assert cancelled["job_id"] == job["job_id"] and cancelled["status"] == "cancelled"
        assert client.wait_for_job(job["job_id"], 5)["status"] == "cancelled"
        with pytest.raises(CoordinatorError) as caught:
            client.cancel_job(job["job_id"])
        assert (caught.value.status, caught.value.error_code) == (409, "JOB_ALREADY_FINISHED")
        with pytest.raises(TimeoutError):
            client.wait_for_job(client.submit_job("never served", model=SMOL)["job_id"], 0.3)


def test_the_async_client_submits_and_waits(node: NodeProcess) -> None:
    pubkey = pinned_key(node)

    async def main() -> None:
        async with AsyncCoordinatorClient(node.url, node.client_key) as client:
            assert await client.default_model() == SMOL
            submitted = await client.submit_job("Say hello.", max_tokens=16)
            job = await client.wait_for_job(submitted["job_id"], WAIT)
            assert job["status"] == "completed" and job["result"]
            listed = await client.list_jobs(limit=50)
            assert job["job_id"] in [j["job_id"] for j in listed["jobs"]]
            receipt = await client.get_receipt(job["receipt_id"])
            assert (await client.verify_receipt(receipt, pubkey)).valid
            assert (await client.verify_receipt(job["receipt_id"])).valid  # TOFU, by id
            assert client.node_public_key == pubkey
            assert (await client.stats())["jobs"]["completed"] >= 1
            with pytest.raises(CoordinatorError) as caught:
                await client.get_job("job-0000000000000000")
            assert caught.value.error_code == "JOB_NOT_FOUND"

    asyncio.run(main())


# -- streaming ------------------------------------------------------------------------------

# Enough tokens for the text to come in several pieces (one event per 50 ms of generation).
STREAM_PARAMS = {"max_tokens": 40, "temperature": 0, "seed": 7}


def test_stream_job_pieces_join_to_the_result(node: NodeProcess) -> None:
    with CoordinatorClient(node.url, node.client_key) as client:
        job_id = client.submit_job(LONG_PROMPT, **STREAM_PARAMS)["job_id"]
        pieces = list(client.stream_job(job_id, timeout=WAIT))
        job = client.get_job(job_id)
    assert job["status"] == "completed"
    assert pieces and all(isinstance(piece, str) and piece for piece in pieces)
    assert "".join(pieces) == job["result"]

    async def main() -> tuple[list[str], dict]:
        async with AsyncCoordinatorClient(node.url, node.client_key) as client:
            job_id = (await client.submit_job(LONG_PROMPT, **STREAM_PARAMS))["job_id"]
            pieces = [piece async for piece in client.stream_job(job_id, timeout=WAIT)]
            return pieces, await client.get_job(job_id)

    pieces, job = asyncio.run(main())
    assert job["status"] == "completed"
    assert pieces and all(isinstance(piece, str) and piece for piece in pieces)
    assert "".join(pieces) == job["result"]


def test_stream_job_follows_the_miner_and_reports_how_the_job_ended(start_node) -> None:
    node = start_node("--no-miner")
    miner_key = node.register_miner("m")
    with (
        CoordinatorClient(node.url, node.client_key) as client,
        CoordinatorClient(node.url, miner_key) as miner,
    ):
        job_id = client.submit_job("Say hello", model=SMOL)["job_id"]
        miner.claim_job(job_id, "m")
        miner.report_progress(job_id, "m", "Hel")
        stream = client.stream_job(job_id)
        assert next(stream) == "Hel"  # a late joiner gets the text so far
        miner.report_progress(job_id, "m", "lo")
        assert next(stream) == "lo"  # each piece the moment the miner sends it
        usage = {"prompt_tokens": 3, "completion_tokens": 2}
        miner.complete_job(job_id, "m", "Hello world", usage=usage)
        assert list(stream) == [" world"]  # the rest of the result, then the end
        assert list(client.stream_job(job_id)) == ["Hello world"]  # after the end: all of it

        failing = client.submit_job("fail me", model=SMOL)["job_id"]
        miner.claim_job(failing, "m")
        miner.report_progress(failing, "m", "partial")
        stream = client.stream_job(failing)
        assert next(stream) == "partial"
        miner.fail_job(failing, "m", "no GPU")
        with pytest.raises(JobFailed) as caught:
            next(stream)
        assert caught.value.job["status"] == "failed"
        assert caught.value.job["error_code"] == "MINER_ERROR"
        assert str(caught.value) == f"job {failing} failed: no GPU (MINER_ERROR)"

        cancelled = client.submit_job("cancel me", model=SMOL)["job_id"]
        client.cancel_job(cancelled)
        with pytest.raises(JobFailed, match=f"job {cancelled} was cancelled"):
            list(client.stream_job(cancelled))

        pending = client.submit_job("nobody claims me", model=SMOL)["job_id"]
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            list(client.stream_job(pending, timeout=0.5))
        assert time.monotonic() - started >= 0.5
        assert client.get_job(pending)["status"] == "pending"  # it goes on
        with pytest.raises(CoordinatorError) as error:
            list(client.stream_job("job-0000000000000000"))
        assert (error.value.status, error.value.error_code) == (404, "JOB_NOT_FOUND")


def test_the_async_client_streams_and_has_the_miner_calls(start_node) -> None:
    node = start_node("--no-miner")
    miner_key = node.register_miner("m")

    async def main() -> None:
        async with (
            AsyncCoordinatorClient(node.url, node.client_key) as client,
            AsyncCoordinatorClient(node.url, miner_key) as miner,
        ):
            assert (await miner.whoami())["identity"] == "m"
            registered = await miner.register_miner("m", [SMOL], {"backend": "test"})
            assert registered["miner_id"] == "m"
            job_id = (await client.submit_job("Say hello", model=SMOL))["job_id"]
            assert job_id in [j["job_id"] for j in await miner.available_jobs("m", wait=5)]
            await miner.claim_job(job_id, "m")
            await miner.release_job(job_id, "m")  # back to the queue, and claimed again
            await miner.claim_job(job_id, "m")
            await miner.heartbeat("m")
            await miner.report_progress(job_id, "m", "Hi")
            stream = client.stream_job(job_id)
            assert await anext(stream) == "Hi"
            await miner.complete_job(job_id, "m", "Hi there")
            assert [piece async for piece in stream] == [" there"]
            job = await client.get_job(job_id)
            assert job["status"] == "completed"

            failing = (await client.submit_job("fail me", model=SMOL))["job_id"]
            await miner.claim_job(failing, "m")
            await miner.fail_job(failing, "m", "no GPU")
            with pytest.raises(JobFailed, match="no GPU"):
                _ = [piece async for piece in client.stream_job(failing)]
            pending = (await client.submit_job("nobody claims me", model=SMOL))["job_id"]
            with pytest.raises(TimeoutError):
                _ = [piece async for piece in client.stream_job(pending, timeout=0.5)]

            pubkey = await client.node_public_key_or_fetch()
            assert pubkey == pinned_key(node)
            receipt = await client.get_receipt(job["receipt_id"])
            assert (await client.verify_receipt(receipt)).valid
            deadline = time.monotonic() + WAIT
            while True:  # the proof exists once the next block seals the receipt
                try:
                    proof = await client.get_receipt_proof(job["receipt_id"])
                    break
                except CoordinatorError as e:
                    assert e.error_code == "RECEIPT_NOT_SEALED", e
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.1)
            assert proof["receipt_id"] == job["receipt_id"]
        await client.close()  # the sync client's name works too (and twice is harmless)

    asyncio.run(main())


def _public_methods(cls: type) -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(member)
        for name, member in inspect.getmembers(cls, inspect.isfunction)
        if not name.startswith("_")
    }


def test_the_async_client_has_every_method_of_the_sync_one() -> None:
    sync, asynchronous = (
        _public_methods(CoordinatorClient),
        _public_methods(AsyncCoordinatorClient),
    )
    assert set(sync) <= set(asynchronous), set(sync) - set(asynchronous)
    assert set(asynchronous) - set(sync) == {"aclose"}  # httpx's name, beside `close`
    for name, signature in sync.items():
        # The same parameters: names, kinds, defaults and types (the returns differ: awaited).
        assert list(asynchronous[name].parameters.values()) == list(
            signature.parameters.values()
        ), name
        member = getattr(AsyncCoordinatorClient, name)
        if name == "stream_job":
            assert inspect.isasyncgenfunction(member)
        else:
            assert inspect.iscoroutinefunction(member), name
