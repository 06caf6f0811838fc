"""The webhook dispatcher: sends the outbox's due deliveries, retrying with backoff.

A scheduler thread claims due deliveries (pushing each one's next attempt past the request
timeout, so a crash mid-request means a retry, never a loss) and hands them to a few sender
threads. A slow or silent receiver ties up one sender for at most the timeout; it never
touches the API or the miner. Failures retry after `base * 2^(attempt-1)` seconds, +-20%
jitter, up to `max_attempts`; then the delivery is `failed`. Every attempt is logged.

Each send checks the destination again (`destinations.py`: the operator may have changed the
allow-list, a name may now resolve elsewhere) and connects to the very address that passed,
with the URL's host in `Host` and, for https, as the TLS server name, so the certificate is
checked against the real name. Redirects are never followed: a 3xx is a failed attempt, retried
like any other. The delivery log that webhook owners read says only "connection failed" for any
network error and "destination not allowed" for a refused one (the node's own log has the
detail), so it cannot be used to map which ports or hosts answer. HTTP goes through httpx.
"""

from __future__ import annotations

import logging
import queue
import random
import ssl
import threading
import time
from dataclasses import dataclass
from functools import cache

import httpx

from aitbc_node import __version__
from aitbc_node.background import Backoff, Supervised, describe, log_failure
from aitbc_node.clock import now_ms
from aitbc_node.destinations import Destination, NotAllowed
from aitbc_node.metrics import Metrics
from aitbc_node.store import Row, Store
from aitbc_node.webhooks import Webhooks, sign

log = logging.getLogger("aitbc_node.delivery")

MAX_BACKOFF_SECONDS = 3600.0
# What the delivery log says for an attempt that got no answer: the same text for a refused
# connection, a timeout or an unreachable host, so owners cannot scan a network with webhooks.
CONNECTION_FAILED = "connection failed"
DESTINATION_NOT_ALLOWED = "destination not allowed"


@cache
def _tls_context() -> ssl.SSLContext:
    """One verifying TLS context for every send (loading the CA bundle once)."""
    return httpx.create_ssl_context()


def send(
    url: str, destination: Destination, body: bytes, headers: dict[str, str], timeout: float
) -> int:
    """POST `body` to `url` at the checked `destination.address`; the answer's status code.

    Never follows a redirect. Raises httpx.HTTPError (or InvalidURL) when there is no answer.
    """
    target = httpx.URL(url)
    pinned = target.copy_with(host=str(destination.address))
    # TLS checks the certificate against the name the URL gave (SNI), not the address dialled.
    extensions = {"sni_hostname": destination.host} if target.scheme == "https" else {}
    # A fresh client without keep-alive: a pooled connection is keyed by the address alone and
    # could carry one name's verified TLS session into another name's request.
    with (
        httpx.Client(
            timeout=timeout, follow_redirects=False, trust_env=False, verify=_tls_context()
        ) as client,
        client.stream(
            "POST",
            pinned,
            content=body,
            headers={**headers, "Host": target.netloc.decode("ascii")},
            extensions=extensions,
        ) as response,
    ):
        return response.status_code


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

    def __init__(
        self,
        store: Store,
        webhooks: Webhooks,
        policy: RetryPolicy,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.policy = policy
        self.metrics = metrics if metrics is not None else Metrics()
        self._wake = threading.Condition()
        self._woken = False
        self._stop = threading.Event()
        self._free = threading.Semaphore(policy.senders)
        self._queue: queue.SimpleQueue[Row] = queue.SimpleQueue()
        self.failures = 0  # scheduler passes in a row that failed
        self._backoff = Backoff()
        # Daemon threads, not a ThreadPoolExecutor: the process must not wait at exit for a
        # receiver that never answers. A request cut off that way keeps its lease in the
        # outbox and is sent again after the restart (receivers drop repeats by event id).
        # Supervised: a thread that dies of an error is started again after a backoff.
        self._scheduler = Supervised("webhook-dispatcher", self._run, stop_event=self._stop)
        self._senders = [
            Supervised(f"webhook-sender-{i}", self._sender, stop_event=self._stop)
            for i in range(policy.senders)
        ]
        webhooks.on_enqueued = self.wake
        self.destinations = webhooks.destinations  # checked again before every send

    def start(self) -> None:
        """Start the scheduler and the sender threads."""
        self._scheduler.start()
        for sender in self._senders:
            sender.start()

    def status(self) -> dict:
        """The scheduler's supervision report (`retrying` while its passes fail), with how
        many sender threads are up."""
        out = self._scheduler.status()
        if out["state"] == "running" and self.failures:
            out["state"] = "retrying"
        out["failures"] = self.failures
        out["senders_running"] = sum(1 for s in self._senders if s.running)
        return out

    def stop(self) -> None:
        """Stop claiming and recording; requests in flight are abandoned, not awaited."""
        self._stop.set()
        self.wake()
        self._scheduler.join()

    def wake(self) -> None:
        with self._wake:
            self._woken = True
            self._wake.notify()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                claimed = self._claim_due()
                for row in claimed:
                    self._queue.put(row)
                wait = 0.0 if claimed else self._seconds_to_next_due()
            except Exception as e:
                # A full disk (or a bug): back off, longer each time, rather than spin.
                self.failures += 1
                delay = self._backoff.next()
                self._scheduler.note_error(describe(e))
                log_failure("webhook dispatcher: claiming deliveries", e, delay)
                self._stop.wait(delay)
                continue
            if self.failures:
                log.warning("webhook dispatcher: working again after %d failures", self.failures)
                self.failures = 0
                self._backoff.reset()
            with self._wake:
                if not self._woken and wait > 0:
                    self._wake.wait(wait)
                self._woken = False

    def _claim_due(self) -> list[Row]:
        """Due deliveries, as many as there are free senders, leased past the timeout."""
        claimed: list[Row] = []
        while self._free.acquire(blocking=False):
            now = now_ms()
            lease = now + int((self.policy.timeout_seconds + 5) * 1000)
            try:
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
            except Exception:
                # The sender slot taken for this claim is free again (a full disk must not
                # use up the senders one failed claim at a time); what was claimed goes out.
                self._free.release()
                if claimed:
                    break
                raise
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
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"aitbc-node/{__version__}",
            "AITBC-Event": row["event"],
            "AITBC-Event-Id": row["event_id"],
            "AITBC-Signature": sign(row["secret"], int(time.time()), body),
        }
        started = now_ms()
        clock = time.monotonic()
        status: int | None = None
        error: str | None = None
        try:
            destination = self.destinations.check_url(row["url"])
            assert destination is not None  # resolve=True always gives one
            status = send(row["url"], destination, body, headers, self.policy.timeout_seconds)
        except NotAllowed as e:
            log.warning("webhook %s not sent: %s", row["event_id"], e)
            error = DESTINATION_NOT_ALLOWED
        except (httpx.HTTPError, httpx.InvalidURL, OSError, ValueError) as e:
            # The detail is for the operator's log only (see CONNECTION_FAILED).
            log.info("webhook %s: %s: %s", row["event_id"], type(e).__name__, e)
            error = CONNECTION_FAILED
        return status, error, started, int((time.monotonic() - clock) * 1000)

    def _record(
        self, row: Row, status: int | None, error: str | None, started: int, duration: int
    ) -> None:
        attempt = row["attempts"] + 1
        # Only a 2xx delivers: a 3xx is not followed (it could point anywhere), so it fails.
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
        self.metrics.webhook_attempt(delivered=delivered, final=state == "failed")
        if not delivered:
            log.info(
                "webhook %s attempt %d: %s", row["event_id"], attempt, error or f"HTTP {status}"
            )
