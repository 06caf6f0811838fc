"""Running the node's HTTP server (uvicorn) in the foreground, with a clean shutdown.

The listening socket is bound before the models load, so a busy port is reported at once.
SIGINT and SIGTERM make uvicorn finish in-flight requests; then the node stops its miner (the
job in hand goes back to the queue) and closes the store, and the process exits 0. The signal
handlers are ours rather than uvicorn's: uvicorn re-raises the signal after its shutdown, which
would kill the process before the node's own shutdown ran.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import sys
from collections.abc import Callable, Iterator

import uvicorn

from aitbc_node.api import create_app
from aitbc_node.node import Node, NodeSettings

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


def run(settings: NodeSettings, sock: socket.socket, on_ready: Callable[[Node], None]) -> None:
    """Open a node with `settings`, serve it on `sock` until SIGINT or SIGTERM, stop it cleanly.

    The handlers go in before the node opens, so a signal that arrives while the store opens
    or the models load still ends in the same clean shutdown.
    """
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
            create_app(node),
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=10,
            server_header=False,
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
