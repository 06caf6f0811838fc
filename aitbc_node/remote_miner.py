"""A miner on another box: the built-in miner's work, done over the node's HTTP API.

`aitbc-node miner --coordinator URL --api-key KEY` registers (its models, its device and its own
Ed25519 public key), waits for work by long-polling `GET /v1/jobs/available?wait=`, claims a
job, generates with llama.cpp while a heartbeat thread renews the lease and its text is sent
as progress (for streams), then completes the job with the result, the token counts, the model
file's SHA-256 and its co-signature over the result's hash.

It rides out a coordinator restart or a dropped connection: it reconnects with capped backoff,
and re-sends a completion until the node has it (a second completion is refused with 409, so a
job is never completed twice). The first SIGINT/SIGTERM lets the job in hand finish, then
exits; a second one cuts the generation short and fails the job.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from datetime import datetime
from typing import Any

from aitbc_node.client import CoordinatorClient, CoordinatorError, CoordinatorUnavailable
from aitbc_node.engine import Engine, EngineError
from aitbc_node.receipts import hash_result
from aitbc_node.signing import NodeKey

log = logging.getLogger("aitbc_node.remote_miner")


class StopNow(Exception):
    """Raised by the signal handler to end an idle miner's wait at once."""


MAX_BACKOFF_SECONDS = 10.0
PROGRESS_INTERVAL_SECONDS = 0.2


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
        self.client = client
        self.miner_id = miner_id
        self.engines = engines
        self.key = key
        self.gpu_info = gpu_info
        self.wait_seconds = wait_seconds
        self.jobs_done = 0
        self._stopping = threading.Event()  # finish the job in hand, take no more
        self._aborting = threading.Event()  # cut the job in hand short
        self._failures = 0
        self._busy = False

    def request_stop(self) -> None:
        """First call: finish the current job, then stop. Second call: abort it too.

        Called from a signal handler: when no job is in hand it raises `StopNow` to cut a
        long poll short (the wait may have 30 s to run), so an idle miner exits at once.
        """
        if self._stopping.is_set():
            self._aborting.set()
        self._stopping.set()
        if not self._busy:
            raise StopNow

    def run(self) -> None:
        """Serve until asked to stop."""
        with contextlib.suppress(StopNow):
            self._serve_forever()

    def _serve_forever(self) -> None:
        self._register()
        while not self._stopping.is_set():
            try:
                offered = self.client.available_jobs(self.miner_id, wait=self.wait_seconds)
                self._failures = 0
            except CoordinatorError as e:
                self._back_off(e)
                if e.error_code == "MINER_NOT_REGISTERED":
                    self._register()
                continue
            for job in offered:
                if self._stopping.is_set():
                    break
                self._busy = True  # from the claim on, a stop waits for the job
                try:
                    claimed = self.client.claim_job(job["job_id"], self.miner_id)
                except CoordinatorError as e:
                    self._busy = False
                    if e.status == 409:
                        continue  # another miner was quicker
                    self._back_off(e)
                    break
                try:
                    self._serve(claimed)
                finally:
                    self._busy = False
                break  # ask again: the rest of the offer may be gone

    def _register(self) -> None:
        while not self._stopping.is_set():
            try:
                self.client.register_miner(
                    self.miner_id, sorted(self.engines), self.gpu_info, self.key.public_key_hex
                )
                log.warning("registered as %s serving %s", self.miner_id, ", ".join(self.engines))
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

    def _serve(self, job: dict[str, Any]) -> None:
        job_id = job["job_id"]
        lost = threading.Event()  # cancelled, or the lease was lost
        done = threading.Event()
        lease_left = _seconds_until(job["lease_expires_at"])
        heartbeat = threading.Thread(
            target=self._heartbeat,
            args=(job_id, lost, done, max(0.05, lease_left / 3)),
            name="heartbeat",
            daemon=True,
        )
        heartbeat.start()
        pending_text: list[str] = []
        last_flush = time.monotonic()

        def on_text(text: str) -> None:
            nonlocal last_flush
            pending_text.append(text)
            if time.monotonic() - last_flush >= PROGRESS_INTERVAL_SECONDS:
                self._send_progress(job_id, "".join(pending_text), lost)
                pending_text.clear()
                last_flush = time.monotonic()

        engine = self.engines[job["served_model"]]
        try:
            generation = engine.generate(
                job["prompt"],
                job["params"],
                should_stop=lambda: lost.is_set() or self._aborting.is_set(),
                on_text=on_text,
            )
        except (EngineError, ValueError, RuntimeError) as e:
            reason = f"{type(e).__name__}: {e}"
            self._settle(job_id, lambda: self.client.fail_job(job_id, self.miner_id, reason))
            return
        finally:
            done.set()
            heartbeat.join()
        if lost.is_set():
            log.warning("job %s was cancelled or lost its lease; dropped", job_id)
            return
        if generation.finish_reason == "aborted":
            self._settle(
                job_id, lambda: self.client.fail_job(job_id, self.miner_id, "the miner stopped")
            )
            return
        if pending_text:
            self._send_progress(job_id, "".join(pending_text), lost)
        result_hash = hash_result(generation.text)
        extra = {
            "usage": {
                "prompt_tokens": generation.prompt_tokens,
                "completion_tokens": generation.completion_tokens,
            },
            "model_sha256": engine.model.sha256,
            "miner_signature": {
                "alg": "ed25519",
                "public_key": self.key.public_key_hex,
                "value": self.key.sign(result_hash.encode("ascii")),
            },
        }
        self._settle(
            job_id,
            lambda: self.client.complete_job(job_id, self.miner_id, generation.text, **extra),
        )

    def _settle(self, job_id: str, send: Any) -> None:
        """Send a completion or failure until the node has it (or refuses it for good)."""
        while True:
            try:
                send()
                self.jobs_done += 1
                return
            except CoordinatorUnavailable as e:
                self._failures += 1
                delay = min(0.5 * 2 ** (self._failures - 1), MAX_BACKOFF_SECONDS)
                log.warning("cannot report job %s yet (%s); retrying", job_id, e.detail)
                time.sleep(delay)  # not interruptible: the result must not be lost
            except CoordinatorError as e:
                log.warning("job %s: the node refused the result: %s", job_id, e.detail)
                return

    def _send_progress(self, job_id: str, text: str, lost: threading.Event) -> None:
        try:
            self.client.report_progress(job_id, self.miner_id, text)
        except CoordinatorError as e:
            if e.status in (403, 409):
                lost.set()

    def _heartbeat(
        self, job_id: str, lost: threading.Event, done: threading.Event, interval: float
    ) -> None:
        while not done.wait(interval):
            try:
                answer = self.client.heartbeat(self.miner_id)
                interval = max(0.05, answer["lease_seconds"] / 3)
                if job_id not in answer["renewed"]:
                    lost.set()
                    return
            except CoordinatorError as e:
                log.warning("heartbeat failed: %s", e.detail)


def _seconds_until(rfc3339_time: str) -> float:
    moment = datetime.fromisoformat(rfc3339_time.replace("Z", "+00:00"))
    return moment.timestamp() - time.time()
