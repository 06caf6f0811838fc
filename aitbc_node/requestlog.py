"""Request ids, the access log and the last line of defence against unlogged 500s (ASGI).

`RequestLog` wraps the whole application, outside Litestar's own routing and error handling,
so that every response, a 404 or a CORS preflight included, carries `X-Request-Id`:

- a client's own `X-Request-Id` is kept when it is sane (1-64 letters, digits, `-`, `_`, `.`,
  `:`), so a request can be followed across services; otherwise the node makes one;
- while the request is served the id is in `logs.REQUEST_ID`, so every log line it causes
  (the traceback of a 500 above all) names it;
- an exception that escapes the application is logged with its traceback and, when no
  response has started, answered with the API's 500 shape; nothing reaches uvicorn unlogged;
- with `--access-log`, one line per request: method, path, status, duration and the id.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from aitbc_node.logs import ACCESS_LOGGER, REQUEST_ID

log = logging.getLogger("aitbc_node.requests")
access_log = logging.getLogger(ACCESS_LOGGER)

HEADER = b"x-request-id"
_SANE_ID = re.compile(rb"[A-Za-z0-9._:-]{1,64}")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


# Ids are this process's random prefix and a counter: unique within the process, apart across
# restarts and nodes, and with no call to the OS's random source on every request.
_ID_PREFIX = secrets.token_hex(4)
_id_counter = itertools.count()


def new_request_id() -> str:
    """A fresh id: 16 hex characters, unique enough to grep a log for."""
    return f"{_ID_PREFIX}{next(_id_counter) & 0xFFFFFFFF:08x}"


def request_id_for(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's `X-Request-Id` when it is sane, else a new one."""
    for name, value in headers:
        if name.lower() == HEADER and _SANE_ID.fullmatch(value):
            return value.decode()
    return new_request_id()


class RequestLog:
    """ASGI middleware: request ids on every response, the access log, no silent 500s."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_for(scope.get("headers", []))
        token = REQUEST_ID.set(request_id)
        started = time.perf_counter()
        status: list[int] = []

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != HEADER]
                headers.append((HEADER, request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if not status:
                await _send_500(send_with_id)
            else:
                status.append(500)  # the response was cut short; the access log says so
        finally:
            if access_log.isEnabledFor(logging.INFO):
                _log_access(scope, status[-1] if status else 0, started)
            REQUEST_ID.reset(token)


async def _send_500(send: Send) -> None:
    body = json.dumps({"detail": "internal server error", "error_code": "INTERNAL_ERROR"})
    await send(
        {
            "type": "http.response.start",
            "status": 500,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body.encode()})


def _log_access(scope: Scope, status: int, started: float) -> None:
    duration_ms = round((time.perf_counter() - started) * 1000, 1)
    client = scope.get("client")
    fields = {
        "method": scope.get("method"),
        "path": scope.get("path"),
        "status": status,
        "duration_ms": duration_ms,
        "client": client[0] if client else None,
    }
    access_log.info(
        "%s %s %s %.1fms client=%s",
        fields["method"],
        fields["path"],
        status,
        duration_ms,
        fields["client"],
        extra=fields,
    )
