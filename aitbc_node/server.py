"""Running the node's HTTP server (uvicorn) in the foreground, with a clean shutdown.

The listening socket is bound before the models load, so a busy port is reported at once.
SIGINT and SIGTERM make uvicorn finish in-flight requests; then the node stops its miner (the
job in hand goes back to the queue) and closes the store, and the process exits 0. The signal
handlers are ours rather than uvicorn's: uvicorn re-raises the signal after its shutdown, which
would kill the process before the node's own shutdown ran.

HTTP/1.1 is parsed by httptools (llhttp) on uvloop: per request about half the CPU of h11 on
asyncio's own loop. Slow or idle clients cannot hold the node (`GuardedHttpToolsProtocol`): a
connection must send its request head (at most 16 KiB) within `--header-timeout` seconds, an
idle kept-alive one is closed after `--keep-alive-timeout`, and past `--max-connections` open
connections a new one is answered 503 `TOO_MANY_CONNECTIONS` and closed. The open-file limit is
raised to its hard limit at start, and the connection bound kept below it, so a flood of
sockets never starves the store of files.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import resource
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from aitbc_node.api import create_app
from aitbc_node.config import ConnectionLimits
from aitbc_node.hotpath import HotRoutes
from aitbc_node.node import Node, NodeSettings
from aitbc_node.requestlog import RequestLog

log = logging.getLogger("aitbc_node.server")


class PortInUse(Exception):
    """The address to listen on is taken."""


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0 picks a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY on accepted connections only when the
    # listening socket says TCP; without it every response waits ~40 ms on delayed ACKs.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise PortInUse(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server, with the signal handling left to `run`."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


# Files the node needs besides its connections: the store's connections (three files each,
# one per thread), the model files, the log, the lock.
FD_RESERVE = 256


def raise_fd_limit() -> int:
    """Raise this process's open-file soft limit to the hard limit; return the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _raw_response(status: int, reason: str, error_code: str, detail: str, **headers: str) -> bytes:
    """A complete HTTP/1.1 response in the API's error shape, closing the connection; for
    answers written before (or without) a request being parsed."""
    body = json.dumps({"detail": detail, "error_code": error_code}).encode()
    lines = [
        f"HTTP/1.1 {status} {reason}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
        *(f"{name.replace('_', '-')}: {value}" for name, value in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a request-head timeout, a bound on the head's size
    and a bound on open connections.

    uvicorn arms its keep-alive timer only after a response, so on its own a connection that
    never finishes its first request head (slowloris), or never sends anything, stays open
    for ever. Here a timer runs from the moment a request head is awaited (on connect, on
    the first byte of each later request, and at the end of a body answered before it had
    come) until the whole head has come; when it fires the connection is closed (with a 408
    when part of a head came). A head over `MAX_HEAD_BYTES` is answered 400, as is one the
    parser cannot read (in the API's error shape). A connection beyond `max_connections` is
    answered 503 `TOO_MANY_CONNECTIONS` and closed.

    The timer is a deadline and one timer handle: a head that ends only clears the deadline,
    and a later head sets a new one, so a busy connection neither makes nor cancels a timer
    per request (each a call into the loop); the handle, when it fires, times the head out or
    waits on for the deadline now set.
    """

    header_timeout: ClassVar[float] = ConnectionLimits.header_timeout
    max_connections: ClassVar[int] = ConnectionLimits.max_connections
    LINGER_SECONDS: ClassVar[float] = 1.0
    MAX_HEAD_BYTES: ClassVar[int] = 16 * 1024
    _last_refusal_warning: ClassVar[float] = 0.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_deadline: float | None = None  # loop time a head awaited must be whole by
        self._head_bytes = 0
        self._refused = False
        # No request head is being read or served: the next bytes begin one.
        self._between_requests = True
        self._request_read = self._response_sent = False

    @classmethod
    def with_limits(cls, limits: ConnectionLimits, max_connections: int) -> type[HttpToolsProtocol]:
        """This protocol with `limits` (uvicorn builds one instance per connection)."""
        attrs = {"header_timeout": limits.header_timeout, "max_connections": max_connections}
        return type(cls.__name__, (cls,), attrs)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self._refused = True
            now = time.monotonic()
            if now - GuardedHttpToolsProtocol._last_refusal_warning > 10:
                GuardedHttpToolsProtocol._last_refusal_warning = now
                log.warning(
                    "refusing connections: %d open, the bound is %d (--max-connections)",
                    len(self.connections) - 1,
                    self.max_connections,
                )
        self._start_head_clock()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            self._refuse()
            return
        if self._between_requests:
            if self._head_deadline is None:
                self._head_bytes = 0
                self._start_head_clock()
            self._head_bytes += len(data)
        super().data_received(data)
        # Still no whole head after this many bytes (a body that came with its head counts
        # only if the head itself never ended).
        too_long = self._between_requests and self._head_bytes > self.MAX_HEAD_BYTES
        if too_long and not self.transport.is_closing():
            self.send_400_response("Request head too large.")

    def on_headers_complete(self) -> None:
        self._between_requests = False
        self._request_read = self._response_sent = False
        # The head is whole: its deadline and its count end (the bytes counted may include
        # some of the body that came with it; they are no later head's).
        self._head_deadline = None
        self._head_bytes = 0
        super().on_headers_complete()

    # The next bytes begin a new head only once the request's body has been read to its end
    # (an early answer, a 413 say, can come before that) and its response has gone.
    def on_message_complete(self) -> None:
        self._request_read = True
        self._between_requests = self._response_sent
        if self._between_requests:
            # The answer went first, and arms uvicorn's keep-alive timer, but the body's bytes
            # stopped it: the next head's clock starts here (it may be in these same bytes).
            self._start_head_clock()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        self._response_sent = True
        self._between_requests = self._request_read
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request the parser cannot read (or a head over 16 KiB), in
        the API's error shape rather than plain text."""
        self._disarm_head_timer()
        self.transport.write(
            _raw_response(
                400,
                "Bad Request",
                "INVALID_REQUEST",
                f"{msg.rstrip('.')}: not a valid HTTP/1.1 request head",
            )
        )
        self.transport.close()

    def _start_head_clock(self) -> None:
        """A head is awaited from now: it must be whole within `header_timeout`."""
        self._head_deadline = self.loop.time() + self.header_timeout
        if self._head_timer is None:
            self._head_timer = self.loop.call_at(self._head_deadline, self._head_clock_rang)

    def _disarm_head_timer(self) -> None:
        self._head_deadline = None
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_clock_rang(self) -> None:
        self._head_timer = None
        deadline = self._head_deadline
        if deadline is None:  # the head came; the next one starts the clock again
            return
        if self.loop.time() < deadline:  # a later head's deadline: wait for it
            self._head_timer = self.loop.call_at(deadline, self._head_clock_rang)
            return
        self._head_deadline = None
        if self.transport.is_closing() or not (self._refused or self._between_requests):
            return
        if self._head_bytes and not self._refused:
            self.transport.write(_TIMED_OUT)
        self.transport.close()

    def _refuse(self) -> None:
        """Answer 503 once, then read and drop what the client still sends for a moment:
        closing with unread data would reset the connection and lose the answer."""
        if self._head_bytes:
            return
        self._head_bytes = 1
        self.transport.write(_TOO_MANY)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._disarm_head_timer()
        self._head_timer = self.loop.call_later(self.LINGER_SECONDS, self.transport.close)


_TIMED_OUT = _raw_response(
    408,
    "Request Timeout",
    "REQUEST_TIMEOUT",
    "the request head did not arrive in time (--header-timeout)",
)
_TOO_MANY = _raw_response(
    503,
    "Service Unavailable",
    "TOO_MANY_CONNECTIONS",
    "the node has too many open connections; try again shortly",
    retry_after="1",
)


def run(
    settings: NodeSettings,
    sock: socket.socket,
    on_ready: Callable[[Node], None],
    limits: ConnectionLimits | None = None,
) -> None:
    """Open a node with `settings`, serve it on `sock` until SIGINT or SIGTERM, stop it cleanly.

    The handlers go in before the node opens, so a signal that arrives while the store opens
    or the models load still ends in the same clean shutdown.
    """
    limits = limits or ConnectionLimits()
    max_connections = min(limits.max_connections, max(raise_fd_limit() - FD_RESERVE, 1))
    if max_connections < limits.max_connections:
        log.warning(
            "the open-file limit allows %d connections, not --max-connections %d",
            max_connections,
            limits.max_connections,
        )
    exit_requested: list[int] = []
    server: _Server | None = None
    node: Node | None = None

    def request_exit(signum: int, _frame: object) -> None:
        exit_requested.append(signum)
        if node is not None:
            node.signals.waiters.close()  # long polls and streams answer now
        if server is not None:
            if server.should_exit and signum == signal.SIGINT:
                server.force_exit = True  # a second Ctrl-C drops in-flight requests
            server.should_exit = True

    previous = {s: signal.signal(s, request_exit) for s in (signal.SIGINT, signal.SIGTERM)}
    node = Node(settings)
    try:
        node.start()
        config = uvicorn.Config(
            RequestLog(HotRoutes(create_app(node), node)),
            http=GuardedHttpToolsProtocol.with_limits(limits, max_connections),
            loop="uvloop",
            timeout_keep_alive=limits.keep_alive_timeout,
            # Logging is set up once, by `logs.setup`: uvicorn's records go through it.
            log_config=None,
            log_level=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=10,
            server_header=False,
            # X-Forwarded-For (and -Proto) is believed only from `--trust-proxy` peers.
            # uvicorn's own default trusts 127.0.0.1 (or $FORWARDED_ALLOW_IPS), which would
            # let any local client pick its address for the public rate limit.
            proxy_headers=bool(settings.trusted_proxies),
            forwarded_allow_ips=list(settings.trusted_proxies),
        )
        server = _Server(config)
        server.should_exit = bool(exit_requested)
        on_ready(node)
        sys.stdout.flush()
        server.run(sockets=[sock])
    finally:
        node.stop()
        sock.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
