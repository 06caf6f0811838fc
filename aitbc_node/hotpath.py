"""A job's two busy requests, answered without Litestar's per-request machinery (ASGI).

Under load nearly every request a node serves is a client's `POST /api/v1/jobs` (submit, most
often with `?wait=`) or a miner's `POST /api/v1/jobs/claim-next`, and a profile of a busy node
put about half of the event loop's time in Litestar's handling around those two handlers
(building the request's header map, its body stream, the handler's keyword arguments, the
response object and its headers), several times the handlers' own work. `HotRoutes` sits
between `RequestLog` and Litestar and answers those two when they come in their plain form:

- `POST` to exactly one of the two paths, a `Content-Length` within the body limit, no
  `Transfer-Encoding`, no `Origin` (CORS stays Litestar's), no `Idempotency-Key` (its checks
  stay Litestar's), and a query of nothing but `wait=SECONDS` (plain digits within the
  bound) for a submit, nothing for claim-next;
- a body that decodes strictly into the route's type (`edge.decode_body`, as `EdgeRequest`
  does).

It then runs the very functions the Litestar handlers run (`api.submit_and_wait`,
`api.claim_next_for`), and answers as Litestar would: the same JSON bytes (msgspec, as
Litestar encodes), `content-type` and `content-length`, an `ApiError` in the API's error shape
with its headers, anything else logged and answered 500, and the same count in /metrics under
the route's template. Every other request goes to Litestar untouched, and a request whose
query or body is not plain goes there with the body it already read handed on, so every
check and error of the API's edge has one implementation, Litestar's and `edge.py`'s.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aitbc_node.api import api_key_from, claim_next_for, submit_and_wait
from aitbc_node.edge import decode_body, encode_body
from aitbc_node.errors import ApiError
from aitbc_node.requestlog import ASGIApp, Message, Receive, Scope, Send
from aitbc_node.schemas import MAX_WAIT_SECONDS, ClaimNext, SubmitJob

if TYPE_CHECKING:
    from aitbc_node.node import Node

log = logging.getLogger("aitbc_node.api")

SUBMIT_PATH = "/api/v1/jobs"
CLAIM_NEXT_PATH = "/api/v1/jobs/claim-next"
# The query a plain submit may carry: `wait=` and a number in plain digits.
_PLAIN_WAIT = re.compile(rb"wait=([0-9]{1,3}(?:\.[0-9]{1,6})?)")
# The request headers this layer reads; the first of each counts, as in Litestar's `Headers`.
_READ = frozenset(
    (
        b"content-length",
        b"transfer-encoding",
        b"origin",
        b"idempotency-key",
        b"x-api-key",
        b"authorization",
    )
)
_JSON_HEADERS = (b"content-type", b"application/json")


class HotRoutes:
    """ASGI middleware: submit and claim-next in their plain form, everything else to `app`."""

    def __init__(self, app: ASGIApp, node: Node) -> None:
        self.app = app
        self.node = node
        self.max_body_bytes = node.limits.max_body_bytes
        self.count_response = node.metrics.http_response

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path")
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or (path != SUBMIT_PATH and path != CLAIM_NEXT_PATH)
        ):
            await self.app(scope, receive, send)
            return
        headers = _headers_read(scope["headers"])
        query = scope["query_string"]
        wait = _plain_wait(query) if path == SUBMIT_PATH else _no_query(query)
        length = headers.get(b"content-length")
        if (
            wait is None
            or length is None
            or not length.isdigit()
            or int(length) > self.max_body_bytes
            or b"transfer-encoding" in headers
            or b"origin" in headers
            or b"idempotency-key" in headers
        ):
            await self.app(scope, receive, send)
            return
        messages, body = await _read_body(receive)
        try:
            data = decode_body(body or b"null", SubmitJob if path == SUBMIT_PATH else ClaimNext)
        except ApiError:  # Litestar answers it, through the same decoder
            data = None
        if body is None or data is None:
            await self.app(scope, _replay(messages, receive), send)
            return
        key = api_key_from(_text(headers.get(b"x-api-key")), _text(headers.get(b"authorization")))
        status, extra, answer = 200, (), None
        try:
            if isinstance(data, SubmitJob):
                answer, status = await submit_and_wait(self.node, key, data, None, wait)
            else:
                answer = await claim_next_for(self.node, key, data)
        except Exception as e:
            if isinstance(e, ApiError):
                error = e
            else:  # as Litestar's handler for the unexpected: logged, answered 500
                log.exception("unhandled error")
                error = ApiError("internal server error")
            status, answer = error.status, {"detail": error.detail, "error_code": error.error_code}
            extra = tuple(
                (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in error.headers.items()
            )
        encoded = encode_body(answer)
        self.count_response("POST", path, status)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    *extra,
                    _JSON_HEADERS,
                    (b"content-length", str(len(encoded)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": encoded, "more_body": False})


def _headers_read(raw: list[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    """The first value of each header this layer reads, by its lower-case name."""
    found: dict[bytes, bytes] = {}
    for name, value in raw:
        name = name.lower()
        if name in _READ and name not in found:
            found[name] = value
    return found


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


def _plain_wait(query: bytes) -> float | None:
    """A submit's wait when its query is empty or only a plain `wait=`; None otherwise."""
    if not query:
        return 0.0
    match = _PLAIN_WAIT.fullmatch(query)
    if match is None:
        return None
    wait = float(match[1])
    return wait if wait <= MAX_WAIT_SECONDS else None


def _no_query(query: bytes) -> float | None:
    """0 (no wait in the query: claim-next's is in its body) when the query is empty."""
    return None if query else 0.0


async def _read_body(receive: Receive) -> tuple[list[Message], bytes | None]:
    """The messages received up to the body's end, and the body (None: the client went)."""
    messages: list[Message] = []
    chunks: list[bytes] = []
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages, None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return messages, b"".join(chunks)


def _replay(messages: list[Message], receive: Receive) -> Callable[[], Awaitable[Message]]:
    """A `receive` that gives `messages` again, then what `receive` gives."""
    pending = list(messages)

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed
