"""A Python client for the Coordinator API (httpx): sync `CoordinatorClient` and async
`AsyncCoordinatorClient`, with the tutorial's method names and more.

    from aitbc_node.client import CoordinatorClient
    client = CoordinatorClient("http://127.0.0.1:8080/api", api_key)
    job = client.submit_job("Hello, world!", max_tokens=64)
    done = client.wait_for_job(job["job_id"])      # server long-polling: no 2-second naps
    print(done["result"])
    for piece in client.stream_job(job["job_id"]):  # the text as it is generated
        print(piece, end="", flush=True)

Retries: a 429 waits what `Retry-After` says; a 5xx, or a connection that could not be made,
backs off (0.5 s, 1 s, 2 s... up to 10 s); at most `retries` times. A request that may have
reached the server is not re-sent unless it is safe to repeat (a GET, or a 429/503 answer,
which the node gives before doing anything). Other errors raise `CoordinatorError`, which
carries `status`, `detail` and `error_code`.

`stream_job` yields a job's text in pieces as the miner generates it (server-sent events);
joined, a completed job's pieces equal its `result`. A job that ends failed or cancelled raises
`JobFailed` after its pieces, carrying the final job. A dropped stream is reopened; the text
the node sends again is skipped.

This is the only module of the package that imports httpx.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import httpx

from aitbc_node.receipts import Verdict, verify_receipt

TERMINAL = ("completed", "failed", "cancelled")
MAX_SERVER_WAIT = 60.0
# The node sends a keep-alive on an idle stream every 15 s: a stream silent for this long is
# taken for dead and reopened.
STREAM_IDLE = 45.0


class CoordinatorError(Exception):
    """An error answer from the node: HTTP `status`, `detail` and `error_code`."""

    def __init__(self, status: int, detail: str, error_code: str, retry_after: float | None = None):
        super().__init__(f"{status} {error_code}: {detail}")
        self.status = status
        self.detail = detail
        self.error_code = error_code
        self.retry_after = retry_after


class CoordinatorUnavailable(CoordinatorError):
    """The node could not be reached (after the retries)."""

    def __init__(self, detail: str) -> None:
        super().__init__(0, detail, "UNREACHABLE")


class JobFailed(Exception):
    """`stream_job`: the job ended failed or cancelled; `job` is its final view."""

    def __init__(self, job: dict[str, Any]) -> None:
        if job["status"] == "cancelled":
            message = f"job {job['job_id']} was cancelled"
        else:
            message = f"job {job['job_id']} failed: {job.get('error')} ({job.get('error_code')})"
        super().__init__(message)
        self.job = job


def _error(response: httpx.Response) -> CoordinatorError:
    try:
        body = response.json()
        detail, code = body["detail"], body["error_code"]
    except (ValueError, KeyError, TypeError):
        detail, code = response.text[:500] or response.reason_phrase, f"HTTP_{response.status_code}"
    return CoordinatorError(response.status_code, detail, code, _retry_after(response))


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers["retry-after"]))
    except (KeyError, ValueError):
        return None


class _Policy:
    """Which failures to retry, and how long to wait first."""

    def __init__(self, retries: int, backoff: float, max_backoff: float = 10.0) -> None:
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff

    def _backoff(self, attempt: int) -> float:
        return min(self.backoff * 2**attempt, self.max_backoff)

    def delay(
        self,
        method: str,
        path: str,
        outcome: httpx.Response | httpx.TransportError,
        attempt: int,
    ) -> float:
        """Seconds to wait before retrying after `outcome` (an error answer or a transport
        error); raises the `CoordinatorError` to give up with."""
        if isinstance(outcome, httpx.TransportError):
            if attempt < self.retries and (
                method == "GET" or isinstance(outcome, httpx.ConnectError)
            ):
                return self._backoff(attempt)
            raise CoordinatorUnavailable(f"{method} {path}: {outcome}") from outcome
        if attempt < self.retries:
            status = outcome.status_code
            if status == 429:
                retry_after = _retry_after(outcome)
                return retry_after if retry_after is not None else self._backoff(attempt)
            if status == 503 or (status >= 500 and method == "GET"):
                return self._backoff(attempt)
        raise _error(outcome)


def _clean(params: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if v is not None}


class _JobStream:
    """What both clients' `stream_job` share: the server-sent events of one job's stream in,
    the text not yet given out and the final job out, across reopened connections (each of
    which starts with all the text so far)."""

    def __init__(self, job_id: str, timeout: float | None) -> None:
        self.job_id = job_id
        self.path = f"/v1/jobs/{job_id}/stream"
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.given = 0  # characters handed out, over every connection
        self.seen = 0  # characters the current connection has sent
        self.alive = False  # the current connection has sent anything
        self.event = ""
        self.data: list[str] = []
        self.job: dict[str, Any] | None = None

    def timeouts(self, base: httpx.Timeout) -> httpx.Timeout:
        """The client's timeouts, with a read timeout that outlasts the keep-alives but not
        the deadline."""
        read = min(STREAM_IDLE, self.remaining())
        return httpx.Timeout(connect=base.connect, read=read, write=base.write, pool=base.pool)

    def remaining(self) -> float:
        """Seconds left before the deadline; raises TimeoutError once it has passed."""
        if self.deadline is None:
            return float("inf")
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"Job {self.job_id} did not end in {self.timeout}s")
        return remaining

    def connected(self) -> None:
        self.seen, self.alive, self.event, self.data = 0, False, "", []

    def feed(self, line: str) -> str:
        """One line of the stream; the new text of the event it ends ("" when none)."""
        if line:
            self.alive = True
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                self.event = value
            elif field == "data":
                self.data.append(value)
            return ""  # a comment (the keep-alive) or a field the node does not send
        event, data = self.event, "\n".join(self.data)
        self.event, self.data = "", []
        if event == "text" and data:
            text = json.loads(data)["text"]
            new = text[max(0, self.given - self.seen) :]
            self.seen += len(text)
            self.given += len(new)
            return new
        if event == "job" and data:
            self.job = json.loads(data)
        return ""

    def finish(self) -> None:
        """After the `job` event: raises JobFailed unless the job completed."""
        assert self.job is not None
        if self.job["status"] != "completed":
            raise JobFailed(self.job)

    def retry_delay(
        self, policy: _Policy, outcome: httpx.Response | httpx.TransportError, attempt: int
    ) -> float:
        """Seconds to wait before reopening the stream after `outcome`; raises what to give
        up with: TimeoutError past the deadline, else the policy's error."""
        if isinstance(outcome, httpx.ReadTimeout):
            self.remaining()  # the deadline, not a dead node, may have cut the read short
        if self.alive:
            attempt = 0  # it worked for a while: a new drop starts the count again
        return min(policy.delay("GET", self.path, outcome, attempt), self.remaining())

    def ended_early(self) -> httpx.TransportError:
        """The outcome of a stream that closed before its `job` event (the node stopped):
        retried as a dropped connection is."""
        return httpx.ReadError(f"the stream of {self.job_id} closed before the job ended")


class CoordinatorClient:
    """A synchronous client for one node."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        retries: int = 5,
        backoff: float = 0.5,
        node_public_key: str | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"X-Api-Key": api_key} if api_key else {}
        self.node_public_key = node_public_key
        self.policy = _Policy(retries, backoff)
        self.client = httpx.Client(headers=self.headers, timeout=timeout, transport=transport)
        self._default_model: str | None = None

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> CoordinatorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(
        self,
        method: str,
        path: str,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """One API call with the retry policy; the decoded JSON answer."""
        attempt = 0
        extra = {"timeout": timeout} if timeout is not None else {}
        while True:
            outcome: httpx.Response | httpx.TransportError
            try:
                outcome = self.client.request(
                    method, self.base_url + path, json=json, params=_clean(params or {}), **extra
                )
            except httpx.TransportError as e:
                outcome = e
            else:
                if outcome.is_success:
                    return outcome.json()
            time.sleep(self.policy.delay(method, path, outcome, attempt))
            attempt += 1

    # -- clients ----------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return self.request("GET", "/health")

    def stats(self) -> dict[str, Any]:
        return self.request("GET", "/v1/stats")

    def default_model(self) -> str:
        """The node's default model (asked once): its own first model, else a served one."""
        if self._default_model is None:
            model = self.health().get("default_model")
            if not model:
                raise CoordinatorError(400, "the node serves no model", "UNKNOWN_MODEL")
            self._default_model = model
        return self._default_model

    def submit_job(
        self, prompt: str, model: str | None = None, *, wait: float | None = None, **params: Any
    ) -> dict[str, Any]:
        """Submit a job; `params` are max_tokens, temperature, top_p, seed, stop. Without a
        model, the node's default model (/api/health's default_model). With `wait` (up to
        60 seconds) the node answers once the job has ended, or with its state then."""
        body = {"prompt": prompt, "model": model or self.default_model(), "params": params}
        timeout = None if wait is None else wait + self.client.timeout.read + 1
        return self.request("POST", "/v1/jobs", json=body, params={"wait": wait}, timeout=timeout)

    def get_job(self, job_id: str, wait: float | None = None) -> dict[str, Any]:
        """A job; with `wait`, the node answers as soon as it ends (or after `wait` seconds)."""
        timeout = None if wait is None else wait + self.client.timeout.read + 1
        return self.request("GET", f"/v1/jobs/{job_id}", params={"wait": wait}, timeout=timeout)

    def wait_for_job(self, job_id: str, timeout: float = 60) -> dict[str, Any]:
        """The job once it has ended; raises TimeoutError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            job = self.get_job(job_id, wait=round(min(max(remaining, 0), MAX_SERVER_WAIT), 3))
            if job["status"] in TERMINAL:
                return job
            if time.monotonic() >= deadline:
                raise TimeoutError(f"Job {job_id} did not complete in {timeout}s")

    def stream_job(self, job_id: str, timeout: float | None = None) -> Iterator[str]:
        """The job's text in pieces as the miner generates it, until the job ends (GET
        /v1/jobs/{id}/stream); joined, a completed job's pieces equal its `result` (its
        usage and receipt: `get_job`). Raises `JobFailed` (with the final job) when it ends
        failed or cancelled, TimeoutError after `timeout` seconds (the job goes on)."""
        stream = _JobStream(job_id, timeout)
        attempt = 0
        while True:
            outcome: httpx.Response | httpx.TransportError
            try:
                with self.client.stream(
                    "GET",
                    self.base_url + stream.path,
                    timeout=stream.timeouts(self.client.timeout),
                ) as response:
                    if not response.is_success:
                        response.read()
                        outcome = response
                    else:
                        stream.connected()
                        for line in response.iter_lines():
                            piece = stream.feed(line)
                            if piece:
                                yield piece
                            if stream.job is not None:
                                stream.finish()
                                return
                            stream.remaining()
                        outcome = stream.ended_early()
            except httpx.TransportError as e:
                outcome = e
            time.sleep(stream.retry_delay(self.policy, outcome, attempt))
            attempt = 1 if stream.alive else attempt + 1

    def list_jobs(
        self, status: str | None = None, limit: int | None = None, cursor: str | None = None
    ) -> dict[str, Any]:
        return self.request(
            "GET", "/v1/jobs", params={"status": status, "limit": limit, "cursor": cursor}
        )

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        return self.request("POST", f"/v1/jobs/{job_id}/cancel")

    def get_receipt(self, receipt_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/receipts/{receipt_id}")

    def get_receipt_proof(self, receipt_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/receipts/{receipt_id}/proof")

    def list_receipts(
        self, client: str | None = None, limit: int | None = None, cursor: str | None = None
    ) -> dict[str, Any]:
        return self.request(
            "GET", "/v1/receipts", params={"client": client, "limit": limit, "cursor": cursor}
        )

    def node_public_key_or_fetch(self) -> str:
        """The pinned node key, or (trust on first use) the one `/health` shows, pinned now."""
        if self.node_public_key is None:
            self.node_public_key = self.health()["node"]["public_key"]
        return self.node_public_key

    def verify_receipt(
        self, receipt: dict[str, Any] | str, public_key: str | None = None
    ) -> Verdict:
        """Verify a receipt (or a receipt id) here, against `public_key` or the pinned key."""
        if isinstance(receipt, str):
            receipt = self.get_receipt(receipt)
        return verify_receipt(receipt, public_key or self.node_public_key_or_fetch())

    # -- miners -------------------------------------------------------------------------

    def whoami(self) -> dict[str, Any]:
        return self.request("GET", "/v1/whoami")

    def register_miner(
        self,
        miner_id: str,
        capabilities: list[str],
        gpu_info: dict[str, Any] | None = None,
        public_key: str | None = None,
    ) -> dict[str, Any]:
        body = _clean(
            {
                "miner_id": miner_id,
                "capabilities": capabilities,
                "gpu_info": gpu_info or {},
                "public_key": public_key,
            }
        )
        return self.request("POST", "/v1/miners/register", json=body)

    def available_jobs(
        self, miner_id: str, wait: float | None = None, limit: int | None = None
    ) -> list[dict[str, Any]]:
        timeout = None if wait is None else wait + self.client.timeout.read + 1
        return self.request(
            "GET",
            "/v1/jobs/available",
            params={"miner_id": miner_id, "wait": wait, "limit": limit},
            timeout=timeout,
        )["jobs"]

    def claim_job(self, job_id: str, miner_id: str) -> dict[str, Any]:
        return self.request("POST", f"/v1/jobs/{job_id}/claim", json={"miner_id": miner_id})

    def claim_next(
        self,
        miner_id: str,
        max_jobs: int = 1,
        wait: float = 0,
        results: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Up to `max_jobs` pending jobs handed to this miner alone (`{jobs, renewed,
        lease_seconds, results}`), long-polling up to `wait` seconds for one; `results` (as
        `complete_jobs` takes them) are recorded first, each with its outcome in `results`."""
        body = {"miner_id": miner_id, "max_jobs": max_jobs, "wait": wait, "results": results or []}
        return self.request(
            "POST", "/v1/jobs/claim-next", json=body, timeout=wait + self.client.timeout.read + 1
        )

    def complete_jobs(self, miner_id: str, results: list[dict[str, Any]]) -> dict[str, Any]:
        """Complete several claimed jobs at once; each result `{job_id, result, usage?,
        model_sha256?, miner_signature?}` gets its own outcome."""
        return self.request(
            "POST", "/v1/jobs/complete", json={"miner_id": miner_id, "results": results}
        )

    def release_job(self, job_id: str, miner_id: str) -> dict[str, Any]:
        """Hand a claimed job back to the queue, uncounted."""
        return self.request("POST", f"/v1/jobs/{job_id}/release", json={"miner_id": miner_id})

    def heartbeat(self, miner_id: str) -> dict[str, Any]:
        return self.request("POST", f"/v1/miners/{miner_id}/heartbeat")

    def report_progress(self, job_id: str, miner_id: str, text: str) -> dict[str, Any]:
        return self.request(
            "POST", f"/v1/jobs/{job_id}/progress", json={"miner_id": miner_id, "text": text}
        )

    def complete_job(self, job_id: str, miner_id: str, result: str, **extra: Any) -> dict:
        """Complete a claimed job; `extra`: usage, model_sha256, miner_signature."""
        body = {"miner_id": miner_id, "result": result, **extra}
        return self.request("POST", f"/v1/jobs/{job_id}/complete", json=body)

    def fail_job(self, job_id: str, miner_id: str, error: str) -> dict[str, Any]:
        return self.request(
            "POST", f"/v1/jobs/{job_id}/fail", json={"miner_id": miner_id, "error": error}
        )


class AsyncCoordinatorClient:
    """The asynchronous twin of `CoordinatorClient`: the same methods, names and arguments
    (client and miner calls), each a coroutine; `stream_job` is an async generator."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        retries: int = 5,
        backoff: float = 0.5,
        node_public_key: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"X-Api-Key": api_key} if api_key else {}
        self.node_public_key = node_public_key
        self.policy = _Policy(retries, backoff)
        self.client = httpx.AsyncClient(headers=self.headers, timeout=timeout, transport=transport)
        self._default_model: str | None = None

    async def aclose(self) -> None:
        await self.client.aclose()

    async def close(self) -> None:
        """The same as `aclose`, under the sync client's name."""
        await self.aclose()

    async def __aenter__(self) -> AsyncCoordinatorClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def request(
        self,
        method: str,
        path: str,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """One API call with the retry policy; the decoded JSON answer."""
        attempt = 0
        extra = {"timeout": timeout} if timeout is not None else {}
        while True:
            outcome: httpx.Response | httpx.TransportError
            try:
                outcome = await self.client.request(
                    method, self.base_url + path, json=json, params=_clean(params or {}), **extra
                )
            except httpx.TransportError as e:
                outcome = e
            else:
                if outcome.is_success:
                    return outcome.json()
            await asyncio.sleep(self.policy.delay(method, path, outcome, attempt))
            attempt += 1

    async def health(self) -> dict[str, Any]:
        return await self.request("GET", "/health")

    async def stats(self) -> dict[str, Any]:
        return await self.request("GET", "/v1/stats")

    async def default_model(self) -> str:
        """The node's default model (asked once): its own first model, else a served one."""
        if self._default_model is None:
            model = (await self.health()).get("default_model")
            if not model:
                raise CoordinatorError(400, "the node serves no model", "UNKNOWN_MODEL")
            self._default_model = model
        return self._default_model

    async def submit_job(
        self, prompt: str, model: str | None = None, *, wait: float | None = None, **params: Any
    ) -> dict[str, Any]:
        body = {"prompt": prompt, "model": model or await self.default_model(), "params": params}
        timeout = None if wait is None else wait + self.client.timeout.read + 1
        return await self.request(
            "POST", "/v1/jobs", json=body, params={"wait": wait}, timeout=timeout
        )

    async def get_job(self, job_id: str, wait: float | None = None) -> dict[str, Any]:
        timeout = None if wait is None else wait + self.client.timeout.read + 1
        return await self.request(
            "GET", f"/v1/jobs/{job_id}", params={"wait": wait}, timeout=timeout
        )

    async def wait_for_job(self, job_id: str, timeout: float = 60) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            remaining = deadline - loop.time()
            job = await self.get_job(job_id, wait=round(min(max(remaining, 0), MAX_SERVER_WAIT), 3))
            if job["status"] in TERMINAL:
                return job
            if loop.time() >= deadline:
                raise TimeoutError(f"Job {job_id} did not complete in {timeout}s")

    async def stream_job(self, job_id: str, timeout: float | None = None) -> AsyncIterator[str]:
        """The job's text in pieces as the miner generates it, until the job ends: as
        `CoordinatorClient.stream_job`, as an async generator."""
        stream = _JobStream(job_id, timeout)
        attempt = 0
        while True:
            outcome: httpx.Response | httpx.TransportError
            try:
                async with self.client.stream(
                    "GET",
                    self.base_url + stream.path,
                    timeout=stream.timeouts(self.client.timeout),
                ) as response:
                    if not response.is_success:
                        await response.aread()
                        outcome = response
                    else:
                        stream.connected()
                        async for line in response.aiter_lines():
                            piece = stream.feed(line)
                            if piece:
                                yield piece
                            if stream.job is not None:
                                stream.finish()
                                return
                            stream.remaining()
                        outcome = stream.ended_early()
            except httpx.TransportError as e:
                outcome = e
            await asyncio.sleep(stream.retry_delay(self.policy, outcome, attempt))
            attempt = 1 if stream.alive else attempt + 1

    async def list_jobs(
        self, status: str | None = None, limit: int | None = None, cursor: str | None = None
    ) -> dict[str, Any]:
        return await self.request(
            "GET", "/v1/jobs", params={"status": status, "limit": limit, "cursor": cursor}
        )

    async def cancel_job(self, job_id: str) -> dict[str, Any]:
        return await self.request("POST", f"/v1/jobs/{job_id}/cancel")

    async def get_receipt(self, receipt_id: str) -> dict[str, Any]:
        return await self.request("GET", f"/v1/receipts/{receipt_id}")

    async def get_receipt_proof(self, receipt_id: str) -> dict[str, Any]:
        return await self.request("GET", f"/v1/receipts/{receipt_id}/proof")

    async def list_receipts(
        self, client: str | None = None, limit: int | None = None, cursor: str | None = None
    ) -> dict[str, Any]:
        return await self.request(
            "GET", "/v1/receipts", params={"client": client, "limit": limit, "cursor": cursor}
        )

    async def node_public_key_or_fetch(self) -> str:
        """The pinned node key, or (trust on first use) the one `/health` shows, pinned now."""
        if self.node_public_key is None:
            self.node_public_key = (await self.health())["node"]["public_key"]
        return self.node_public_key

    async def verify_receipt(
        self, receipt: dict[str, Any] | str, public_key: str | None = None
    ) -> Verdict:
        """Verify a receipt (or a receipt id) here, against `public_key` or the pinned key."""
        if isinstance(receipt, str):
            receipt = await self.get_receipt(receipt)
        return verify_receipt(receipt, public_key or await self.node_public_key_or_fetch())

    # -- miners -------------------------------------------------------------------------

    async def whoami(self) -> dict[str, Any]:
        return await self.request("GET", "/v1/whoami")

    async def register_miner(
        self,
        miner_id: str,
        capabilities: list[str],
        gpu_info: dict[str, Any] | None = None,
        public_key: str | None = None,
    ) -> dict[str, Any]:
        body = _clean(
            {
                "miner_id": miner_id,
                "capabilities": capabilities,
                "gpu_info": gpu_info or {},
                "public_key": public_key,
            }
        )
        return await self.request("POST", "/v1/miners/register", json=body)

    async def available_jobs(
        self, miner_id: str, wait: float | None = None, limit: int | None = None
    ) -> list[dict[str, Any]]:
        timeout = None if wait is None else wait + self.client.timeout.read + 1
        answer = await self.request(
            "GET",
            "/v1/jobs/available",
            params={"miner_id": miner_id, "wait": wait, "limit": limit},
            timeout=timeout,
        )
        return answer["jobs"]

    async def claim_job(self, job_id: str, miner_id: str) -> dict[str, Any]:
        return await self.request("POST", f"/v1/jobs/{job_id}/claim", json={"miner_id": miner_id})

    async def claim_next(
        self,
        miner_id: str,
        max_jobs: int = 1,
        wait: float = 0,
        results: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Up to `max_jobs` pending jobs handed to this miner alone (`{jobs, renewed,
        lease_seconds, results}`), long-polling up to `wait` seconds for one; `results` (as
        `complete_jobs` takes them) are recorded first, each with its outcome in `results`."""
        body = {"miner_id": miner_id, "max_jobs": max_jobs, "wait": wait, "results": results or []}
        return await self.request(
            "POST", "/v1/jobs/claim-next", json=body, timeout=wait + self.client.timeout.read + 1
        )

    async def complete_jobs(self, miner_id: str, results: list[dict[str, Any]]) -> dict[str, Any]:
        """Complete several claimed jobs at once; each result `{job_id, result, usage?,
        model_sha256?, miner_signature?}` gets its own outcome."""
        return await self.request(
            "POST", "/v1/jobs/complete", json={"miner_id": miner_id, "results": results}
        )

    async def release_job(self, job_id: str, miner_id: str) -> dict[str, Any]:
        """Hand a claimed job back to the queue, uncounted."""
        return await self.request("POST", f"/v1/jobs/{job_id}/release", json={"miner_id": miner_id})

    async def heartbeat(self, miner_id: str) -> dict[str, Any]:
        return await self.request("POST", f"/v1/miners/{miner_id}/heartbeat")

    async def report_progress(self, job_id: str, miner_id: str, text: str) -> dict[str, Any]:
        return await self.request(
            "POST", f"/v1/jobs/{job_id}/progress", json={"miner_id": miner_id, "text": text}
        )

    async def complete_job(self, job_id: str, miner_id: str, result: str, **extra: Any) -> dict:
        """Complete a claimed job; `extra`: usage, model_sha256, miner_signature."""
        body = {"miner_id": miner_id, "result": result, **extra}
        return await self.request("POST", f"/v1/jobs/{job_id}/complete", json=body)

    async def fail_job(self, job_id: str, miner_id: str, error: str) -> dict[str, Any]:
        return await self.request(
            "POST", f"/v1/jobs/{job_id}/fail", json={"miner_id": miner_id, "error": error}
        )
