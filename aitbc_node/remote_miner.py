"""A miner on another box: the miner loop (`miner.MinerLoop`) fed over the node's HTTP API.

`aitbc-node miner --coordinator URL --api-key KEY` registers (its models, its device and its own
Ed25519 public key), takes up to as many jobs as its batch has free sequences with `POST
/v1/jobs/claim-next` (long-polled while idle; the jobs are handed to it alone, so miners never
race for one; a coordinator without it is served through `available` and `claim`), generates
them together while the loop's heartbeat renews their leases and their text is sent as
progress (for streams), then completes each job with the result, the token counts, the model
file's SHA-256 and its co-signature over the result's hash.

It rides out a coordinator restart or a dropped connection: it reconnects with capped backoff,
and re-sends a completion until the node has it (a second completion is refused with 409, so a
job is never completed twice). The first SIGINT/SIGTERM lets the jobs in hand finish, then
exits; a second one cuts them short and hands each back to the queue (`POST
/v1/jobs/{id}/release`), for another miner to run.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from aitbc_node.client import CoordinatorClient, CoordinatorError, CoordinatorUnavailable
from aitbc_node.engine import Engine, Generation
from aitbc_node.miner import HeldJob, MinerLoop, StopNow
from aitbc_node.receipts import hash_result
from aitbc_node.signing import NodeKey

log = logging.getLogger("aitbc_node.remote_miner")

MAX_BACKOFF_SECONDS = 10.0
PROGRESS_INTERVAL_SECONDS = 0.2
# While the batch is busy, how often to ask the node for more jobs for its free sequences.
BUSY_POLL_SECONDS = 0.25


class CoordinatorSource:
    """The job source of a remote miner: a coordinator's HTTP API."""

    def __init__(
        self,
        client: CoordinatorClient,
        miner_id: str,
        key: NodeKey,
        gpu_info: dict[str, Any],
        stopping: threading.Event,
        *,
        wait_seconds: float = 30.0,
    ) -> None:
        self.client = client
        self.miner_id = miner_id
        self.key = key
        self.gpu_info = gpu_info
        self.wait_seconds = wait_seconds
        self._stopping = stopping
        self._models: list[str] = []
        self._failures = 0
        self._offered: list[dict[str, Any]] = []
        self._last_poll = 0.0
        self._claim_next = True  # until a coordinator without `claim-next` says otherwise
        self._taken: list[HeldJob] = []  # handed out by an idle wait, for the next `claim`
        # How many jobs an idle miner takes at once: what its engines hold (set by the miner).
        self.idle_slots = 1
        # Text held back per job until its next report (HeldJob hashes by identity).
        self._pending_text: dict[HeldJob, list[str]] = {}
        self._last_flush: dict[HeldJob, float] = {}

    def register(self, models: list[str]) -> None:
        self._models = models
        while not self._stopping.is_set():
            try:
                self.client.register_miner(
                    self.miner_id, sorted(models), self.gpu_info, self.key.public_key_hex
                )
                log.warning("registered as %s serving %s", self.miner_id, ", ".join(models))
                return
            except CoordinatorError as e:
                if e.status in (401, 403):
                    raise
                self._back_off(e)

    def _back_off(self, error: CoordinatorError) -> None:
        self._failures += 1
        delay = min(0.5 * 2 ** (self._failures - 1), MAX_BACKOFF_SECONDS) * random.uniform(0.8, 1.2)
        log.warning("coordinator: %s; retrying in %.1f s", error.detail, delay)
        self._stopping.wait(delay)

    def _offer(self, wait: float, limit: int) -> list[dict[str, Any]]:
        """Jobs the node offers now (or within `wait` seconds); [] when it cannot be asked."""
        self._last_poll = time.monotonic()
        try:
            offered = self.client.available_jobs(self.miner_id, wait=wait, limit=limit)
        except CoordinatorError as e:
            self._asking_failed(e, wait)
            return []
        self._failures = 0
        return offered

    def _asking_failed(self, error: CoordinatorError, wait: float) -> None:
        """After a request for work failed: back off when idle (busy: the batch goes on and
        asks again later), and register again if the node forgot this miner."""
        if wait:
            self._back_off(error)
        if error.error_code == "MINER_NOT_REGISTERED":
            self.register(self._models)

    def wait_for_work(self, timeout: float) -> None:
        wait = min(timeout, self.wait_seconds)
        if self._claim_next and self.idle_slots:
            # Idle: long-poll claim-next itself, so the jobs come with the wake-up (a stop
            # may cut this wait short: jobs handed out in that instant go back to the queue
            # when their lease runs out).
            self._taken = self._take_next(self.idle_slots, wait)
            return
        self._offered = self._offer(wait, 10)

    def claim(self, free: dict[str, int]) -> list[HeldJob]:
        taken, self._taken = self._taken, []
        if taken:
            return taken
        # claim-next hands out jobs for any of the registered models: ask for no more than
        # the model with the fewest free sequences can take.
        most = min((free.get(model, 0) for model in self._models), default=0)
        if self._claim_next and most:
            if time.monotonic() - self._last_poll < BUSY_POLL_SECONDS:
                return []
            return self._take_next(most, 0)
        return self._claim_offered(free)

    def _take_next(self, max_jobs: int, wait: float) -> list[HeldJob]:
        """Jobs handed to this miner by `POST /v1/jobs/claim-next` (long-polled when idle)."""
        self._last_poll = time.monotonic()
        try:
            answer = self.client.claim_next(self.miner_id, max_jobs=max_jobs, wait=wait)
        except CoordinatorError as e:
            if e.status in (404, 405) and e.error_code in ("NOT_FOUND", "METHOD_NOT_ALLOWED"):
                log.warning("this coordinator has no claim-next; using available and claim")
                self._claim_next = False
                return []
            self._asking_failed(e, wait)
            return []
        self._failures = 0
        return [self._held(row) for row in answer["jobs"]]

    def _claim_offered(self, free: dict[str, int]) -> list[HeldJob]:
        """The tutorial's way: claim jobs of an `available` offer one by one."""
        offered, self._offered = self._offered, []
        if not offered and time.monotonic() - self._last_poll >= BUSY_POLL_SECONDS:
            offered = self._offer(0, max(sum(free.values()), 1))
        free = dict(free)
        claimed = []
        for job in offered:
            model = job["served_model"]
            if self._stopping.is_set():
                break
            if not free.get(model):
                continue
            try:
                row = self.client.claim_job(job["job_id"], self.miner_id)
            except CoordinatorError as e:
                if e.status == 409:
                    continue  # another miner was quicker
                log.warning("claiming job %s: %s", job["job_id"], e.detail)
                break
            free[model] -= 1
            claimed.append(self._held(row))
        return claimed

    @staticmethod
    def _held(row: dict[str, Any]) -> HeldJob:
        return HeldJob(
            job_id=row["job_id"],
            model=row["served_model"],
            prompt=row["prompt"],
            params=row["params"],
            messages=row.get("messages"),
            lease_seconds=max(_seconds_until(row["lease_expires_at"]), 0.15),
        )

    def progress(self, job: HeldJob, text: str) -> None:
        self._pending_text.setdefault(job, []).append(text)

    def flush(self) -> None:
        now = time.monotonic()
        for job in list(self._pending_text):
            if now - self._last_flush.get(job, 0.0) >= PROGRESS_INTERVAL_SECONDS:
                self._send_progress(job)
                self._last_flush[job] = now

    def _send_progress(self, job: HeldJob) -> None:
        """Send the job's held-back text; a node that says the job is not ours (cancelled, or
        another miner has it now) marks it lost."""
        pieces = self._pending_text.pop(job, None)
        if not pieces:
            return
        try:
            self.client.report_progress(job.job_id, self.miner_id, "".join(pieces))
        except CoordinatorError as e:
            if e.status in (403, 409):
                job.lost.set()
            else:
                log.warning("progress of job %s not sent: %s", job.job_id, e.detail)

    def complete(self, job: HeldJob, generation: Generation, model_sha256: str) -> None:
        self._send_progress(job)
        result_hash = hash_result(generation.text)
        extra = {
            "usage": {
                "prompt_tokens": generation.prompt_tokens,
                "completion_tokens": generation.completion_tokens,
            },
            "model_sha256": model_sha256,
            "miner_signature": {
                "alg": "ed25519",
                "public_key": self.key.public_key_hex,
                "value": self.key.sign(result_hash.encode("ascii")),
            },
        }
        self._settle(
            job.job_id,
            lambda: self.client.complete_job(job.job_id, self.miner_id, generation.text, **extra),
        )

    def fail(self, job: HeldJob, reason: str) -> None:
        self._settle(job.job_id, lambda: self.client.fail_job(job.job_id, self.miner_id, reason))

    def fault(self, job: HeldJob, error: Exception) -> None:
        reason = f"{type(error).__name__}: {error}"
        self._settle(job.job_id, lambda: self.client.fail_job(job.job_id, self.miner_id, reason))

    def _settle(self, job_id: str, send: Callable[[], Any]) -> None:
        """Send a completion or failure until the node has it (or refuses it for good)."""
        failures = 0
        while True:
            try:
                send()
                return
            except CoordinatorUnavailable as e:
                failures += 1
                delay = min(0.5 * 2 ** (failures - 1), MAX_BACKOFF_SECONDS)
                log.warning("cannot report job %s yet (%s); retrying", job_id, e.detail)
                time.sleep(delay)  # not interruptible: the result must not be lost
            except CoordinatorError as e:
                log.warning("job %s: the node refused the result: %s", job_id, e.detail)
                return

    def hand_back(self, job: HeldJob) -> None:
        self.client.release_job(job.job_id, self.miner_id)

    def renew(self, jobs: list[HeldJob]) -> float:
        answer = self.client.heartbeat(self.miner_id)
        renewed = set(answer["renewed"])
        for job in jobs:
            if job.job_id not in renewed:
                job.lost.set()
        return float(answer["lease_seconds"])

    def forget(self, job: HeldJob) -> None:
        self._pending_text.pop(job, None)
        self._last_flush.pop(job, None)


class RemoteMiner:
    """Serves a coordinator's jobs for the models in `engines`."""

    def __init__(
        self,
        client: CoordinatorClient,
        miner_id: str,
        engines: dict[str, Engine],
        key: NodeKey,
        gpu_info: dict[str, Any],
        *,
        wait_seconds: float = 30.0,
    ) -> None:
        self.miner_id = miner_id
        self.engines = engines
        self._stopping = threading.Event()
        self._running = False  # in `run`: a StopNow raised now ends it
        self.source = CoordinatorSource(
            client, miner_id, key, gpu_info, self._stopping, wait_seconds=wait_seconds
        )
        self.source.idle_slots = min((e.free_slots for e in engines.values()), default=1)
        self.loop = MinerLoop(self.source, engines)

    @property
    def jobs_done(self) -> int:
        return self.loop.jobs_done

    def request_stop(self) -> None:
        """First call: finish the jobs in hand, then stop. Second call: hand them back.

        Called from a signal handler: when no job is in hand it raises `StopNow` to cut a
        long poll short (the wait may have 30 s to run), so an idle miner exits at once.
        Python runs a handler once for signals that arrive together (during one
        `llama_decode`), so a second stop counts only after the loop said it is finishing.
        """
        if self._stopping.is_set():
            self.loop.stop()
        self._stopping.set()
        self.loop.drain()
        if self._running and not self.loop.busy:
            raise StopNow

    def run(self) -> None:
        """Serve until asked to stop."""
        self._running = True
        try:
            with contextlib.suppress(StopNow):
                self.loop.run()
        finally:
            self._running = False


def _seconds_until(rfc3339_time: str) -> float:
    moment = datetime.fromisoformat(rfc3339_time.replace("Z", "+00:00"))
    return moment.timestamp() - time.time()
