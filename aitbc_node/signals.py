"""In-process signals between the API, the store's callers and the built-in miner.

The miner waits on a condition for new work instead of polling on a timer, and a cancel reaches
a running generation through an event the miner watches.
"""

from __future__ import annotations

import threading


class Signals:
    """Wake-ups for work that appeared and for jobs that were cancelled."""

    def __init__(self) -> None:
        self._work = threading.Condition()
        self._work_generation = 0
        self._cancel_lock = threading.Lock()
        self._cancel_events: dict[str, threading.Event] = {}

    @property
    def work_generation(self) -> int:
        """A counter that moves on whenever work may have appeared."""
        return self._work_generation

    def work_available(self) -> None:
        """Say that a job became pending (submitted or requeued)."""
        with self._work:
            self._work_generation += 1
            self._work.notify_all()

    def wait_for_work(self, seen_generation: int, timeout: float) -> bool:
        """Wait until work appears after `seen_generation`; False when `timeout` passes first."""
        with self._work:
            return self._work.wait_for(
                lambda: self._work_generation != seen_generation, timeout=timeout
            )

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
        with self._cancel_lock:
            event = self._cancel_events.get(job_id)
        if event is not None:
            event.set()
