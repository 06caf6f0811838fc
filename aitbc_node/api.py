"""The HTTP API (Litestar): routes, request bodies, authentication and the error shape.

Handlers are async but do their store work on a thread pool, so a write that waits for the
lock or an fsync never stalls the event loop. Every error leaves as
`{"detail": ..., "error_code": ...}`; nothing else reaches the client.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from litestar import Litestar, MediaType, Request, Response, Router, delete, get, post
from litestar.config.cors import CORSConfig
from litestar.exceptions import HTTPException
from litestar.openapi import OpenAPIConfig
from litestar.response import ServerSentEvent
from litestar.response.sse import ServerSentEventMessage
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED

from aitbc_node import __version__, keys
from aitbc_node.errors import ApiError, BadRequest, PayloadTooLarge
from aitbc_node.jobs import TERMINAL
from aitbc_node.keys import Principal
from aitbc_node.receipts import verify_receipt
from aitbc_node.signals import WORK, job_key, progress_key
from aitbc_node.signing import key_id_for

if TYPE_CHECKING:
    from aitbc_node.node import Node

log = logging.getLogger("aitbc_node.api")
T = TypeVar("T")

# Store calls run here rather than on the event loop (see the module docstring).
_store_pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="api-store")

STREAM_KEEPALIVE_SECONDS = 15.0

HTTP_CODES = {
    400: "BAD_REQUEST",
    401: "INVALID_API_KEY",
    402: "INSUFFICIENT_FUNDS",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    409: "CONFLICT",
    413: "PAYLOAD_TOO_LARGE",
    429: "RATE_LIMITED",
}


def _node(request: Request) -> Node:
    return request.app.state.node


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run `fn(*args)` on the store's thread pool."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_store_pool, fn, *args)


async def authorized(request: Request, fn: Callable[[Principal], T]) -> T:
    """Authenticate the request's X-Api-Key, then run `fn(principal)` off the event loop."""
    node = _node(request)
    api_key = request.headers.get("x-api-key")

    def call() -> T:
        principal = keys.authenticate(node.store, api_key)
        node.rate_limiter.check(principal.role, principal.key_id)
        return fn(principal)

    return await in_thread(call)


def public(request: Request) -> Node:
    """The node, once this public read is within the caller's address's rate limit."""
    node = _node(request)
    address = request.client.host if request.client else "unknown"
    node.rate_limiter.check("public", address)
    return node


def parse_wait(raw: str | None, request: Request) -> float:
    """The `wait` query parameter: seconds to long-poll, 0 to the bound (60)."""
    if raw is None or raw == "":
        return 0.0
    bound = _node(request).limits.max_wait_seconds
    try:
        wait = float(raw)
    except ValueError:
        wait = -1.0
    if not 0 <= wait <= bound:
        raise BadRequest(
            f"wait must be a number of seconds from 0 to {bound:g}", error_code="INVALID_WAIT"
        )
    return wait


async def json_body(request: Request) -> Any:
    """The request's JSON body, bounded in size; 413 past the bound, 400 when not JSON."""
    limit = _node(request).limits.max_body_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the body is larger than {limit} bytes", error_code="BODY_TOO_LARGE")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(
                f"the body is larger than {limit} bytes", error_code="BODY_TOO_LARGE"
            )
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(f"the body is not valid JSON: {e}", error_code="INVALID_JSON") from None


async def json_object(request: Request) -> dict[str, Any]:
    body = await json_body(request)
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object", error_code="INVALID_BODY")
    return body


# -- public ------------------------------------------------------------------------------


@get("/health", sync_to_thread=False)
def health(request: Request) -> dict[str, Any]:
    """Liveness, version, the models served and the built-in miner's state."""
    return public(request).health()


@get("/v1/stats")
async def stats(request: Request) -> dict[str, Any]:
    """Jobs by status, miners online, queue depth, tokens generated, average latency."""
    return await in_thread(public(request).jobs.stats)


@get("/v1/miners")
async def list_miners(request: Request) -> dict[str, Any]:
    """Every registered miner with its models and state."""
    return {"miners": await in_thread(public(request).miners.list)}


# -- clients -----------------------------------------------------------------------------


@post("/v1/jobs", status_code=HTTP_201_CREATED)
async def submit_job(request: Request) -> dict[str, Any]:
    """Submit a job: `{prompt, model, params}`."""
    body = await json_body(request)
    jobs = _node(request).jobs
    return await authorized(request, lambda p: jobs.submit(p, body))


@get("/v1/whoami")
async def whoami(request: Request) -> dict[str, Any]:
    """The identity and role this API key acts as."""
    return await authorized(
        request,
        lambda p: {"key_id": p.key_id, "name": p.name, "role": p.role, "identity": p.identity},
    )


@get("/v1/jobs")
async def list_jobs(
    request: Request, status: str | None = None, limit: str | None = None, cursor: str | None = None
) -> dict[str, Any]:
    """Your jobs, newest first; `next_cursor` fetches the next page."""
    jobs = _node(request).jobs
    return await authorized(request, lambda p: jobs.list(p, status, limit, cursor))


@get("/v1/jobs/available")
async def available_jobs(
    request: Request, miner_id: str | None = None, wait: str | None = None
) -> dict[str, Any]:
    """Pending jobs for the models this miner registered, oldest first. With `wait=SECONDS`
    (up to 60) the answer comes the moment a matching job is submitted."""
    seconds = parse_wait(wait, request)
    node = _node(request)
    found = await authorized(request, lambda p: (p, node.jobs.available(p, miner_id)))
    principal, offer = found
    if offer["jobs"] or seconds == 0:
        return offer

    async def offered() -> dict[str, Any] | None:
        current = await in_thread(node.jobs.available, principal, miner_id)
        return current if current["jobs"] else None

    return await node.signals.waiters.until(offered, (WORK,), seconds) or {"jobs": []}


@get("/v1/jobs/{job_id:str}")
async def get_job(request: Request, job_id: str, wait: str | None = None) -> dict[str, Any]:
    """One job. With `wait=SECONDS` (up to 60) the answer comes as soon as the job ends, or
    with its current state when the time runs out."""
    seconds = parse_wait(wait, request)
    node = _node(request)
    job = await authorized(request, lambda p: node.jobs.get(p, job_id))
    if job["status"] in TERMINAL or seconds == 0:
        return job

    async def ended() -> dict[str, Any] | None:
        current = await in_thread(node.jobs.peek, job_id)
        return current if current["status"] in TERMINAL else None

    done = await node.signals.waiters.until(ended, (job_key(job_id),), seconds)
    return done or await in_thread(node.jobs.peek, job_id)


@post("/v1/jobs/{job_id:str}/cancel", status_code=HTTP_200_OK)
async def cancel_job(request: Request, job_id: str) -> dict[str, Any]:
    """Cancel a pending or running job."""
    jobs = _node(request).jobs
    return await authorized(request, lambda p: jobs.cancel(p, job_id))


@get("/v1/jobs/{job_id:str}/stream")
async def stream_job(request: Request, job_id: str) -> ServerSentEvent:
    """Server-sent events: `text` events as the miner generates (a late joiner first gets
    the text so far), then one `job` event with the final job view."""
    node = _node(request)
    await authorized(request, lambda p: node.jobs.get(p, job_id))
    return ServerSentEvent(job_events(node, job_id), headers={"Cache-Control": "no-cache"})


async def job_events(node: Node, job_id: str) -> AsyncIterator[ServerSentEventMessage]:
    signals = node.signals
    keys_ = (job_key(job_id), progress_key(job_id))
    streamed: list[str] = []
    sent_chars = 0
    while True:
        future = signals.waiters.register(*keys_)
        try:
            text = signals.text_since(job_id, sent_chars)
            if text:
                streamed.append(text)
                sent_chars += len(text)
                yield ServerSentEventMessage(event="text", data=json.dumps({"text": text}))
                continue
            job = await in_thread(node.jobs.peek, job_id)
            if job["status"] in TERMINAL:
                sent = "".join(streamed)
                result = job["result"] or ""
                if job["status"] == "completed" and result.startswith(sent) and result != sent:
                    rest = json.dumps({"text": result[len(sent) :]})
                    yield ServerSentEventMessage(event="text", data=rest)
                yield ServerSentEventMessage(event="job", data=json.dumps(job))
                return
            if signals.waiters.closed:
                return  # shutting down; the client can reconnect to the next start
            try:
                await asyncio.wait_for(future, STREAM_KEEPALIVE_SECONDS)
            except TimeoutError:
                yield ServerSentEventMessage(comment="keep-alive")
        finally:
            signals.waiters.unregister(future, *keys_)


# -- miners ------------------------------------------------------------------------------


@post("/v1/jobs/{job_id:str}/progress", status_code=HTTP_200_OK)
async def job_progress(request: Request, job_id: str) -> dict[str, Any]:
    """A remote miner's generated text so far: `{miner_id, text}` (the new text only)."""
    body = await json_object(request)
    jobs = _node(request).jobs
    return await authorized(request, lambda p: jobs.progress(p, job_id, body))


@post("/v1/miners/register", status_code=HTTP_200_OK)
async def register_miner(request: Request) -> dict[str, Any]:
    """Register a miner: `{miner_id, capabilities, gpu_info}`."""
    body = await json_object(request)
    miners = _node(request).miners
    return await authorized(request, lambda p: miners.register(p, body))


@post("/v1/miners/{miner_id:str}/heartbeat", status_code=HTTP_200_OK)
async def heartbeat(request: Request, miner_id: str) -> dict[str, Any]:
    """Renew the leases of this miner's running jobs."""
    jobs = _node(request).jobs
    return await authorized(request, lambda p: jobs.heartbeat(p, miner_id))


@post("/v1/jobs/{job_id:str}/claim", status_code=HTTP_200_OK)
async def claim_job(request: Request, job_id: str) -> dict[str, Any]:
    """Claim a pending job: `{miner_id}`. Of racing claims one wins, the others get 409."""
    body = await json_object(request)
    jobs = _node(request).jobs
    return await authorized(request, lambda p: jobs.claim(p, job_id, body))


@post("/v1/jobs/{job_id:str}/complete", status_code=HTTP_200_OK)
async def complete_job(request: Request, job_id: str) -> dict[str, Any]:
    """Complete a claimed job: `{miner_id, result, usage?}`."""
    body = await json_object(request)
    jobs = _node(request).jobs
    return await authorized(request, lambda p: jobs.complete(p, job_id, body))


@post("/v1/jobs/{job_id:str}/fail", status_code=HTTP_200_OK)
async def fail_job(request: Request, job_id: str) -> dict[str, Any]:
    """Fail a claimed job: `{miner_id, error}`."""
    body = await json_object(request)
    jobs = _node(request).jobs
    return await authorized(request, lambda p: jobs.fail(p, job_id, body))


# -- webhooks ---------------------------------------------------------------------------


@post("/v1/webhooks", status_code=HTTP_201_CREATED)
async def create_webhook(request: Request) -> dict[str, Any]:
    """Register `{url, events}`; the answer holds the signing secret, shown this once."""
    body = await json_object(request)
    webhooks = _node(request).webhooks
    return await authorized(request, lambda p: webhooks.create(p, body))


@get("/v1/webhooks")
async def list_webhooks(request: Request) -> dict[str, Any]:
    """Your webhooks (without their secrets)."""
    webhooks = _node(request).webhooks
    return await authorized(request, webhooks.list)


@delete("/v1/webhooks/{webhook_id:str}", status_code=HTTP_200_OK)
async def delete_webhook(request: Request, webhook_id: str) -> dict[str, Any]:
    """Delete a webhook; its undelivered events are dropped."""
    webhooks = _node(request).webhooks
    return await authorized(request, lambda p: webhooks.delete(p, webhook_id))


@get("/v1/webhooks/{webhook_id:str}/deliveries")
async def webhook_deliveries(
    request: Request, webhook_id: str, limit: str | None = None, cursor: str | None = None
) -> dict[str, Any]:
    """A webhook's events, newest first, with every delivery attempt."""
    webhooks = _node(request).webhooks
    return await authorized(request, lambda p: webhooks.deliveries(p, webhook_id, limit, cursor))


# -- receipts and the explorer (public) ----------------------------------------------------


@get("/v1/node")
async def node_info(request: Request) -> dict[str, Any]:
    """The node's public key (pin it to verify receipts), version, chain height, prices."""
    return await in_thread(public(request).describe)


@get("/v1/receipts")
async def list_receipts(
    request: Request, client: str | None = None, limit: str | None = None, cursor: str | None = None
) -> dict[str, Any]:
    """Receipts, newest first; `client=ait1...` narrows them to one client's address."""
    explorer = public(request).explorer
    return await in_thread(explorer.receipts, limit, cursor, client)


@get("/v1/receipts/{receipt_id:str}")
async def get_receipt(request: Request, receipt_id: str) -> dict[str, Any]:
    """One signed receipt, exactly as the node signed it."""
    return await in_thread(public(request).explorer.receipt, receipt_id)


@get("/v1/receipts/{receipt_id:str}/proof")
async def receipt_proof(request: Request, receipt_id: str) -> dict[str, Any]:
    """The block holding a receipt and the Merkle path from the receipt to the block's root."""
    return await in_thread(public(request).explorer.proof, receipt_id)


@post("/v1/receipts/verify", status_code=HTTP_200_OK)
async def verify_receipt_endpoint(request: Request) -> dict[str, Any]:
    """`{"receipt": {...}, "public_key"?: hex}` in; a verdict and its reasons out.

    Without `public_key` the receipt is checked against this node's own key.
    """
    public(request)
    body = await json_object(request)
    receipt = body.get("receipt")
    if not isinstance(receipt, dict):
        raise BadRequest("receipt must be the receipt object", error_code="INVALID_RECEIPT")
    public_key = body.get("public_key") or _node(request).key.public_key_hex
    if not isinstance(public_key, str):
        raise BadRequest("public_key must be a hex string", error_code="INVALID_PUBLIC_KEY")
    verdict = verify_receipt(receipt, public_key)
    try:
        key_id = key_id_for(public_key)
    except ValueError:
        key_id = None
    return {
        "valid": verdict.valid,
        "reasons": verdict.reasons,
        "public_key": public_key,
        "key_id": key_id,
    }


@get("/explorer/blocks")
async def explorer_blocks(
    request: Request, limit: str | None = None, cursor: str | None = None
) -> dict[str, Any]:
    """Sealed blocks, newest first."""
    return await in_thread(public(request).explorer.blocks, limit, cursor)


@get("/explorer/blocks/{height:int}")
async def explorer_block(request: Request, height: int) -> dict[str, Any]:
    """One block with its receipt ids and transactions."""
    return await in_thread(public(request).explorer.block, height)


@get("/explorer/transactions")
async def explorer_transactions(
    request: Request, limit: str | None = None, cursor: str | None = None
) -> dict[str, Any]:
    """Grants and payments, newest first."""
    return await in_thread(public(request).explorer.transactions, limit, cursor)


@get("/explorer/receipts")
async def explorer_receipts(
    request: Request, limit: str | None = None, cursor: str | None = None
) -> dict[str, Any]:
    """Receipts, newest first, each beside the block that holds it."""
    return await in_thread(public(request).explorer.receipts, limit, cursor)


@get("/explorer/stats")
async def explorer_stats(request: Request) -> dict[str, Any]:
    """Chain height, receipts, transactions, jobs by status, miners, tokens, value moved."""
    node = public(request)
    return await in_thread(lambda: node.explorer.stats(node.jobs.stats()))


@get("/explorer/addresses/{address:str}")
async def explorer_address(
    request: Request, address: str, limit: str | None = None
) -> dict[str, Any]:
    """An address's balance and recent transactions."""
    return await in_thread(public(request).explorer.address, address, limit)


# -- the page and the errors ---------------------------------------------------------------


@get(["/", "/explorer"], media_type=MediaType.HTML, include_in_schema=False)
async def explorer_page(request: Request) -> str:
    """The explorer page."""
    return _node(request).explorer_html()


def _error(status: int, detail: str, error_code: str, headers: dict[str, str] | None = None):
    return Response(
        {"detail": detail, "error_code": error_code},
        status_code=status,
        headers=headers,
        media_type=MediaType.JSON,
    )


def handle_api_error(_: Request, exc: ApiError) -> Response:
    return _error(exc.status, exc.detail, exc.error_code, exc.headers)


def handle_http_exception(_: Request, exc: HTTPException) -> Response:
    status = exc.status_code
    detail = exc.detail
    if status == 404:
        detail = "no such endpoint; the API is described at /api/schema"
    elif status == 400 and getattr(exc, "extra", None):
        detail = f"{detail}: {exc.extra}"
    return _error(status, detail, HTTP_CODES.get(status, "HTTP_ERROR"), exc.headers)


def handle_unexpected(_: Request, exc: Exception) -> Response:
    log.exception("unhandled error", exc_info=exc)
    return _error(500, "internal server error", "INTERNAL_ERROR")


def create_app(node: Node) -> Litestar:
    """The Litestar application serving `node`."""
    api = Router(
        path="/api",
        route_handlers=[
            health,
            stats,
            list_miners,
            whoami,
            submit_job,
            list_jobs,
            available_jobs,
            get_job,
            cancel_job,
            register_miner,
            heartbeat,
            claim_job,
            complete_job,
            fail_job,
            job_progress,
            stream_job,
            create_webhook,
            list_webhooks,
            delete_webhook,
            webhook_deliveries,
            node_info,
            list_receipts,
            get_receipt,
            receipt_proof,
            verify_receipt_endpoint,
            explorer_blocks,
            explorer_block,
            explorer_transactions,
            explorer_receipts,
            explorer_stats,
            explorer_address,
        ],
    )
    cors = None
    if node.settings.cors_origins:
        # Browser pages on these origins may call the API (with X-Api-Key); others may not.
        cors = CORSConfig(
            allow_origins=list(node.settings.cors_origins),
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["X-Api-Key", "Content-Type"],
            expose_headers=["Retry-After"],
        )
    app = Litestar(
        route_handlers=[api, explorer_page],
        cors_config=cors,
        exception_handlers={
            ApiError: handle_api_error,
            HTTPException: handle_http_exception,
            Exception: handle_unexpected,
        },
        openapi_config=OpenAPIConfig(
            title="aitbc-node Coordinator API", version=__version__, path="/api/schema"
        ),
        debug=False,
    )
    app.state.node = node
    return app
