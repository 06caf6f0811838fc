"""The HTTP API (Litestar): routes, request bodies, authentication and the error shape.

Handlers are async. Reads of a few rows by key run on the event loop (WAL reads never wait
for the writer), the key's check with them; a write is handed to the store's writer thread
with its key's check, which runs the writes queued together in one transaction and answers
them after its commit (`Store.run`); longer reads run on a thread pool. So neither a
write's fsync nor a long read ever stalls the event loop. Every error leaves as
`{"detail": ..., "error_code": ...}`; nothing else reaches the client.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

from litestar import Litestar, MediaType, Request, Response, Router, delete, get, post
from litestar.config.cors import CORSConfig
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.openapi.spec import Components, SecurityScheme
from litestar.params import FromQuery, HeaderParameter, JSONBody, Parameter
from litestar.response import ServerSentEvent
from litestar.response.sse import ServerSentEventMessage
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED
from litestar.types import Empty, Message, Scope

from aitbc_node import __version__, keys
from aitbc_node.edge import PARAMETER_CODES, decode_body, in_words
from aitbc_node.errors import ApiError, Unauthorized
from aitbc_node.jobs import TERMINAL
from aitbc_node.keys import Principal
from aitbc_node.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from aitbc_node.receipts import verify_receipt
from aitbc_node.schemas import (
    ADDRESS_PATTERN,
    CURSOR_PATTERN,
    DEFAULT_LIST_LIMIT,
    ID_PATTERN,
    IDEMPOTENCY_KEY_PATTERN,
    MAX_HEIGHT,
    MAX_ID_CHARS,
    MAX_IDEMPOTENCY_KEY_CHARS,
    MAX_LIST_LIMIT,
    MAX_WAIT_SECONDS,
    BlockDetail,
    BlockList,
    ClaimedJobs,
    ClaimNext,
    CompletedJobs,
    CompleteJob,
    CompleteJobs,
    CreateWebhook,
    DeletedWebhook,
    DeliveryList,
    Error,
    ExplorerStats,
    FailJob,
    Health,
    Heartbeat,
    Job,
    JobList,
    JobStatus,
    Miner,
    MinerList,
    MinerRequest,
    NewWebhook,
    NodeInfo,
    OfferedJobs,
    Progress,
    ProgressReport,
    Proof,
    Receipt,
    ReceiptList,
    RegisterMiner,
    Stats,
    SubmitJob,
    TimeSeries,
    TransactionList,
    Verdict,
    VerifyRequest,
    WebhookList,
    WhoAmI,
    Window,
    request_schemas,
)
from aitbc_node.schemas import Address as AddressView
from aitbc_node.signals import WORK, ended_key, job_key, model_work_key, progress_key
from aitbc_node.signing import key_id_for
from aitbc_node.timeseries import timeseries

if TYPE_CHECKING:
    from aitbc_node.node import Node

log = logging.getLogger("aitbc_node.api")
T = TypeVar("T")

# Longer reads, and work that may wait on more than the store, run here (see the module
# docstring); writes go to the store's writer thread instead.
_store_pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="api-store")

STREAM_KEEPALIVE_SECONDS = 15.0
# After a text event, how long a stream gathers text before it sends the next one (the first
# text goes out at once).
STREAM_GATHER_SECONDS = 0.05
# A comment line alone: Litestar's default `data=""` would add an empty `data:` line, which
# EventSource clients receive as an empty message event.
KEEP_ALIVE = ServerSentEventMessage(comment="keep-alive", data=None)

HTTP_CODES = {
    400: "BAD_REQUEST",
    401: "INVALID_API_KEY",
    402: "INSUFFICIENT_FUNDS",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    409: "CONFLICT",
    413: "BODY_TOO_LARGE",
    429: "RATE_LIMITED",
    503: "SERVICE_UNAVAILABLE",
}


class EdgeRequest(Request):
    """Litestar's request, decoding its JSON body strictly into the handler's `data` type
    (see `edge.py`) instead of into plain values converted later in lax mode."""

    async def json(self) -> Any:
        """The body decoded into the route's `data` type (plain JSON when it has none)."""
        if self._json is Empty:
            field = self.route_handler.parsed_data_field
            target = field.annotation if field is not None else Any
            self._json = decode_body(await self.body() or b"null", target)
        return self._json


def _node(request: Request) -> Node:
    return request.app.state.node


def store_pool() -> ThreadPoolExecutor:
    """The thread pool the handlers do their longer reads (and slower work) on."""
    return _store_pool


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """Run `fn(*args)` on the store's thread pool."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_store_pool, fn, *args)


def request_api_key(request: Request) -> str | None:
    """The API key the request carries: its X-Api-Key header, else the token of an
    `Authorization: Bearer` header (as OpenAI's clients send it)."""
    return api_key_from(request.headers.get("x-api-key"), request.headers.get("authorization"))


def api_key_from(x_api_key: str | None, authorization: str | None) -> str | None:
    """The API key of a request with these two headers' values (`request_api_key`)."""
    if x_api_key:
        return x_api_key
    scheme, _, token = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


async def ended_job(node: Node, job_id: str) -> dict[str, Any] | None:
    """The job's view once it has ended, else None (a check for `Waiters.until`). Read here
    on the event loop: kept from its finish, or one row by its key (WAL reads never wait for
    the writer)."""
    return node.jobs.ended_view(job_id)


# Where `authorized` runs a handler's work: on the event loop (a few rows read by key), on
# the thread pool (a longer read, or work that may wait on something else than the store, as
# a webhook URL's name lookup), or on the store's writer thread (writes that only compute and
# touch the store: a wait there would hold up every write queued behind it).
RunsOn = Literal["loop", "pool", "writer"]


async def authorized(request: Request, fn: Callable[[Principal], T], *, on: RunsOn = "writer") -> T:
    """Authenticate the request's API key (one row by key) and check its rate limit, then
    run `fn(principal)` where `on` says. For the writer, the key is read there, in the same
    trip: the writer's own connection keeps its pages cached, where a read on the loop
    starts a fresh snapshot after every commit and reads its pages again (under load it
    cost the loop several times the lookup itself)."""
    return await authorized_by(_node(request), request_api_key(request), fn, on=on)


async def authorized_by(
    node: Node, key: str | None, fn: Callable[[Principal], T], *, on: RunsOn = "writer"
) -> T:
    """`authorized` for a request whose node and API key are already known."""

    def as_principal() -> Principal:
        principal = keys.authenticate(node.store, key)
        node.rate_limiter.check(principal.role, principal.key_id)
        return principal

    if on == "writer" and key:  # (a missing key is refused here, without the trip)
        return await node.store.run(lambda: fn(as_principal()))
    principal = as_principal()
    if on == "loop":
        return fn(principal)
    return await in_thread(fn, principal)


def public(request: Request) -> Node:
    """The node, once this public read is within the caller's address's rate limit."""
    node = _node(request)
    address = request.client.host if request.client else "unknown"
    node.rate_limiter.check("public", address)
    return node


# -- OpenAPI: the key scheme and the error answers ---------------------------------------

API_KEY = [{"ApiKey": []}]

ERROR_CODES = {
    400: "INVALID_JSON, INVALID_TEXT, INVALID_BODY, UNKNOWN_FIELDS, UNKNOWN_PARAMS,"
    " INVALID_PROMPT, PROMPT_TOO_LONG, INVALID_MODEL, UNKNOWN_MODEL, INVALID_PARAMS,"
    " INVALID_MINER_ID, INVALID_CAPABILITIES, INVALID_GPU_INFO, INVALID_PUBLIC_KEY,"
    " INVALID_RESULT, INVALID_USAGE, INVALID_ERROR, INVALID_MODEL_SHA256,"
    " INVALID_MINER_SIGNATURE, MINER_SIGNATURE_REQUIRED, INVALID_URL, INVALID_EVENTS,"
    " WEBHOOK_URL_NOT_ALLOWED, INVALID_RECEIPT, INVALID_LIMIT, INVALID_CURSOR, INVALID_STATUS,"
    " INVALID_WAIT, INVALID_ADDRESS, INVALID_HEIGHT, INVALID_JOB_ID, INVALID_RECEIPT_ID,"
    " INVALID_WEBHOOK_ID, INVALID_IDEMPOTENCY_KEY, INVALID_WINDOW, BAD_REQUEST",
    401: "MISSING_API_KEY, INVALID_API_KEY, API_KEY_REVOKED",
    402: "INSUFFICIENT_FUNDS",
    403: "WRONG_ROLE, NOT_YOUR_JOB, NOT_YOUR_WEBHOOK, MINER_ID_MISMATCH, NOT_JOB_MINER",
    404: "JOB_NOT_FOUND, MINER_NOT_REGISTERED, NO_JOB, RECEIPT_NOT_FOUND, BLOCK_NOT_FOUND,"
    " WEBHOOK_NOT_FOUND, NOT_FOUND",
    409: "JOB_ALREADY_FINISHED, JOB_ALREADY_CLAIMED, JOB_CANCELLED, JOB_NOT_CLAIMED,"
    " MODEL_NOT_SERVED, RECEIPT_NOT_SEALED, TOO_MANY_WEBHOOKS, IDEMPOTENCY_KEY_REUSED,"
    " IDENTITY_ROLE_CONFLICT, CONFLICT",
    413: "BODY_TOO_LARGE",
    429: "RATE_LIMITED, QUEUE_FULL (with a Retry-After header)",
    500: "INTERNAL_ERROR",
    503: "SERVICE_UNAVAILABLE",
    507: "STORAGE_FULL (with a Retry-After header)",
}
ERROR_TITLES = {
    400: "Bad request",
    401: "Missing, unknown or revoked API key",
    402: "The client's balance does not cover the job",
    403: "This key may not do this",
    404: "Not found",
    409: "Conflict with the current state",
    413: "The body is too large",
    429: "Too many requests, or a full queue",
    500: "Internal error (logged with its request id)",
    503: "The node is shutting down or over its connection bound",
    507: "The node's disk is full; nothing was written",
}
# Every operation may meet these: a rate limit, and the node's own failure.
ALWAYS = (429, 500)


def errors(*statuses: int) -> dict[int, ResponseSpec]:
    """OpenAPI responses for the error statuses an operation can answer, in the error shape."""
    return {
        status: ResponseSpec(
            data_container=Error,
            description=f"{ERROR_TITLES[status]}. error_code: {ERROR_CODES[status]}",
            generate_examples=False,
        )
        for status in sorted({*statuses, *ALWAYS})
    }


# A client's, a miner's or any key's operation; one that takes a body; one that writes.
KEYED = (400, 401, 403)
BODY = (400, 413)
WRITES = (507,)


def operation(
    method: Callable[..., Any],
    path: str,
    *statuses: int,
    tag: str,
    keyed: bool = True,
    responses: dict[int, ResponseSpec] | None = None,
    **options: Any,
) -> Any:
    """A route (`method` is Litestar's `get`, `post` or `delete`) with the node's OpenAPI
    conventions: the error statuses it can answer, in the error shape; the `X-Api-Key` scheme
    unless it is public; its tag. A POST answers 200 unless told otherwise."""
    if keyed:
        statuses = (*KEYED, *statuses)
        options["security"] = API_KEY
    if method is post:
        options.setdefault("status_code", HTTP_200_OK)
    return method(path, responses={**errors(*statuses), **(responses or {})}, tags=[tag], **options)


# Path and query parameters, bounded before they reach the store.
JobId = Annotated[
    str, Parameter(pattern=ID_PATTERN, max_length=MAX_ID_CHARS, description="job-...")
]
ReceiptId = Annotated[
    str, Parameter(pattern=ID_PATTERN, max_length=MAX_ID_CHARS, description="rcpt-...")
]
WebhookId = Annotated[
    str, Parameter(pattern=ID_PATTERN, max_length=MAX_ID_CHARS, description="wh-...")
]
MinerIdPath = Annotated[str, Parameter(pattern=ID_PATTERN, max_length=MAX_ID_CHARS)]
# How many pending jobs one offer to a miner holds unless it asks for another number.
OFFER_LIMIT = 10
Limit = Annotated[
    int,
    Parameter(ge=1, le=MAX_LIST_LIMIT, description=f"items per page, 1 to {MAX_LIST_LIMIT}"),
]
Cursor = Annotated[
    str | None,
    Parameter(
        pattern=CURSOR_PATTERN,
        max_length=64,
        description="next_cursor of the previous page",
    ),
]
Wait = Annotated[
    float,
    Parameter(
        ge=0,
        le=MAX_WAIT_SECONDS,
        description=f"seconds to long-poll, 0 to {MAX_WAIT_SECONDS:g}",
    ),
]
Address = Annotated[str, Parameter(pattern=ADDRESS_PATTERN, max_length=MAX_ID_CHARS)]
IdempotencyKey = Annotated[
    str | None,
    HeaderParameter(
        name="Idempotency-Key",
        pattern=IDEMPOTENCY_KEY_PATTERN,
        max_length=MAX_IDEMPOTENCY_KEY_CHARS,
        description="Makes a retried submit safe: the same key and body from the same client"
        " return the first job (200), for at least 24 hours; another body gets 409"
        " IDEMPOTENCY_KEY_REUSED.",
    ),
]


# -- public ------------------------------------------------------------------------------


@operation(get, "/health", tag="node", keyed=False, sync_to_thread=False)
def health(request: Request) -> Health:
    """Liveness, version, the models served and the built-in miner's state."""
    return public(request).health()


@operation(get, "/v1/stats", tag="node", keyed=False)
async def stats(request: Request) -> Stats:
    """Jobs by status, miners online, queue depth, tokens generated, average latency."""
    return await in_thread(public(request).jobs.stats)


@operation(get, "/v1/miners", tag="miners", keyed=False)
async def list_miners(request: Request) -> MinerList:
    """Every registered miner with its models and state."""
    return {"miners": await in_thread(public(request).miners.list)}


# -- clients -----------------------------------------------------------------------------


@operation(
    post,
    "/v1/jobs",
    *BODY,
    *WRITES,
    402,
    409,
    tag="jobs",
    status_code=HTTP_201_CREATED,
    responses={
        200: ResponseSpec(
            data_container=Job,
            description="The job an earlier request with the same Idempotency-Key made",
            generate_examples=False,
        )
    },
)
async def submit_job(
    request: Request,
    data: JSONBody[SubmitJob],
    idempotency_key: IdempotencyKey = None,
    wait: Wait = 0,
) -> Response[Job]:
    """Submit a job: `{prompt, model?, params?}`. Without `model`, the node's `default_model`.
    With `wait=SECONDS` (up to 60) the answer comes once the job has ended (with its result
    and receipt), or with its state when the time runs out: submit and wait in one request.
    The job is stored before any wait begins."""
    job, status = await submit_and_wait(
        _node(request), request_api_key(request), data, idempotency_key, wait
    )
    return Response(job, status_code=status)


async def submit_and_wait(
    node: Node, key: str | None, data: SubmitJob, idempotency_key: str | None, wait: float
) -> tuple[dict[str, Any], int]:
    """`submit_job`'s work: the job (ended, when `wait` allowed) and the answer's status
    (201 for a new job, 200 for an idempotent replay)."""
    jobs = node.jobs
    if not wait:
        job, created = await authorized_by(
            node, key, lambda p: jobs.submit(p, data, idempotency_key)
        )
        return job, HTTP_201_CREATED if created else HTTP_200_OK
    waiters = node.signals.waiters
    ends = asyncio.get_running_loop().create_future()
    watched: list[str] = []

    def submit_watched(principal: Principal) -> tuple[dict[str, Any], bool]:
        job, created = jobs.submit(principal, data, idempotency_key)
        # Added before the submit's commit: the job's end cannot be announced before it.
        watched.append(ended_key(job["job_id"]))
        waiters.add(ends, *watched)
        return job, created

    try:
        job, created = await authorized_by(node, key, submit_watched)
        if job["status"] not in TERMINAL:
            job_id = job["job_id"]
            ended = await waiters.until(
                lambda: ended_job(node, job_id), (ended_key(job_id),), wait, added=ends
            )
            job = ended or jobs.peek(job_id)  # one row by key, on the loop
    finally:
        waiters.unregister(ends, *watched)
    return job, HTTP_201_CREATED if created else HTTP_200_OK


@operation(get, "/v1/whoami", tag="keys")
async def whoami(request: Request) -> WhoAmI:
    """The identity and role this API key acts as."""
    return await authorized(
        request,
        on="loop",
        fn=lambda p: {"key_id": p.key_id, "name": p.name, "role": p.role, "identity": p.identity},
    )


@operation(get, "/v1/jobs", tag="jobs")
async def list_jobs(
    request: Request,
    status: FromQuery[JobStatus | None] = None,
    limit: Limit = DEFAULT_LIST_LIMIT,
    cursor: Cursor = None,
) -> JobList:
    """Your jobs, newest first; `next_cursor` fetches the next page."""
    jobs = _node(request).jobs
    return await authorized(request, lambda p: jobs.list(p, status, limit, cursor), on="pool")


@operation(get, "/v1/jobs/available", *WRITES, 404, tag="miners")
async def available_jobs(
    request: Request,
    miner_id: Annotated[str, Parameter(pattern=ID_PATTERN, max_length=MAX_ID_CHARS)],
    wait: Wait = 0,
    limit: Limit = OFFER_LIMIT,
) -> OfferedJobs:
    """Pending jobs for the models this miner registered, up to `limit`, in turn by client
    (the next job of the client with the fewest running and queued ahead of it first, the
    oldest among equals). With `wait=SECONDS` (up to 60) the answer comes the moment a
    matching job is submitted."""
    node = _node(request)
    found = await authorized(request, lambda p: (p, node.jobs.available(p, miner_id, limit)))
    principal, offer = found
    if offer["jobs"] or wait == 0:
        return offer

    async def offered() -> dict[str, Any] | None:
        current = await in_thread(node.jobs.available, principal, miner_id, limit)
        return current if current["jobs"] else None

    return await node.signals.waiters.until(offered, (WORK,), wait) or {"jobs": []}


@operation(get, "/v1/jobs/{job_id:str}", 404, tag="jobs")
async def get_job(request: Request, job_id: JobId, wait: Wait = 0) -> Job:
    """One job. With `wait=SECONDS` (up to 60) the answer comes as soon as the job ends, or
    with its current state when the time runs out."""
    node = _node(request)
    job = await authorized(request, lambda p: node.jobs.get(p, job_id), on="loop")
    if job["status"] in TERMINAL or wait == 0:
        return job

    done = await node.signals.waiters.until(
        lambda: ended_job(node, job_id), (ended_key(job_id),), wait
    )
    return done or node.jobs.peek(job_id)  # one row by key, on the loop


@operation(post, "/v1/jobs/{job_id:str}/cancel", *WRITES, 404, 409, tag="jobs")
async def cancel_job(request: Request, job_id: JobId) -> Job:
    """Cancel a pending or running job."""
    jobs = _node(request).jobs
    return await authorized(request, lambda p: jobs.cancel(p, job_id))


@operation(
    get,
    "/v1/jobs/{job_id:str}/stream",
    404,
    tag="jobs",
    media_type="text/event-stream",
    response_description='Server-sent events: `text` events with `{"text": ...}` as the miner'
    " generates, then one `job` event with the final job",
)
async def stream_job(request: Request, job_id: JobId) -> ServerSentEvent:
    """Server-sent events: `text` events as the miner generates (a late joiner first gets
    the text so far), then one `job` event with the final job view."""
    node = _node(request)
    await authorized(request, lambda p: node.jobs.get(p, job_id), on="loop")
    return ServerSentEvent(job_events(node, job_id), headers={"Cache-Control": "no-cache"})


async def follow_job(node: Node, job_id: str) -> AsyncIterator[tuple[str, Any]]:
    """A job's text as the miner generates it, then its end: `("text", str)` pieces (a late
    joiner first gets the text so far), `("idle", None)` after STREAM_KEEPALIVE_SECONDS
    without any, and last `("job", view)` once it has ended (its completed result begins
    with the text sent, the rest coming as one more piece). Stops early on shutdown."""
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
                yield "text", text
                # Gather the next tokens into one event: an event per token per stream costs
                # the event loop (and the cores llama.cpp computes on) more than the tokens.
                await asyncio.sleep(STREAM_GATHER_SECONDS)
                continue
            job = await in_thread(node.jobs.peek, job_id)
            if job["status"] in TERMINAL:
                sent = "".join(streamed)
                result = job["result"] or ""
                if job["status"] == "completed" and result.startswith(sent) and result != sent:
                    yield "text", result[len(sent) :]
                yield "job", job
                return
            if signals.waiters.closed:
                return  # shutting down; the client can reconnect to the next start
            try:
                await asyncio.wait_for(future, STREAM_KEEPALIVE_SECONDS)
            except TimeoutError:
                yield "idle", None
        finally:
            signals.waiters.unregister(future, *keys_)


async def job_events(node: Node, job_id: str) -> AsyncIterator[ServerSentEventMessage]:
    async for kind, value in follow_job(node, job_id):
        if kind == "text":
            yield ServerSentEventMessage(event="text", data=json.dumps({"text": value}))
        elif kind == "job":
            yield ServerSentEventMessage(event="job", data=json.dumps(value))
        else:
            yield KEEP_ALIVE


# -- miners ------------------------------------------------------------------------------


@operation(post, "/v1/jobs/{job_id:str}/progress", *BODY, *WRITES, 404, 409, tag="miners")
async def job_progress(request: Request, job_id: JobId, data: JSONBody[ProgressReport]) -> Progress:
    """A remote miner's generated text so far: `{miner_id, text}` (the new text only)."""
    jobs = _node(request).jobs
    return await authorized(request, lambda p: jobs.progress(p, job_id, data))


@operation(post, "/v1/miners/register", *BODY, *WRITES, tag="miners")
async def register_miner(request: Request, data: JSONBody[RegisterMiner]) -> Miner:
    """Register a miner: `{miner_id, capabilities, gpu_info, public_key?}`."""
    miners = _node(request).miners
    return await authorized(request, lambda p: miners.register(p, data))


@operation(post, "/v1/miners/{miner_id:str}/heartbeat", *WRITES, 404, tag="miners")
async def heartbeat(request: Request, miner_id: MinerIdPath) -> Heartbeat:
    """Renew the leases of this miner's running jobs."""
    jobs = _node(request).jobs
    return await authorized(request, lambda p: jobs.heartbeat(p, miner_id))


@operation(post, "/v1/jobs/{job_id:str}/claim", *BODY, *WRITES, 404, 409, tag="miners")
async def claim_job(request: Request, job_id: JobId, data: JSONBody[MinerRequest]) -> Job:
    """Claim a pending job: `{miner_id}`. Of racing claims one wins, the others get 409."""
    jobs = _node(request).jobs
    return await authorized(request, lambda p: jobs.claim(p, job_id, data.miner_id))


@operation(post, "/v1/jobs/claim-next", *BODY, *WRITES, 404, tag="miners")
async def claim_next(request: Request, data: JSONBody[ClaimNext]) -> ClaimedJobs:
    """Take work: `{miner_id, max_jobs?, wait?, results?}`. Up to `max_jobs` (1 to 64)
    pending jobs for this miner's models, in turn by client, each handed to this miner alone:
    miners asking together get different jobs, never a 409. With `wait=SECONDS` (up to 60)
    the answer comes as soon as a job is submitted (an empty `jobs` when the time runs out).
    It also renews the leases of the jobs this miner runs (`renewed`), as a heartbeat does.
    `results` (up to 64, as `POST /v1/jobs/complete` takes them) are recorded first, in the
    same transaction, and are on disk before any wait begins; each one's outcome is in the
    answer's `results`."""
    return await claim_next_for(_node(request), request_api_key(request), data)


async def claim_next_for(node: Node, key: str | None, data: ClaimNext) -> dict[str, Any]:
    """`claim_next`'s work: the answer's body."""
    jobs, waiters = node.jobs, node.signals.waiters
    woken = asyncio.get_running_loop().create_future()
    keys: tuple[str, ...] = ()

    def claim_or_watch(
        principal: Principal,
    ) -> tuple[Principal, dict[str, Any], list[str] | None]:
        """The claim, and the models it now watches for (None: it answers at once)."""
        nonlocal keys
        claimed = jobs.claim_next(principal, data)
        if claimed["jobs"] or data.wait == 0:
            return principal, claimed, None
        # Nothing to take: watch for work from here, before this write's commit, so a job
        # submitted after this claim looked wakes this request, and the wait starts without
        # a first look of its own.
        models = jobs.served_by(data.miner_id)
        keys = tuple(model_work_key(model) for model in models)
        waiters.add(woken, *keys)
        return principal, claimed, models

    # Once woken, the results are recorded: later tries only take work (and renew leases).
    take = ClaimNext(miner_id=data.miner_id, max_jobs=data.max_jobs, wait=data.wait)

    async def claimed_now(principal: Principal, models: list[str]) -> dict[str, Any] | None:
        def claim_if_pending() -> dict[str, Any] | None:
            # Read first on the writer thread, which sees its own group's claims: of the
            # miners woken together (for requeued jobs), those that come after the jobs were
            # taken write nothing.
            return jobs.claim_next(principal, take) if jobs.has_pending(models) else None

        current = await node.store.run(claim_if_pending)
        return current if current and current["jobs"] else None

    try:
        principal, claimed, models = await authorized_by(node, key, claim_or_watch)
        if models is None:
            return claimed
        current = await waiters.until(
            lambda: claimed_now(principal, models), keys, data.wait, added=woken
        )
    finally:
        waiters.unregister(woken, *keys)
    return {**current, "results": claimed["results"]} if current else claimed


@operation(post, "/v1/jobs/complete", *BODY, *WRITES, 404, tag="miners")
async def complete_jobs(request: Request, data: JSONBody[CompleteJobs]) -> CompletedJobs:
    """Complete several claimed jobs at once: `{miner_id, results: [{job_id, result, usage?,
    model_sha256?, miner_signature?}]}` (1 to 64), in one transaction. Each result stands on
    its own: one refused (already finished, not this miner's, a bad signature) comes back
    with its `detail` and `error_code` and the others are recorded."""
    jobs = _node(request).jobs
    return await authorized(request, lambda p: jobs.complete_many(p, data))


@operation(post, "/v1/jobs/{job_id:str}/release", *BODY, *WRITES, 404, 409, tag="miners")
async def release_job(request: Request, job_id: JobId, data: JSONBody[MinerRequest]) -> Job:
    """Hand a claimed job back to the queue, uncounted: `{miner_id}` (a miner shutting down
    with work in hand). The job is pending again, for any miner."""
    jobs = _node(request).jobs
    return await authorized(request, lambda p: jobs.hand_back(p, job_id, data))


@operation(post, "/v1/jobs/{job_id:str}/complete", *BODY, *WRITES, 404, 409, tag="miners")
async def complete_job(request: Request, job_id: JobId, data: JSONBody[CompleteJob]) -> Job:
    """Complete a claimed job: `{miner_id, result, usage?, model_sha256?, miner_signature?}`."""
    jobs = _node(request).jobs
    return await authorized(request, lambda p: jobs.complete(p, job_id, data))


@operation(post, "/v1/jobs/{job_id:str}/fail", *BODY, *WRITES, 404, 409, tag="miners")
async def fail_job(request: Request, job_id: JobId, data: JSONBody[FailJob]) -> Job:
    """Fail a claimed job: `{miner_id, error}`."""
    jobs = _node(request).jobs
    return await authorized(request, lambda p: jobs.fail(p, job_id, data))


# -- webhooks ---------------------------------------------------------------------------


@operation(post, "/v1/webhooks", *BODY, *WRITES, 409, tag="webhooks", status_code=HTTP_201_CREATED)
async def create_webhook(request: Request, data: JSONBody[CreateWebhook]) -> NewWebhook:
    """Register `{url, events}`; the answer holds the signing secret, shown this once."""
    webhooks = _node(request).webhooks
    # The URL's host name is looked up (DNS): never on the writer thread.
    return await authorized(request, lambda p: webhooks.create(p, data), on="pool")


@operation(get, "/v1/webhooks", tag="webhooks")
async def list_webhooks(request: Request) -> WebhookList:
    """Your webhooks (without their secrets)."""
    webhooks = _node(request).webhooks
    return await authorized(request, webhooks.list, on="pool")


@operation(
    delete,
    "/v1/webhooks/{webhook_id:str}",
    *WRITES,
    404,
    tag="webhooks",
    status_code=HTTP_200_OK,
)
async def delete_webhook(request: Request, webhook_id: WebhookId) -> DeletedWebhook:
    """Delete a webhook; its undelivered events are dropped."""
    webhooks = _node(request).webhooks
    return await authorized(request, lambda p: webhooks.delete(p, webhook_id))


@operation(get, "/v1/webhooks/{webhook_id:str}/deliveries", 404, tag="webhooks")
async def webhook_deliveries(
    request: Request,
    webhook_id: WebhookId,
    limit: Limit = DEFAULT_LIST_LIMIT,
    cursor: Cursor = None,
) -> DeliveryList:
    """A webhook's events, newest first, with every delivery attempt."""
    webhooks = _node(request).webhooks
    return await authorized(
        request, lambda p: webhooks.deliveries(p, webhook_id, limit, cursor), on="pool"
    )


# -- receipts and the explorer (public) ----------------------------------------------------


@operation(get, "/v1/node", tag="node", keyed=False)
async def node_info(request: Request) -> NodeInfo:
    """The node's public key (pin it to verify receipts), version, chain height, prices."""
    return await in_thread(public(request).describe)


@operation(get, "/v1/receipts", 400, tag="receipts", keyed=False)
async def list_receipts(
    request: Request,
    client: Annotated[
        Address | None, Parameter(description="narrow to one client's ait1... address")
    ] = None,
    limit: Limit = DEFAULT_LIST_LIMIT,
    cursor: Cursor = None,
) -> ReceiptList:
    """Receipts, newest first; `client=ait1...` narrows them to one client's address."""
    explorer = public(request).explorer
    return await in_thread(explorer.receipts, limit, cursor, client)


@operation(get, "/v1/receipts/{receipt_id:str}", 400, 404, tag="receipts", keyed=False)
async def get_receipt(request: Request, receipt_id: ReceiptId) -> Receipt:
    """One signed receipt, exactly as the node signed it."""
    return await in_thread(public(request).explorer.receipt, receipt_id)


@operation(get, "/v1/receipts/{receipt_id:str}/proof", 400, 404, 409, tag="receipts", keyed=False)
async def receipt_proof(request: Request, receipt_id: ReceiptId) -> Proof:
    """The block holding a receipt and the Merkle path from the receipt to the block's root."""
    return await in_thread(public(request).explorer.proof, receipt_id)


@operation(post, "/v1/receipts/verify", *BODY, tag="receipts", keyed=False)
async def verify_receipt_endpoint(request: Request, data: JSONBody[VerifyRequest]) -> Verdict:
    """`{"receipt": {...}, "public_key"?: hex}` in; a verdict and its reasons out.

    Without `public_key` the receipt is checked against this node's own key.
    """
    node = public(request)
    public_key = data.public_key or node.key.public_key_hex
    verdict = verify_receipt(data.receipt, public_key)
    return Verdict(
        valid=verdict.valid,
        reasons=list(verdict.reasons),
        public_key=public_key,
        key_id=key_id_for(public_key),
    )


@operation(get, "/explorer/blocks", 400, tag="explorer", keyed=False)
async def explorer_blocks(
    request: Request, limit: Limit = DEFAULT_LIST_LIMIT, cursor: Cursor = None
) -> BlockList:
    """Sealed blocks, newest first."""
    return await in_thread(public(request).explorer.blocks, limit, cursor)


@operation(get, "/explorer/blocks/{height:int}", 400, 404, tag="explorer", keyed=False)
async def explorer_block(
    request: Request, height: Annotated[int, Parameter(ge=0, le=MAX_HEIGHT)]
) -> BlockDetail:
    """One block with its receipt ids and transactions."""
    return await in_thread(public(request).explorer.block, height)


@operation(get, "/explorer/transactions", 400, tag="explorer", keyed=False)
async def explorer_transactions(
    request: Request, limit: Limit = DEFAULT_LIST_LIMIT, cursor: Cursor = None
) -> TransactionList:
    """Grants and payments, newest first."""
    return await in_thread(public(request).explorer.transactions, limit, cursor)


@operation(get, "/explorer/receipts", 400, tag="explorer", keyed=False)
async def explorer_receipts(
    request: Request, limit: Limit = DEFAULT_LIST_LIMIT, cursor: Cursor = None
) -> ReceiptList:
    """Receipts, newest first, each beside the block that holds it."""
    return await in_thread(public(request).explorer.receipts, limit, cursor)


@operation(get, "/explorer/stats", tag="explorer", keyed=False)
async def explorer_stats(request: Request) -> ExplorerStats:
    """Chain height, receipts, transactions, jobs by status, miners, tokens, value moved."""
    node = public(request)
    return await in_thread(lambda: node.explorer.stats(node.miners.list()))


@operation(get, "/explorer/timeseries", 400, tag="explorer", keyed=False)
async def explorer_timeseries(
    request: Request,
    window: Annotated[
        Window, Parameter(description="hour: 60 points of 1 minute; day: 48 of 30 minutes")
    ] = "hour",
) -> TimeSeries:
    """Jobs completed and failed, tokens, tokens/s, queue depth and p50/p95 latency per
    bucket over the last hour or day, and the window's completed work by model and miner."""
    return await in_thread(timeseries, public(request).store, window)


@operation(get, "/explorer/addresses/{address:str}", 400, tag="explorer", keyed=False)
async def explorer_address(
    request: Request, address: Address, limit: Limit = DEFAULT_LIST_LIMIT, cursor: Cursor = None
) -> AddressView:
    """An address's balance and its transactions, newest first; `next_cursor` pages back."""
    return await in_thread(public(request).explorer.address, address, limit, cursor)


# -- the page and the errors ---------------------------------------------------------------


@get(["/", "/explorer"], media_type=MediaType.HTML, include_in_schema=False)
async def explorer_page(request: Request) -> str:
    """The explorer page."""
    return _node(request).explorer_html()


# -- metrics -------------------------------------------------------------------------------


@get("/metrics", media_type=METRICS_CONTENT_TYPE, include_in_schema=False)
async def metrics_page(request: Request) -> Response[bytes]:
    """Prometheus metrics (`metrics.py`); only with the `--metrics-key` when one is set."""
    node = public(request)
    expected = node.settings.metrics_key
    if expected is not None:
        given = request_api_key(request)
        challenge = {"WWW-Authenticate": "Bearer"}
        if given is None:
            raise Unauthorized(
                "/metrics needs the metrics key (--metrics-key): send"
                " Authorization: Bearer KEY or X-Api-Key: KEY",
                error_code="MISSING_API_KEY",
                headers=challenge,
            )
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise Unauthorized(
                "that is not the metrics key", error_code="INVALID_API_KEY", headers=challenge
            )
    body = await in_thread(node.metrics.render)
    # As a header: a text/* media type would get a second `charset` appended.
    return Response(body, headers={"content-type": METRICS_CONTENT_TYPE})


def response_counter(node: Node) -> Callable[[Message, Scope], Awaitable[None]]:
    """A `before_send` hook that counts every response for /metrics by method, route
    template (never the raw path, so the label's values stay few) and status; errors and
    unknown paths included."""
    count = node.metrics.http_response

    async def count_response(message: Message, scope: Scope) -> None:
        if message["type"] == "http.response.start":
            count(scope.get("method", ""), scope.get("path_template"), message["status"])

    return count_response


def _error(status: int, detail: str, error_code: str, headers: dict[str, str] | None = None):
    return Response(
        {"detail": detail, "error_code": error_code},
        status_code=status,
        headers=headers,
        media_type=MediaType.JSON,
    )


def handle_api_error(_: Request, exc: ApiError) -> Response:
    return _error(exc.status, exc.detail, exc.error_code, exc.headers)


def handle_http_exception(request: Request, exc: HTTPException) -> Response:
    status = exc.status_code
    if status >= 500:
        # Litestar's own 500s (a response it cannot serialize, say) are bugs like any other:
        # logged with the traceback (and the request id), never shown to the client.
        log.error("unhandled error: %s", exc.detail, exc_info=exc)
        return _error(status, "internal server error", "INTERNAL_ERROR")
    detail = exc.detail
    code = HTTP_CODES.get(status, "HTTP_ERROR")
    if status == 404:
        detail = "no such endpoint; the API is described at /api/schema"
    elif status == 413:
        limit = _node(request).limits.max_body_bytes
        detail = f"the body is larger than {limit} bytes"
    elif isinstance(exc, ValidationException):
        detail, code = _parameter_error(exc)
    elif status == 400 and getattr(exc, "extra", None):
        detail = f"{detail}: {exc.extra}"
    path = request.url.path
    if path.startswith("/v1/") and status in (404, 405):
        if path.split("/")[2] in _coordinator_sections(request.app):
            detail = f"no such endpoint; the Coordinator API is under /api: /api{path}"
        else:  # an OpenAI client asked for something the node does not serve
            from aitbc_node.openai_api import reshape

            return reshape(_error(status, detail, code, exc.headers))
    return _error(status, detail, code, exc.headers)


def _coordinator_sections(app: Litestar) -> set[str]:
    """The first segments of the Coordinator API's /api/v1/... routes (jobs, miners, ...):
    those under /api/v1 but not also at /v1, where the OpenAI-compatible routes are."""
    paths = [route.path for route in app.routes]
    ours = {p.split("/")[3] for p in paths if p.startswith("/api/v1/")}
    return ours - {p.split("/")[2] for p in paths if p.startswith("/v1/")}


def _parameter_error(exc: ValidationException) -> tuple[str, str]:
    """The detail and error code for Litestar's own validation of query and path values:
    the first bad parameter, by name, with the rule it broke."""
    problems = exc.extra if isinstance(exc.extra, list) else []
    for problem in problems:
        if isinstance(problem, dict) and problem.get("key"):
            key = str(problem["key"])
            if key == "data":  # a POST that needs a body and got none
                return "the body must be a JSON object", "INVALID_BODY"
            message = in_words(str(problem.get("message", "invalid value")))
            return f"{key}: {message}", PARAMETER_CODES.get(key, "BAD_REQUEST")
    missing = re.match(r"Missing required (?:\w+ )?parameter '([^']+)'", str(exc.detail))
    if missing:
        key = missing.group(1)
        return f"{key} is required", PARAMETER_CODES.get(key, "BAD_REQUEST")
    return str(exc.detail), "BAD_REQUEST"


def handle_unexpected(_: Request, exc: Exception) -> Response:
    log.exception("unhandled error", exc_info=exc)
    return _error(500, "internal server error", "INTERNAL_ERROR")


OPENAPI_DESCRIPTION = """\
The AITBC Coordinator API as served by aitbc-node: clients submit LLM jobs, miners claim and
run them, every completed job yields a signed receipt. Every error is
`{"detail": ..., "error_code": ...}`; the error codes of each status are listed with it.
Keyed operations take the `X-Api-Key` header (or `Authorization: Bearer KEY`). The
OpenAI-compatible routes (`/v1/models`, `/v1/chat/completions`, `/v1/completions`, also under
`/api/v1`) follow OpenAI's own API reference and are not described here.
"""


def create_app(node: Node) -> Litestar:
    """The Litestar application serving `node`."""
    from aitbc_node.openai_api import openai_router  # it builds on this module's handlers

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
            claim_next,
            complete_jobs,
            release_job,
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
            explorer_timeseries,
            explorer_address,
            openai_router("/v1"),  # the same OpenAI-compatible routes under /api/v1 too
        ],
    )
    cors = None
    if node.settings.cors_origins:
        # Browser pages on these origins may call the API (with X-Api-Key); others may not.
        cors = CORSConfig(
            allow_origins=list(node.settings.cors_origins),
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["X-Api-Key", "Authorization", "Content-Type"],
            expose_headers=["Retry-After", "X-Aitbc-Job-Id", "X-Aitbc-Receipt-Id"],
        )
    # `--no-metrics`: no route at all, so /metrics is a 404 like any unknown path.
    metrics = [metrics_page] if node.settings.metrics else []
    app = Litestar(
        route_handlers=[api, openai_router("/v1"), explorer_page, *metrics],
        before_send=[response_counter(node)],
        request_class=EdgeRequest,
        request_max_body_size=node.limits.max_body_bytes,
        cors_config=cors,
        exception_handlers={
            ApiError: handle_api_error,
            HTTPException: handle_http_exception,
            Exception: handle_unexpected,
        },
        openapi_config=OpenAPIConfig(
            title="aitbc-node Coordinator API",
            version=__version__,
            path="/api/schema",
            description=OPENAPI_DESCRIPTION,
            components=Components(
                security_schemes={
                    "ApiKey": SecurityScheme(
                        type="apiKey",
                        name="X-Api-Key",
                        security_scheme_in="header",
                        description="A client, miner or admin key (`aitbc-node keys create`).",
                    )
                }
            ),
        ),
        debug=False,
        logging_config=None,  # the node's own (logs.setup), not Litestar's root handler
    )
    app.state.node = node
    _use_msgspec_request_schemas(app)
    return app


def _use_msgspec_request_schemas(app: Litestar) -> None:
    """Describe each request body in the OpenAPI document with msgspec's own JSON Schema.

    Litestar's generator drops a field's constraints inside an optional field, a union or a
    list's items, and knows nothing of `forbid_unknown_fields`; msgspec's keeps every bound,
    pattern and `additionalProperties: false`, so the document refuses what the node refuses.
    """
    schemas = app.openapi_schema.components.schemas
    if schemas is not None:
        # Plain JSON Schema dicts: Litestar serialises them as they are.
        schemas.update(request_schemas())  # type: ignore[arg-type]
