"""The built-in miner: a thread in the node's process that serves jobs with llama.cpp.

It claims work straight from the store (no HTTP between the two), learns of new work from the
in-process signal rather than by polling, renews its leases from a heartbeat thread while it
generates, and stops a generation within one token when the job is cancelled or the node shuts
down. On shutdown the job in hand goes back to the queue uncounted.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from aitbc_node.engine import Engine, Generation
from aitbc_node.errors import ApiError
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
        self._capabilities = json.dumps(sorted(engines))
        self._stop = threading.Event()
        self._busy = threading.Event()
        self._thread = threading.Thread(target=self._run, name="builtin-miner", daemon=True)
        self._heartbeat = threading.Thread(
            target=self._renew_leases, name="builtin-miner-heartbeat", daemon=True
        )

    @property
    def state(self) -> str:
        if self._stop.is_set():
            return "stopped"
        return "busy" if self.current_job else "idle"

    def start(self) -> None:
        """Register with the node and start serving."""
        self.miners.register_builtin(self.miner_id, sorted(self.engines), self.gpu_info)
        # Receipts name each model file's SHA-256; hash the files now, beside the first jobs,
        # rather than making the first completion wait for it.
        threading.Thread(target=self._hash_models, name="model-hash", daemon=True).start()
        self._thread.start()
        self._heartbeat.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop serving: a generation in progress is cut short and its job requeued."""
        self._stop.set()
        self.signals.work_available()
        self._busy.set()
        for thread in (self._thread, self._heartbeat):
            if thread.is_alive():
                thread.join(timeout)

    def _hash_models(self) -> None:
        for engine in self.engines.values():
            _ = engine.model.sha256

    def _run(self) -> None:
        while not self._stop.is_set():
            seen = self.signals.work_generation
            try:
                row = self.jobs.claim_as(self.miner_id, self._capabilities, None)
            except ApiError:
                self.signals.wait_for_work(seen, IDLE_RECHECK_SECONDS)
                continue
            except Exception:
                log.exception("claiming a job failed")
                self._stop.wait(1.0)
                continue
            self._serve(row)

    def _serve(self, row: Row) -> None:
        job_id = row["job_id"]
        cancelled = self.signals.watch_cancel(job_id)
        self.current_job = job_id
        self._busy.set()
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
        finally:
            self.signals.unwatch_cancel(job_id)
            self.current_job = None
            self._busy.clear()
            self.jobs_done += 1

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
                except Exception:
                    log.exception("renewing leases failed")
