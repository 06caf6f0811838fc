"""The built-in miner: a thread in the node's process that serves jobs with llama.cpp.

It claims work straight from the store (no HTTP between the two), learns of new work from the
in-process signal rather than by polling, renews its leases from a heartbeat thread while it
generates, and stops a generation within one token when the job is cancelled or the node shuts
down. On shutdown the job in hand goes back to the queue uncounted.

No job can stop it. Whatever serving or recording a job raises ends that job, not the miner:
a full disk hands the job back to the queue and the miner waits for space (backing off); any
other error counts a fault against the job, which is retried once and then failed
`POISON_JOB`. Its threads are supervised (`background.Supervised`), so even an error outside
a job restarts the loop after a backoff, and `/api/health` says `stopped`, and why, meanwhile.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from aitbc_node.background import Backoff, Supervised, describe, log_failure
from aitbc_node.engine import Engine, Generation
from aitbc_node.errors import ApiError, StorageFull
from aitbc_node.jobs import Jobs
from aitbc_node.miners import Miners
from aitbc_node.signals import Signals
from aitbc_node.store import Row

log = logging.getLogger("aitbc_node.miner")

# However the signal behaves, an idle miner looks at the queue at least this often.
IDLE_RECHECK_SECONDS = 5.0


class BuiltinMiner:
    """Serves pending jobs for its models, one at a time, in a background thread."""

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
        self.jobs = jobs
        self.miners = miners
        self.signals = signals
        self.current_job: str | None = None
        self.jobs_done = 0
        self.failures = 0  # claims or jobs in a row that failed for want of space, or a fault
        self._capabilities = json.dumps(sorted(engines))
        self._stop = threading.Event()
        self._busy = threading.Event()
        # Waits after a full disk or a job that broke the loop, reset by a job that went well.
        self._backoff = Backoff()
        self._loop = Supervised("builtin-miner", self._run, stop_event=self._stop)
        self._heartbeat = Supervised(
            "builtin-miner-heartbeat", self._renew_leases, stop_event=self._stop
        )

    @property
    def state(self) -> str:
        """`busy`, `idle`, or `stopped` (shut down, or its thread died and awaits restart)."""
        if self._stop.is_set() or not self._loop.running:
            return "stopped"
        return "busy" if self.current_job else "idle"

    def status(self) -> dict[str, Any]:
        """The miner loop's supervision report (state, reason, last error, restarts)."""
        out = self._loop.status()
        heartbeat = self._heartbeat.status()
        if out["state"] == "running" and heartbeat["state"] != "running":
            out = {**heartbeat, "reason": f"lease heartbeat: {heartbeat.get('reason')}"}
        if out["state"] == "running" and self.failures:
            out["state"] = "retrying"
        out["failures"] = self.failures
        return out

    def start(self) -> None:
        """Register with the node and start serving."""
        # In the order given on the command line: the first is the node's default model.
        self.miners.register_builtin(self.miner_id, list(self.engines), self.gpu_info)
        # Receipts name each model file's SHA-256; hash the files now, beside the first jobs,
        # rather than making the first completion wait for it.
        threading.Thread(target=self._hash_models, name="model-hash", daemon=True).start()
        self._loop.start()
        self._heartbeat.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop serving: a generation in progress is cut short and its job requeued."""
        self._stop.set()
        self.signals.work_available()
        self._busy.set()
        for thread in (self._loop, self._heartbeat):
            thread.join(timeout)

    def _hash_models(self) -> None:
        for engine in self.engines.values():
            _ = engine.model.sha256

    def _run(self) -> None:
        while not self._stop.is_set():
            seen = self.signals.work_generation
            try:
                row = self.jobs.claim_as(self.miner_id, self._capabilities, None)
            except StorageFull as e:
                self._pause(e, "claiming a job")
                continue
            except ApiError:
                self.failures = 0  # the store answered: nothing to do, nothing wrong
                self.signals.wait_for_work(seen, IDLE_RECHECK_SECONDS)
                continue
            except Exception as e:
                # Most likely the job itself (a row that cannot be read back): count it
                # against that job, so it cannot block the queue for good.
                self._fault_claim(e)
                self._pause(e, "claiming a job")
                continue
            self._serve(row)

    def _pause(self, error: Exception, what: str) -> None:
        """Note the error for the health report and wait (longer each time in a row)."""
        delay = self._backoff.next()
        self.failures += 1
        self._loop.note_error(describe(error))
        log_failure(f"built-in miner: {what}", error, delay)
        self._stop.wait(delay)

    def _serve(self, row: Row) -> None:
        job_id = row["job_id"]
        cancelled = self.signals.watch_cancel(job_id)
        self.current_job = job_id
        self._busy.set()
        try:
            self._work(row, cancelled)
        except StorageFull as e:
            # The node's fault, not the job's: hand the job back, then wait for space.
            self._hand_back(job_id)
            self._pause(e, f"recording job {job_id}")
        except Exception as e:
            # Anything else counts against the job: retried once, then failed POISON_JOB.
            self._fault(job_id, e)
            self._pause(e, f"serving job {job_id}")
        else:
            self.failures = 0
            self._backoff.reset()
        finally:
            self.signals.unwatch_cancel(job_id)
            self.current_job = None
            self._busy.clear()
            self.jobs_done += 1

    def _hand_back(self, job_id: str) -> None:
        try:
            self.jobs.release(job_id, self.miner_id)
        except Exception as e:
            # Its lease runs out without heartbeats, and the lease reaper requeues it.
            log.warning("job %s not handed back (%s); its lease will requeue it", job_id, e)

    def _fault(self, job_id: str, error: Exception) -> None:
        try:
            status = self.jobs.record_fault(job_id, self.miner_id, describe(error))
        except Exception as e:
            log.warning("fault of job %s not recorded (%s); its lease will requeue it", job_id, e)
            return
        if status == "failed":
            log.warning("job %s failed POISON_JOB: it broke the built-in miner again", job_id)
        elif status == "pending":
            log.warning("job %s goes back to the queue for one more try", job_id)

    def _fault_claim(self, error: Exception) -> None:
        try:
            job_id = self.jobs.oldest_claimable(self._capabilities)
        except Exception as e:
            log.warning("cannot tell which job a failed claim was for: %s", e)
            return
        if job_id is not None:
            self._fault(job_id, error)

    def _work(self, row: Row, cancelled: threading.Event) -> None:
        """Generate the job's text and record the outcome; raises what recording raised."""
        job_id = row["job_id"]
        engine = self.engines[row["served_model"]]
        try:
            generation = engine.generate(
                row["prompt"],
                json.loads(row["params"]),
                should_stop=lambda: cancelled.is_set() or self._stop.is_set(),
                on_text=lambda text: self.signals.text_generated(job_id, text),
            )
        except Exception as e:
            log.warning("job %s failed in the engine: %s", job_id, e)
            self._record(job_id, error=f"{type(e).__name__}: {e}", error_code="ENGINE_ERROR")
        else:
            self._settle(job_id, generation, cancelled.is_set(), engine.model.sha256)

    def _settle(
        self, job_id: str, generation: Generation, cancelled: bool, model_sha256: str
    ) -> None:
        if cancelled:
            log.info("job %s was cancelled after %d tokens", job_id, generation.completion_tokens)
        elif generation.finish_reason == "aborted":
            self.jobs.release(job_id, self.miner_id)
            log.info("job %s handed back to the queue at shutdown", job_id)
        else:
            self._record(
                job_id,
                result=generation.text,
                prompt_tokens=generation.prompt_tokens,
                completion_tokens=generation.completion_tokens,
                model_sha256=model_sha256,
            )

    def _record(self, job_id: str, **outcome: Any) -> None:
        try:
            self.jobs.finish(job_id, self.miner_id, **outcome)
        except StorageFull:
            raise
        except ApiError as e:
            # Cancelled (or otherwise ended) between the last token and this write.
            log.info("job %s not recorded: %s", job_id, e.detail)

    def _renew_leases(self) -> None:
        interval = max(self.jobs.rules.lease_seconds / 3, 0.05)
        while not self._stop.is_set():
            self._busy.wait()
            if self._stop.wait(interval):
                return
            if self.current_job is not None:
                try:
                    self.jobs.renew_leases(self.miner_id)
                except Exception as e:
                    log_failure("built-in miner: renewing leases", e, interval)
