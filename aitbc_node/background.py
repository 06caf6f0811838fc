"""Supervised background work: daemon threads that log what fails, back off, and come back.

`Supervised` runs one function in a daemon thread. If the function ever ends before `stop()`
(it raised, or returned), the thread logs why, reports itself `stopped` with that reason, and
runs the function again after a backoff that doubles up to a cap. `Loop` is the common case on
top of it (the lease reaper, the block sealer): a step called again and again, where a step
that raises is logged and retried after a doubling backoff of its own, so one bad pass neither
ends the loop nor spins it. Both report their state for `/api/health`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from aitbc_node.clock import now_ms, rfc3339
from aitbc_node.errors import StorageFull

log = logging.getLogger("aitbc_node.background")

FIRST_BACKOFF_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 30.0
# A body that ran this long before it ended was healthy: its next restart waits the least.
HEALTHY_RUN_SECONDS = 60.0
MAX_REASON_CHARS = 500


def describe(exc: BaseException) -> str:
    """`Type: message`, short enough for a health report or a job's error."""
    return f"{type(exc).__name__}: {exc}"[:MAX_REASON_CHARS]


def log_failure(what: str, exc: BaseException, retry_in: float) -> None:
    """Log a failed pass: a full disk is the operator's to fix (one line); anything else is a
    bug worth its traceback."""
    if isinstance(exc, StorageFull):
        log.warning("%s: %s; retrying in %.1f s", what, exc.detail, retry_in)
    else:
        log.error("%s failed; retrying in %.1f s", what, retry_in, exc_info=exc)


class Backoff:
    """Delays that double from `first` up to `cap`; `reset()` after a success."""

    def __init__(self, first: float = FIRST_BACKOFF_SECONDS, cap: float = MAX_BACKOFF_SECONDS):
        self.first = first
        self.cap = max(cap, first)
        self._next = first

    def next(self) -> float:
        """The delay to wait now; the one after it is twice as long (up to the cap)."""
        delay = self._next
        self._next = min(self._next * 2, self.cap)
        return delay

    def reset(self) -> None:
        """Back to the shortest delay."""
        self._next = self.first


class Supervised:
    """A daemon thread running `body`, restarted with backoff whenever `body` ends before
    `stop()`. `stop_event` is shared with `body`, which should return once it is set."""

    def __init__(
        self,
        name: str,
        body: Callable[[], None],
        *,
        stop_event: threading.Event | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        self.name = name
        self.stop_event = stop_event or threading.Event()
        self.restarts = 0
        self.last_error: str | None = None
        self.last_error_ms: int | None = None
        self._body = body
        self._backoff = backoff or Backoff()
        self._in_body = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._supervise, name=self.name, daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Tell `body` to end and wait for the thread (up to `timeout` seconds)."""
        self.stop_event.set()
        self.join(timeout)

    def join(self, timeout: float | None = None) -> None:
        """Wait for the thread to end (it ends only after `stop()`)."""
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        """Whether `body` is running now (not stopped, not waiting to be restarted)."""
        return self._in_body and self._thread is not None and self._thread.is_alive()

    def note_error(self, reason: str) -> None:
        """Remember the latest failure, for the health report."""
        self.last_error = reason
        self.last_error_ms = now_ms()

    def status(self) -> dict[str, Any]:
        """`state` (`running` or `stopped`), with `reason` when stopped, the latest error and
        how often the thread was restarted."""
        out: dict[str, Any] = {"state": "running"}
        if not self.running:
            out["state"] = "stopped"
            if self.stop_event.is_set():
                out["reason"] = "stopped with the node"
            elif self._thread is None:
                out["reason"] = "not started"
            elif self._thread.is_alive():
                out["reason"] = f"{self.last_error}; restarting"
            else:
                out["reason"] = f"its thread ended: {self.last_error}"
        out["last_error"] = self.last_error
        out["last_error_at"] = rfc3339(self.last_error_ms)
        out["restarts"] = self.restarts
        return out

    def _supervise(self) -> None:
        while not self.stop_event.is_set():
            started = time.monotonic()
            error: BaseException | None = None
            self._in_body = True
            try:
                self._body()
            # Whatever ended the body, the thread survives it to start the body again.
            except BaseException as e:
                error = e
            if self.stop_event.is_set():
                self._in_body = False
                return
            reason = describe(error) if error is not None else "its loop returned"
            self.note_error(reason)  # before it shows as stopped, so the reason is there
            self._in_body = False
            log.critical("%s stopped: %s", self.name, reason, exc_info=error)
            if time.monotonic() - started >= HEALTHY_RUN_SECONDS:
                self._backoff.reset()
            delay = self._backoff.next()
            log.warning("%s: restarting in %.1f s", self.name, delay)
            if self.stop_event.wait(delay):
                return
            self.restarts += 1


class Loop:
    """Calls `step()` again and again in a supervised thread; `step` returns how many seconds
    to sleep before the next call. A step that raises is logged and retried after a backoff
    that starts at `retry_seconds` and doubles (up to `max_retry_seconds`) while it keeps
    failing."""

    def __init__(
        self,
        name: str,
        step: Callable[[], float],
        retry_seconds: float = 1.0,
        max_retry_seconds: float = MAX_BACKOFF_SECONDS,
    ) -> None:
        self.name = name
        self.failures = 0  # consecutive failed steps
        self._step = step
        self._retry = Backoff(retry_seconds, max_retry_seconds)
        self._stop = threading.Event()
        self.supervisor = Supervised(name, self._run, stop_event=self._stop)

    def start(self) -> None:
        """Start the loop's thread."""
        self.supervisor.start()

    def stop(self) -> None:
        """Stop after the step in progress, if any."""
        self.supervisor.stop()

    def status(self) -> dict[str, Any]:
        """The supervisor's report; `retrying` while steps keep failing."""
        out = self.supervisor.status()
        if out["state"] == "running" and self.failures:
            out["state"] = "retrying"
        out["failures"] = self.failures
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                pause = self._step()
            except Exception as e:
                self.failures += 1
                self.supervisor.note_error(describe(e))
                pause = self._retry.next()
                log_failure(f"{self.name}: a pass", e, pause)
            else:
                if self.failures:
                    log.warning("%s: working again after %d failures", self.name, self.failures)
                    self.failures = 0
                    self._retry.reset()
            self._stop.wait(pause)
