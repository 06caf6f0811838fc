"""In-process signals: how one part of the node wakes another without polling.

- The built-in miner (a thread) waits on a condition for new work.
- A running generation watches an event that a cancel sets.
- Long-polling requests and event streams (asyncio tasks) wait on futures that any thread can
  resolve by key: `job:<id>` when a job changes state, `ended:<id>` when it ends (what a
  wait for the result needs: a claim wakes nobody there), `progress:<id>` when it has new text,
  `work` when a job becomes pending (every `available` poll wakes), `work:<model>` when a job
  for that model does (one claim-next waiter wakes per job).
- The text a job has generated so far is kept here, in memory, while the job runs, so a
  stream that joins late first gets everything produced before it came; so is when its
  first text came (for the time-to-first-token metric).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aitbc_node.clock import now_ms

T = TypeVar("T")

WORK = "work"
# First-text times are dropped when a job ends; this bounds them should one never end here
# (the oldest goes first).
MAX_TIMED_JOBS = 10_000


def job_key(job_id: str) -> str:
    return f"job:{job_id}"


def ended_key(job_id: str) -> str:
    """The key notified when a job ends (`job_key` is notified on every change)."""
    return f"ended:{job_id}"


def progress_key(job_id: str) -> str:
    return f"progress:{job_id}"


def model_work_key(model: str) -> str:
    """The key a miner handed work by claim-next waits on: a job for `model` is pending."""
    return f"work:{model}"


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _resolve_all(futures: list[asyncio.Future[None]]) -> None:
    for future in futures:
        _resolve(future)


class Waiters:
    """asyncio futures, grouped by key, that any thread can resolve."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[str, set[asyncio.Future[None]]] = {}
        self.closed = False

    def register(self, *keys: str) -> asyncio.Future[None]:
        """A future resolved by the next `notify` of any of `keys` (call in the event loop)."""
        future = asyncio.get_running_loop().create_future()
        self.add(future, *keys)
        return future

    def add(self, future: asyncio.Future[None], *keys: str) -> None:
        """Have `future` (made in its event loop) resolved by the next `notify` of any of
        `keys`. From any thread: a write can add it for what it creates before its commit,
        so no wake-up for that can come first."""
        with self._lock:
            if not self.closed:
                for key in keys:
                    self._waiting.setdefault(key, set()).add(future)
                return
        self._wake([future])

    def close(self) -> None:
        """Wake every waiter for good (the node is shutting down): long polls answer now,
        and streams end, instead of holding the shutdown up."""
        with self._lock:
            self.closed = True
            futures = {f for waiting in self._waiting.values() for f in waiting}
            self._waiting.clear()
        self._wake(list(futures))

    def unregister(self, future: asyncio.Future[None], *keys: str) -> None:
        with self._lock:
            for key in keys:
                waiting = self._waiting.get(key)
                if waiting is not None:
                    waiting.discard(future)
                    if not waiting:
                        del self._waiting[key]

    def notify(self, key: str, count: int | None = None) -> None:
        """Wake what waits on `key` (from any thread): everything, or at most `count`."""
        with self._lock:
            if count is None:
                futures = list(self._waiting.pop(key, ()))
            else:
                # Only waiters not yet woken (by another of their keys) count.
                waiting = self._waiting.get(key, set())
                futures = []
                while waiting and len(futures) < count:
                    future = waiting.pop()
                    if not future.done():
                        futures.append(future)
                if not waiting:
                    self._waiting.pop(key, None)
        self._wake(futures)

    def notify_prefix(self, prefix: str) -> None:
        """Wake everything waiting on any key that starts with `prefix`."""
        with self._lock:
            keys = [key for key in self._waiting if key.startswith(prefix)]
            futures = [f for key in keys for f in self._waiting.pop(key)]
        self._wake(futures)

    @staticmethod
    def _wake(futures: list[asyncio.Future[None]]) -> None:
        """Resolve `futures` in their event loop: one call per loop, not one per future
        (each call from another thread costs the loop a wake-up)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
        for future in futures:
            by_loop.setdefault(future.get_loop(), []).append(future)
        for loop, batch in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a loop already closed: nobody waits
                loop.call_soon_threadsafe(_resolve_all, batch)

    async def until(
        self,
        check: Callable[[], Awaitable[T | None]],
        keys: tuple[str, ...],
        timeout: float,
        *,
        added: asyncio.Future[None] | None = None,
    ) -> T | None:
        """Await `check()` until it returns something, waking only when `keys` are notified;
        None once `timeout` seconds pass. Registering before each check means no wake-up is
        lost between a check and the wait. `added`: a future already added for `keys` before
        anything they announce could happen, so the first check is not needed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        future = added
        while True:
            checking = future is None
            if future is None:
                future = self.register(*keys)
            try:
                result = await check() if checking else None
                if result is not None:
                    return result
                remaining = deadline - loop.time()
                if remaining <= 0 or self.closed:
                    return None
                try:
                    await asyncio.wait_for(future, remaining)
                except TimeoutError:
                    return None
            finally:
                self.unregister(future, *keys)
            future = None


def _at_once(action: Callable[[], None]) -> None:
    action()


class Signals:
    """Wake-ups for new work, cancels, job changes and generated text.

    `after_commit` (the store's) holds the wake-ups for work, job changes and cancels that a
    write sets off until that write is committed, so what wakes finds the row it is told of.
    """

    def __init__(self, after_commit: Callable[[Callable[[], None]], None] = _at_once) -> None:
        self._after_commit = after_commit
        self.waiters = Waiters()
        self._work = threading.Condition()
        self._work_generation = 0
        self._cancel_lock = threading.Lock()
        self._cancel_events: dict[str, threading.Event] = {}
        self._text_lock = threading.Lock()
        self._text: dict[str, list[str]] = {}
        self._first_text_ms: dict[str, int] = {}

    @property
    def work_generation(self) -> int:
        """A counter that moves on whenever work may have appeared."""
        return self._work_generation

    def work_available(self, model: str | None = None) -> None:
        """Say that a job became pending (submitted or requeued): wake the built-in miner and
        every `available` long poll, and one claim-next waiting for `model` (one can take a
        new job; waking them all would have all but one look for nothing). Without a model
        (requeued jobs, maybe several) every claim-next wakes."""
        self._after_commit(lambda: self._wake_for_work(model))

    def _wake_for_work(self, model: str | None) -> None:
        with self._work:
            self._work_generation += 1
            self._work.notify_all()
        self.waiters.notify(WORK)
        if model is None:
            self.waiters.notify_prefix(model_work_key(""))
        else:
            self.waiters.notify(model_work_key(model), count=1)

    def wait_for_work(self, seen_generation: int, timeout: float) -> bool:
        """Wait until work appears after `seen_generation`; False when `timeout` passes first."""
        with self._work:
            return self._work.wait_for(
                lambda: self._work_generation != seen_generation, timeout=timeout
            )

    def job_changed(self, job_id: str, *, finished: bool = False) -> None:
        """Say that a job changed state; a finished job's kept text is let go."""
        self._after_commit(lambda: self._job_changed(job_id, finished))

    def _job_changed(self, job_id: str, finished: bool) -> None:
        if finished:
            with self._text_lock:
                self._text.pop(job_id, None)
                self._first_text_ms.pop(job_id, None)
            self.waiters.notify(ended_key(job_id))
        self.waiters.notify(job_key(job_id))

    def watch_cancel(self, job_id: str) -> threading.Event:
        """An event that is set when `job_id` is cancelled; call `unwatch_cancel` when done."""
        event = threading.Event()
        with self._cancel_lock:
            self._cancel_events[job_id] = event
        return event

    def unwatch_cancel(self, job_id: str) -> None:
        """Stop watching `job_id` for a cancel."""
        with self._cancel_lock:
            self._cancel_events.pop(job_id, None)

    def job_cancelled(self, job_id: str) -> None:
        """Say that `job_id` was cancelled, stopping its generation if one is running here."""
        self._after_commit(lambda: self._job_cancelled(job_id))

    def _job_cancelled(self, job_id: str) -> None:
        with self._cancel_lock:
            event = self._cancel_events.get(job_id)
        if event is not None:
            event.set()
        self._job_changed(job_id, finished=True)

    def text_generated(self, job_id: str, text: str) -> None:
        """Add text a running job produced (from the built-in miner or a remote one)."""
        with self._text_lock:
            self._text.setdefault(job_id, []).append(text)
            if text and job_id not in self._first_text_ms:
                if len(self._first_text_ms) >= MAX_TIMED_JOBS:
                    del self._first_text_ms[next(iter(self._first_text_ms))]
                self._first_text_ms[job_id] = now_ms()
        self.waiters.notify(progress_key(job_id))

    def first_text_ms(self, job_id: str) -> int | None:
        """When running job `job_id` first produced text (epoch ms); None if it has not."""
        with self._text_lock:
            return self._first_text_ms.get(job_id)

    def text_since(self, job_id: str, offset: int) -> str:
        """The text job `job_id` produced after its first `offset` characters."""
        with self._text_lock:
            pieces = self._text.get(job_id)
            text = "".join(pieces) if pieces else ""
            if pieces and len(pieces) > 1:
                self._text[job_id] = [text]  # join once, not on every read
        return text[offset:]

    def forget_text(self, job_id: str) -> None:
        """Drop the kept text of a job that went back to the queue."""
        with self._text_lock:
            self._text.pop(job_id, None)
            self._first_text_ms.pop(job_id, None)
