"""A daemon thread that repeats one step until stopped (the lease reaper, the block sealer)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger("aitbc_node.background")


class Loop:
    """Calls `step()` again and again; `step` returns how many seconds to sleep before the
    next call. A step that raises is logged and retried after `retry_seconds`."""

    def __init__(self, name: str, step: Callable[[], float], retry_seconds: float = 1.0) -> None:
        self.name = name
        self._step = step
        self._retry_seconds = retry_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop after the step in progress, if any."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                pause = self._step()
            except Exception:
                log.exception("%s: a pass failed", self.name)
                pause = self._retry_seconds
            self._stop.wait(pause)
