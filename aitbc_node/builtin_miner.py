"""The built-in miner: the miner loop (`miner.MinerLoop`) fed from the store in this process.

It claims work straight from the store (no HTTP between the two), learns of new work from the
in-process signal rather than by polling, renews its leases from the loop's heartbeat thread,
and stops a generation within one token when its job is cancelled. On shutdown every job it
holds goes back to the queue uncounted.

No job can stop it. Whatever serving or recording a job raises ends that job, not the miner:
a full disk hands the job back to the queue and the miner waits for space (backing off); any
other error counts a fault against the job, which is retried once and then failed
`POISON_JOB`. Its thread is supervised (`background.Supervised`), so even an error outside
a job restarts the loop after a backoff, and `/api/health` says `stopped`, and why, meanwhile.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

from aitbc_node.background import Backoff, Supervised, describe, log_failure
from aitbc_node.canonical import stored_json
from aitbc_node.engine import Engine, Generation
from aitbc_node.errors import ApiError, StorageFull
from aitbc_node.jobs import Jobs, job_messages
from aitbc_node.miner import HeldJob, MinerLoop
from aitbc_node.miners import Miners
from aitbc_node.signals import Signals
from aitbc_node.store import Row

log = logging.getLogger("aitbc_node.builtin_miner")

# However the signal behaves, an idle miner looks at the queue at least this often.
IDLE_RECHECK_SECONDS = 5.0


class StoreSource:
    """The job source of the built-in miner: the store, in this process."""

    def __init__(
        self,
        miner_id: str,
        gpu_info: dict[str, Any],
        jobs: Jobs,
        miners: Miners,
        signals: Signals,
        stop: threading.Event,
        supervisor: Supervised,
    ) -> None:
        self.miner_id = miner_id
        self.gpu_info = gpu_info
        self.jobs = jobs
        self.miners = miners
        self.signals = signals
        self.failures = 0  # claims or jobs in a row that failed for want of space, or a fault
        self._stop = stop
        self._supervisor = supervisor
        # Waits after a full disk or a job that broke the loop, reset by a job that went well.
        self._backoff = Backoff()
        # The work signal's count when a claim last found nothing, and when that was: until
        # the signal moves on (or a while passes), another claim would find nothing too.
        self._empty_generation: int | None = None
        self._empty_since = 0.0

    def register(self, models: list[str]) -> None:
        # In the order given on the command line: the first is the node's default model.
        self.miners.register_builtin(self.miner_id, models, self.gpu_info)

    def _queue_known_empty(self) -> bool:
        return (
            self._empty_generation == self.signals.work_generation
            and time.monotonic() - self._empty_since < IDLE_RECHECK_SECONDS
        )

    def wait_for_work(self, timeout: float) -> None:
        if self._queue_known_empty() and self._empty_generation is not None:
            self.signals.wait_for_work(self._empty_generation, min(timeout, IDLE_RECHECK_SECONDS))

    def claim(self, free: dict[str, int]) -> list[HeldJob]:
        if self._queue_known_empty() or self._stop.is_set():
            return []
        seen = self.signals.work_generation
        claimed: list[HeldJob] = []
        for model, slots in free.items():
            capabilities = json.dumps([model])
            try:
                # All the model's free sequences in one claim (one transaction).
                rows = self.jobs.claim_many(self.miner_id, capabilities, slots)
            except StorageFull as e:
                self._pause(e, "claiming a job")
                return claimed
            except Exception:
                # Most likely a job that cannot be read back: claim one at a time, so the
                # fault is counted against the job that breaks.
                rows, broke = self._claim_one_by_one(capabilities, slots)
            else:
                broke = False
            for row in rows:
                try:
                    claimed.append(self._held_job(row))
                except Exception as e:
                    # A row that claims but cannot be served (params that do not parse).
                    self._record_fault(row["job_id"], e)
                    self._pause(e, f"reading job {row['job_id']}")
            if broke:
                return claimed
        if not claimed:
            self._empty_generation, self._empty_since = seen, time.monotonic()
            self.failures = 0  # the store answered: nothing to do, nothing wrong
        return claimed

    def _claim_one_by_one(self, capabilities: str, slots: int) -> tuple[list[Row], bool]:
        """Claim up to `slots` jobs singly: the rows claimed, and whether a claim broke (its
        fault is counted and the miner pauses)."""
        rows: list[Row] = []
        for _ in range(slots):
            try:
                rows.append(self.jobs.claim_as(self.miner_id, capabilities, None))
            except StorageFull as e:
                self._pause(e, "claiming a job")
                return rows, True
            except ApiError:
                break  # nothing more pending
            except Exception as e:
                self._fault_claim(e, capabilities)
                self._pause(e, "claiming a job")
                return rows, True
        return rows, False

    def _held_job(self, row: Row) -> HeldJob:
        return HeldJob(
            job_id=row["job_id"],
            model=row["served_model"],
            prompt=row["prompt"],
            params=stored_json(row["params"]),
            messages=job_messages(row),
            lease_seconds=self.jobs.rules.lease_seconds,
            lost=self.signals.watch_cancel(row["job_id"]),
        )

    def progress(self, job: HeldJob, text: str) -> None:
        self.signals.text_generated(job.job_id, text)

    def flush(self) -> None:
        pass  # progress goes to the signals at once

    def complete(self, job: HeldJob, generation: Generation, model_sha256: str) -> None:
        self._record(
            job,
            result=generation.text,
            prompt_tokens=generation.prompt_tokens,
            completion_tokens=generation.completion_tokens,
            model_sha256=model_sha256,
        )
        self.failures = 0
        self._backoff.reset()

    def fail(self, job: HeldJob, reason: str) -> None:
        self._record(job, error=reason, error_code="ENGINE_ERROR")

    def _record(self, job: HeldJob, **outcome: Any) -> None:
        try:
            self.jobs.finish(job.job_id, self.miner_id, **outcome)
        except StorageFull:
            raise
        except ApiError as e:
            # Cancelled (or otherwise ended) between the last token and this write.
            log.info("job %s not recorded: %s", job.job_id, e.detail)

    def fault(self, job: HeldJob, error: Exception) -> None:
        if isinstance(error, StorageFull):
            # The node's fault, not the job's: hand the job back, then wait for space.
            try:
                self.hand_back(job)
            except Exception as e:
                # Its lease runs out without heartbeats, and the lease reaper requeues it.
                log.warning("job %s not handed back (%s); its lease will requeue it", job.job_id, e)
            self._pause(error, f"recording job {job.job_id}")
            return
        # Anything else counts against the job: retried once, then failed POISON_JOB.
        self._record_fault(job.job_id, error)
        self._pause(error, f"serving job {job.job_id}")

    def _record_fault(self, job_id: str, error: Exception) -> None:
        try:
            status = self.jobs.record_fault(job_id, self.miner_id, describe(error))
        except Exception as e:
            log.warning("fault of job %s not recorded (%s); its lease will requeue it", job_id, e)
            return
        if status == "failed":
            log.warning("job %s failed POISON_JOB: it broke the built-in miner again", job_id)
        elif status == "pending":
            log.warning("job %s goes back to the queue for one more try", job_id)

    def _fault_claim(self, error: Exception, capabilities: str) -> None:
        try:
            job_id = self.jobs.oldest_claimable(capabilities)
        except Exception as e:
            log.warning("cannot tell which job a failed claim was for: %s", e)
            return
        if job_id is not None:
            self._record_fault(job_id, error)

    def _pause(self, error: Exception, what: str) -> None:
        """Note the error for the health report and wait (longer each time in a row)."""
        delay = self._backoff.next()
        self.failures += 1
        self._supervisor.note_error(describe(error))
        log_failure(f"built-in miner: {what}", error, delay)
        self._stop.wait(delay)

    def hand_back(self, job: HeldJob) -> None:
        if self.jobs.release(job.job_id, self.miner_id):
            log.info("job %s handed back to the queue", job.job_id)

    def renew(self, jobs: list[HeldJob]) -> float:
        renewed = set(self.jobs.renew_leases(self.miner_id))
        for job in jobs:
            if job.job_id not in renewed:
                job.lost.set()
        return self.jobs.rules.lease_seconds

    def forget(self, job: HeldJob) -> None:
        self.signals.unwatch_cancel(job.job_id)


class BuiltinMiner:
    """Serves pending jobs for its models, up to each engine's `parallel` at once, in a
    supervised background thread."""

    def __init__(
        self,
        miner_id: str,
        engines: dict[str, Engine],
        gpu_info: dict[str, Any],
        jobs: Jobs,
        miners: Miners,
        signals: Signals,
    ) -> None:
        self.miner_id = miner_id
        self.engines = engines
        self.gpu_info = gpu_info
        self.signals = signals
        self._stop = threading.Event()
        self._thread = Supervised("builtin-miner", self._run, stop_event=self._stop)
        self.source = StoreSource(
            miner_id, gpu_info, jobs, miners, signals, self._stop, self._thread
        )
        self.loop = MinerLoop(self.source, engines)

    @property
    def state(self) -> str:
        """`busy`, `idle`, or `stopped` (shut down, or its thread died and awaits restart)."""
        if self._stop.is_set() or not self._thread.running:
            return "stopped"
        return "busy" if self.loop.held else "idle"

    @property
    def current_jobs(self) -> list[str]:
        """The jobs being served now, oldest claim first."""
        return self.loop.held_ids()

    def status(self) -> dict[str, Any]:
        """The miner loop's supervision report (state, reason, last error, restarts)."""
        out = self._thread.status()
        if out["state"] == "running" and self.source.failures:
            out["state"] = "retrying"
        out["failures"] = self.source.failures
        return out

    def start(self) -> None:
        """Register with the node and start serving."""
        # Receipts name each model file's SHA-256; hash the files now, beside the first jobs,
        # rather than making the first completion wait for it.
        threading.Thread(target=self._hash_models, name="model-hash", daemon=True).start()
        # Registered before the API answers, so the models are served from the first request.
        self.source.register(list(self.engines))
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop serving: generations in progress are cut short and their jobs requeued."""
        self._stop.set()
        self.loop.stop()
        self.signals.work_available()  # wake an idle wait
        self._thread.join(timeout)

    def _hash_models(self) -> None:
        for engine in self.engines.values():
            _ = engine.model.sha256

    def _run(self) -> None:
        self.loop.run()
