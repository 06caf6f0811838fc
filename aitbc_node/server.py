"""Running the node's HTTP server (uvicorn) in the foreground, with a clean shutdown.

The listening socket is bound before the models load, so a busy port is reported at once.
SIGINT and SIGTERM make uvicorn finish in-flight requests; then the node stops its miner (the
job in hand goes back to the queue) and closes the store, and the process exits 0.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
from collections.abc import Callable

import uvicorn

from aitbc_node.api import create_app
from aitbc_node.node import Node

log = logging.getLogger("aitbc_node.server")


class PortInUse(Exception):
    """The address to listen on is taken."""


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0 picks a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise PortInUse(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run(node: Node, sock: socket.socket, on_ready: Callable[[], None]) -> None:
    """Serve `node` on `sock` until SIGINT or SIGTERM, then stop it cleanly."""
    config = uvicorn.Config(
        create_app(node),
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=10,
        server_header=False,
    )
    server = uvicorn.Server(config)
    try:
        node.start()
        # uvicorn re-raises the signal it caught once it has shut down; with these handlers
        # that re-raise is harmless, so the node's own shutdown below always runs.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: None)
        on_ready()
        sys.stdout.flush()
        server.run(sockets=[sock])
    finally:
        node.stop()
        sock.close()
