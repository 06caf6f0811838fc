"""The webhook dispatcher: sends the outbox's due deliveries, retrying with backoff.

A scheduler thread claims due deliveries (pushing each one's next attempt past the request
timeout, so a crash mid-request means a retry, never a loss) and hands them to a few sender
threads. A slow or silent receiver ties up one sender for at most the timeout; it never
touches the API or the miner. Failures retry after `base * 2^(attempt-1)` seconds, +-20%
jitter, up to `max_attempts`; then the delivery is `failed`. Every attempt is logged.

HTTP goes through the standard library's urllib, so the node's server needs no HTTP client
library of its own.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from aitbc_node import __version__
from aitbc_node.clock import now_ms
from aitbc_node.store import Row, Store
from aitbc_node.webhooks import Webhooks, sign

log = logging.getLogger("aitbc_node.delivery")

MAX_BACKOFF_SECONDS = 3600.0


@dataclass
class RetryPolicy:
    """How deliveries are retried."""

    base_seconds: float = 2.0
    max_attempts: int = 8
    timeout_seconds: float = 5.0
    senders: int = 4

    def delay(self, attempts: int) -> float:
        """Seconds before the next try after `attempts` failed ones."""
        delay = min(self.base_seconds * 2 ** (attempts - 1), MAX_BACKOFF_SECONDS)
        return delay * random.uniform(0.8, 1.2)


class Dispatcher:
    """Delivers webhook events from the outbox."""

    def __init__(self, store: Store, webhooks: Webhooks, policy: RetryPolicy) -> None:
        self.store = store
        self.policy = policy
        self._wake = threading.Condition()
        self._woken = False
        self._stop = threading.Event()
        self._free = threading.Semaphore(policy.senders)
        self._queue: queue.SimpleQueue[Row] = queue.SimpleQueue()
        # Daemon threads, not a ThreadPoolExecutor: the process must not wait at exit for a
        # receiver that never answers. A request cut off that way keeps its lease in the
        # outbox and is sent again after the restart (receivers drop repeats by event id).
        self._threads = [
            threading.Thread(target=self._run, name="webhook-dispatcher", daemon=True),
            *(
                threading.Thread(target=self._sender, name=f"webhook-sender-{i}", daemon=True)
                for i in range(policy.senders)
            ),
        ]
        webhooks.on_enqueued = self.wake

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop claiming and recording; requests in flight are abandoned, not awaited."""
        self._stop.set()
        self.wake()
        if self._threads[0].is_alive():
            self._threads[0].join()

    def wake(self) -> None:
        with self._wake:
            self._woken = True
            self._wake.notify()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                claimed = self._claim_due()
            except Exception:
                log.exception("claiming webhook deliveries failed")
                claimed = []
            for row in claimed:
                self._queue.put(row)
            with self._wake:
                if not self._woken and not claimed:
                    self._wake.wait(self._seconds_to_next_due())
                self._woken = False

    def _claim_due(self) -> list[Row]:
        """Due deliveries, as many as there are free senders, leased past the timeout."""
        claimed: list[Row] = []
        while self._free.acquire(blocking=False):
            now = now_ms()
            lease = now + int((self.policy.timeout_seconds + 5) * 1000)
            with self.store.write(durable=False) as db:
                row = db.one(
                    "UPDATE deliveries SET next_attempt_ms = ? WHERE seq = (SELECT seq FROM"
                    " deliveries WHERE state = 'pending' AND next_attempt_ms <= ?"
                    " ORDER BY next_attempt_ms LIMIT 1) RETURNING *",
                    (lease, now),
                )
                if row is not None:
                    hook = db.one(
                        "SELECT url, secret FROM webhooks WHERE webhook_id = ?",
                        (row["webhook_id"],),
                    )
                    assert hook is not None
                    row.update(hook)
            if row is None:
                self._free.release()
                break
            claimed.append(row)
        return claimed

    def _seconds_to_next_due(self) -> float:
        row = self.store.read().one(
            "SELECT min(next_attempt_ms) AS due FROM deliveries WHERE state = 'pending'"
        )
        if row is None or row["due"] is None:
            return 60.0
        return min(max((row["due"] - now_ms()) / 1000, 0.01), 60.0)

    def _sender(self) -> None:
        while True:
            row = self._queue.get()
            try:
                status, error, started, duration = self._post(row)
                if self._stop.is_set():
                    return  # the store is closing; the lease brings it back after restart
                self._record(row, status, error, started, duration)
            except Exception:
                log.exception("webhook delivery %s failed unexpectedly", row["event_id"])
            finally:
                self._free.release()
                self.wake()

    def _post(self, row: Row) -> tuple[int | None, str | None, int, int]:
        body = row["body"].encode()
        request = urllib.request.Request(
            row["url"],
            data=body,
            method="POST",
            headers={
                "Content-Type": "application/json",
                "User-Agent": f"aitbc-node/{__version__}",
                "AITBC-Event": row["event"],
                "AITBC-Event-Id": row["event_id"],
                "AITBC-Signature": sign(row["secret"], int(time.time()), body),
            },
        )
        started = now_ms()
        clock = time.monotonic()
        status: int | None = None
        error: str | None = None
        try:
            with urllib.request.urlopen(request, timeout=self.policy.timeout_seconds) as response:
                status = response.status
                response.read(65536)
        except urllib.error.HTTPError as e:
            status = e.code
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            error = f"{type(reason).__name__}: {reason}"
        return status, error, started, int((time.monotonic() - clock) * 1000)

    def _record(
        self, row: Row, status: int | None, error: str | None, started: int, duration: int
    ) -> None:
        attempt = row["attempts"] + 1
        delivered = status is not None and 200 <= status < 300
        if delivered:
            state, next_ms = "delivered", row["next_attempt_ms"]
        elif attempt >= self.policy.max_attempts:
            state, next_ms = "failed", row["next_attempt_ms"]
        else:
            state, next_ms = "pending", now_ms() + int(self.policy.delay(attempt) * 1000)
        with self.store.write() as db:
            db.execute(
                "INSERT INTO delivery_attempts"
                " (event_id, attempt, started_ms, duration_ms, status_code, error)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (row["event_id"], attempt, started, duration, status, error),
            )
            db.execute(
                "UPDATE deliveries SET state = ?, attempts = ?, next_attempt_ms = ?"
                " WHERE event_id = ? AND state = 'pending'",
                (state, attempt, next_ms, row["event_id"]),
            )
        if not delivered:
            log.info(
                "webhook %s attempt %d: %s", row["event_id"], attempt, error or f"HTTP {status}"
            )
