"""The OpenAI-compatible API: `/v1/models`, `/v1/chat/completions` and `/v1/completions`.

Tools that speak OpenAI's API (its `openai` package, Open WebUI, LangChain...) can use the
node as their local endpoint. Every completion is an ordinary job, submitted through
`Jobs.submit`: the same queue, limits, keys, miners (built-in and remote), receipts, ledger,
webhooks and explorer. The answer names its job and receipt (`X-Aitbc-Job-Id` and
`X-Aitbc-Receipt-Id` headers, and an `aitbc` field OpenAI's clients ignore).

Errors on these routes take OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`,
with the status OpenAI would answer, so its clients raise their typed exceptions. A client
that goes away before its answer is complete (a closed stream, a timed-out request) cancels
its job.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from litestar import MediaType, Request, Response, Router, get, post
from litestar.exceptions import HTTPException
from litestar.params import FromPath, JSONBody
from litestar.response import ServerSentEvent
from litestar.response.sse import ServerSentEventMessage
from msgspec import UNSET

from aitbc_node import api
from aitbc_node.errors import ApiError, BadRequest, Conflict, NotFound, ServiceUnavailable
from aitbc_node.keys import Principal
from aitbc_node.openai_schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    Message,
    Sampling,
    sampling_params,
    unsupported_parameters,
)
from aitbc_node.schemas import ChatMessage, SubmitJob
from aitbc_node.signals import ended_key

if TYPE_CHECKING:
    from aitbc_node.node import Node

log = logging.getLogger("aitbc_node.openai")

# OpenAI's error `type` for each status its clients tell apart.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_quota",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}
# How long one wait for a job's end lasts before the client's connection is looked at again.
WAIT_SLICE_SECONDS = 30.0
# When the models' `created` time is: the node's start (the API has no better one).
STARTED = int(time.time())


# -- errors ------------------------------------------------------------------------------


def openai_error(
    status: int,
    message: str,
    code: str | None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """An error in OpenAI's shape."""
    body = {
        "error": {
            "message": message,
            "type": ERROR_TYPES.get(status, "server_error" if status >= 500 else "api_error"),
            "param": param,
            "code": code,
        }
    }
    return Response(body, status_code=status, headers=headers, media_type=MediaType.JSON)


def reshape(response: Response) -> Response:
    """An error the Coordinator API would answer (`{detail, error_code}`), in OpenAI's shape."""
    body = response.content if isinstance(response.content, dict) else {}
    if "error" in body:
        return response  # already in OpenAI's shape
    return openai_error(
        response.status_code,
        str(body.get("detail", "error")),
        str(body.get("error_code", "error")).lower(),
        headers=dict(response.headers or {}),
    )


def api_error(exc: ApiError) -> Response:
    """`exc` in OpenAI's shape."""
    status, code, param = exc.status, exc.error_code.lower(), exc.param
    if exc.error_code == "UNKNOWN_MODEL":  # OpenAI answers an unknown model with a 404
        status, code, param = 404, "model_not_found", "model"
    return openai_error(status, exc.detail, code, param, exc.headers)


def handle_api_error(_: Request, exc: ApiError) -> Response:
    return api_error(exc)


def handle_http_exception(request: Request, exc: HTTPException) -> Response:
    return reshape(api.handle_http_exception(request, exc))


def handle_unexpected(request: Request, exc: Exception) -> Response:
    return reshape(api.handle_unexpected(request, exc))


# -- models ------------------------------------------------------------------------------


def model_entries(node: Node) -> list[dict[str, Any]]:
    """Every model a miner serves now, and every alias of one, as OpenAI's model objects."""
    miners = node.jobs.miners
    owners = miners.serving()

    def entry(name: str, serving: list[str]) -> dict[str, Any]:
        owned_by = "aitbc-node" if miners.builtin_id in serving else ",".join(serving)
        return {"id": name, "object": "model", "created": STARTED, "owned_by": owned_by}

    entries = [entry(name, serving) for name, serving in sorted(owners.items())]
    for alias, target in sorted(node.jobs.rules.aliases.items()):
        if target in owners:
            entries.append(entry(alias, owners[target]) | {"aitbc": {"alias_of": target}})
    return entries


@get("/models", include_in_schema=False)
async def list_models(request: Request) -> dict[str, Any]:
    """The models this node serves now (OpenAI's `models.list`)."""
    node = api._node(request)
    data = await api.authorized(request, lambda _: model_entries(node), on="pool")
    return {"object": "list", "data": data}


@get("/models/{model_id:path}", include_in_schema=False)
async def get_model(request: Request, model_id: FromPath[str]) -> dict[str, Any]:
    """One model or alias (OpenAI's `models.retrieve`)."""
    node = api._node(request)
    name = model_id.lstrip("/")
    entries = await api.authorized(request, lambda _: model_entries(node), on="pool")
    for found in entries:
        if found["id"] == name:
            return found
    raise NotFound(f"the model {name!r} does not exist here", error_code="MODEL_NOT_FOUND")


# -- completions -------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """How one kind of completion is answered: chat's or legacy text completion's."""

    chat: bool
    model: str
    stream: bool
    include_usage: bool

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def completion_id(self, job_id: str) -> str:
        return f"{'chatcmpl' if self.chat else 'cmpl'}-{job_id}"

    def choice(self, text: str | None, finish_reason: str | None, *, delta: bool) -> dict:
        """One choice (index 0) holding `text`: a message or delta for chat, text otherwise."""
        choice: dict[str, Any] = {"index": 0}
        if not self.chat:
            choice["text"] = text or ""
        elif delta:
            choice["delta"] = {} if text is None else {"content": text}
        else:
            choice["message"] = {"role": "assistant", "content": text, "refusal": None}
        return choice | {"logprobs": None, "finish_reason": finish_reason}


def _check_common(request: Sampling, unsupported: list[str]) -> None:
    if request.n not in (None, 1):
        raise _bad("n", f"n is {request.n}: this node answers with one choice (n=1) per request")
    if unsupported:
        raise _bad(
            unsupported[0],
            f"unsupported parameter{'s' if len(unsupported) > 1 else ''}: "
            f"{', '.join(unsupported)} (this node does not implement "
            f"{'them' if len(unsupported) > 1 else 'it'}; leave "
            f"{'them' if len(unsupported) > 1 else 'it'} out or at the default)",
        )


def _bad(param: str, message: str, code: str = "unsupported_parameter") -> BadRequest:
    error = BadRequest(message, error_code=code.upper())
    error.param = param
    return error


def chat_messages(messages: list[Message]) -> list[ChatMessage]:
    """OpenAI's messages as a job's conversation: text only; `developer` is a system turn."""
    turns = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if message.role in ("tool", "function"):
            raise _bad(f"{where}.role", f"{where}: {message.role} messages are not supported")
        for name in ("tool_calls", "function_call", "audio"):
            if getattr(message, name) not in (UNSET, None, []):
                raise _bad(f"{where}.{name}", f"{where}.{name} is not supported")
        content = message.content
        if content is None:
            raise _bad(f"{where}.content", f"{where}.content is required", "invalid_messages")
        if not isinstance(content, str):
            for j, part in enumerate(content):
                if part.type != "text" or part.text is UNSET:
                    raise _bad(
                        f"{where}.content[{j}]",
                        f"{where}.content[{j}] is a {part.type!r} part; only text parts are"
                        " supported",
                    )
            content = "".join(str(part.text) for part in content)
        role = "system" if message.role == "developer" else message.role
        turns.append(ChatMessage(role=role, content=content))
    return turns


@post("/chat/completions", status_code=200, include_in_schema=False)
async def chat_completions(request: Request, data: JSONBody[ChatCompletionRequest]) -> Response:
    """A chat completion (OpenAI's `chat.completions.create`), as a job."""
    _check_common(data, unsupported_parameters(data))
    max_tokens = data.max_completion_tokens or data.max_tokens
    if data.max_completion_tokens and data.max_tokens and data.max_completion_tokens != max_tokens:
        raise _bad("max_tokens", "give max_completion_tokens or max_tokens, not both", "invalid")
    job = SubmitJob(
        messages=chat_messages(data.messages),
        model=data.model,
        params=sampling_params(data, max_tokens),
    )
    return await answer(request, job, _shape(data, chat=True))


@post("/completions", status_code=200, include_in_schema=False)
async def completions(request: Request, data: JSONBody[CompletionRequest]) -> Response:
    """A text completion (OpenAI's legacy `completions.create`), as a job with a prompt."""
    _check_common(data, unsupported_parameters(data))
    prompt = data.prompt if isinstance(data.prompt, str) else data.prompt[0]
    job = SubmitJob(prompt=prompt, model=data.model, params=sampling_params(data, data.max_tokens))
    return await answer(request, job, _shape(data, chat=False))


def _shape(request: Sampling, *, chat: bool) -> Shape:
    return Shape(
        chat=chat,
        model=request.model or "",
        stream=bool(request.stream),
        include_usage=bool(request.stream_options and request.stream_options.include_usage),
    )


async def answer(request: Request, submit: SubmitJob, shape: Shape) -> Response:
    """Submit the job, then answer with its completion, whole or as a stream."""
    node = api._node(request)
    principal, job = await api.authorized(request, lambda p: (p, node.jobs.submit(p, submit)[0]))
    shape = Shape(shape.chat, shape.model or job["model"], shape.stream, shape.include_usage)
    headers = {"X-Aitbc-Job-Id": job["job_id"]}
    if shape.stream:
        events = stream_events(node, principal, job, shape)
        return ServerSentEvent(events, headers={**headers, "Cache-Control": "no-cache"})
    job = await until_ended(request, node, principal, job["job_id"])
    if job["status"] != "completed":
        raise _job_error(job)
    headers["X-Aitbc-Receipt-Id"] = job["receipt_id"] or ""
    return Response(completion(job, shape), headers=headers, media_type=MediaType.JSON)


def completion(job: dict[str, Any], shape: Shape) -> dict[str, Any]:
    """A completed job as OpenAI's completion object."""
    return {
        "id": shape.completion_id(job["job_id"]),
        "object": shape.object,
        "created": _created(job),
        "model": shape.model,
        "system_fingerprint": None,
        "choices": [shape.choice(job["result"], finish_reason(job), delta=False)],
        "usage": job["usage"],
        "aitbc": {"job_id": job["job_id"], "receipt_id": job["receipt_id"]},
    }


def finish_reason(job: dict[str, Any]) -> str:
    """`length` when the job used all the tokens it was allowed, else `stop`."""
    usage = job["usage"] or {}
    return "length" if usage.get("completion_tokens", 0) >= job["params"]["max_tokens"] else "stop"


def _created(job: dict[str, Any]) -> int:
    return int(datetime.fromisoformat(job["created_at"].replace("Z", "+00:00")).timestamp())


def _job_error(job: dict[str, Any]) -> ApiError:
    if job["status"] == "cancelled":
        return Conflict(f"job {job['job_id']} was cancelled", error_code="JOB_CANCELLED")
    if job["status"] in ("pending", "running"):  # the node is shutting down
        return ServiceUnavailable(
            f"the node is stopping; job {job['job_id']} stays queued and ends after its restart",
            error_code="SHUTTING_DOWN",
        )
    return ApiError(
        f"job {job['job_id']} failed: {job['error'] or 'no reason given'}",
        error_code=job["error_code"] or "JOB_FAILED",
    )


async def _client_gone(request: Request) -> None:
    """Return once the client has closed its connection (the body has been read already, so
    the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _cancel_soon(node: Node, principal: Principal, job_id: str) -> None:
    """Cancel the job of a client that went away, without waiting (this may run inside a
    cancelled task, where nothing can be awaited)."""

    def cancel() -> None:
        try:
            node.jobs.cancel(principal, job_id)
            log.info("job %s cancelled: its OpenAI client went away", job_id)
        except ApiError:
            pass  # it ended meanwhile

    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # a stream finalised outside the event loop: cancel right here
        cancel()
        return
    future = loop.run_in_executor(api.store_pool(), cancel)
    future.add_done_callback(lambda f: f.exception() and log.error("cancel: %s", f.exception()))


async def until_ended(
    request: Request, node: Node, principal: Principal, job_id: str
) -> dict[str, Any]:
    """The job once it has ended; its job is cancelled if the client goes away first."""
    gone = asyncio.ensure_future(_client_gone(request))
    try:
        while True:
            wait = asyncio.ensure_future(
                node.signals.waiters.until(
                    lambda: api.ended_job(node, job_id), (ended_key(job_id),), WAIT_SLICE_SECONDS
                )
            )
            await asyncio.wait({wait, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not wait.done():
                wait.cancel()
                _cancel_soon(node, principal, job_id)
                # Nobody is left to read the answer; this only ends the handler.
                raise Conflict(f"job {job_id} was cancelled", error_code="CLIENT_GONE")
            job = wait.result()
            if job is not None:
                return job
            if node.signals.waiters.closed:
                return await api.in_thread(node.jobs.peek, job_id)
    finally:
        gone.cancel()


async def stream_events(
    node: Node, principal: Principal, job: dict[str, Any], shape: Shape
) -> AsyncIterator[ServerSentEventMessage]:
    """The job's text as OpenAI's stream chunks, then its usage (when asked) and `[DONE]`."""
    job_id = job["job_id"]
    head = {
        "id": shape.completion_id(job_id),
        "object": f"{shape.object}.chunk" if shape.chat else shape.object,
        "created": _created(job),
        "model": shape.model,
        "system_fingerprint": None,
    }

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> ServerSentEventMessage:
        if shape.include_usage:
            extra.setdefault("usage", None)
        body = {**head, "choices": choices, **extra}
        return ServerSentEventMessage(data=json.dumps(body, separators=(",", ":")))

    ended = False
    try:
        if shape.chat:  # OpenAI's first chunk names the role, before any text
            yield chunk([shape.choice(None, None, delta=True) | {"delta": {"role": "assistant"}}])
        async for kind, value in api.follow_job(node, job_id):
            if kind == "text":
                yield chunk([shape.choice(value, None, delta=True)])
            elif kind == "idle":
                yield api.KEEP_ALIVE
            else:
                ended = True
                if value["status"] != "completed":
                    error = api_error(_job_error(value))
                    yield ServerSentEventMessage(data=json.dumps(error.content))
                    return
                ids = {"aitbc": {"job_id": job_id, "receipt_id": value["receipt_id"]}}
                yield chunk([shape.choice(None, finish_reason(value), delta=True)], **ids)
                if shape.include_usage:
                    yield chunk([], usage=value["usage"], **ids)
                yield ServerSentEventMessage(data="[DONE]")
    finally:
        # The client went away before the end (unless it is the node that is stopping).
        if not ended and not node.signals.waiters.closed:
            _cancel_soon(node, principal, job_id)


def openai_router(path: str) -> Router:
    """The OpenAI-compatible routes under `path`, answering errors in OpenAI's shape."""
    return Router(
        path=path,
        route_handlers=[list_models, get_model, chat_completions, completions],
        exception_handlers={
            ApiError: handle_api_error,
            HTTPException: handle_http_exception,
            Exception: handle_unexpected,
        },
        include_in_schema=False,
    )
