"""The miner loop: one loop, over the batched engine, for the built-in miner and remote ones.

A `MinerLoop` keeps each engine's batch full. It claims jobs from its `JobSource` up to the
number of free sequences, admits them into their model's engine, steps every engine that has
work (one `llama_decode` for all of its sequences), and settles each job that finishes with
the source. The built-in miner and `aitbc-node miner` differ only in their source: the store in
this process (`store_source.StoreSource`) or the Coordinator API over HTTP
(`coordinator_source.CoordinatorSource`).

A heartbeat thread renews the lease of every job held, and marks lost any job the source no
longer lets this miner hold (cancelled, or its lease was taken); the loop drops a lost job at
the next token and records nothing for it. A job whose settling raises is handed to the
source's `fault` (the built-in miner retries it once, then fails it `POISON_JOB`; the
remote one fails it), never past the loop. On shutdown the loop either finishes what it holds
and takes nothing more (`drain`), or cuts every generation short and hands each job back to
the queue uncounted (`stop`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from aitbc_node.background import describe
from aitbc_node.engine import Engine, EngineError, Generation, Sequence

log = logging.getLogger("aitbc_node.miner")

# How long an idle loop waits for work before it looks again (the source may wake it sooner).
IDLE_WAIT_SECONDS = 30.0


class StopNow(Exception):
    """Raised (by a signal handler) to end an idle miner's wait for work at once."""


@dataclass(eq=False)
class HeldJob:
    """A job this miner has claimed and not yet settled."""

    job_id: str
    model: str
    prompt: str
    params: dict[str, Any]
    lease_seconds: float
    # The conversation a chat job was asked as (`prompt` is then its plain transcript).
    messages: list[dict[str, str]] | None = None
    # Set when the job is no longer this miner's to finish (cancelled, lease lost).
    lost: threading.Event = field(default_factory=threading.Event)
    sequence: Sequence | None = None


class JobSource(Protocol):
    """Where a miner's jobs come from and where their results go."""

    def register(self, models: list[str]) -> None:
        """Tell the node this miner serves `models`."""

    def wait_for_work(self, timeout: float) -> None:
        """Block until work may be waiting, at most `timeout` seconds (used when idle)."""

    def claim(self, free: dict[str, int]) -> list[HeldJob]:
        """Claim pending jobs, at most `free[model]` for each model, without waiting."""

    def progress(self, job: HeldJob, text: str) -> None:
        """Text the job produced since the last call (for streams)."""

    def flush(self) -> None:
        """Send any progress held back (called once per step)."""

    def complete(self, job: HeldJob, generation: Generation, model_sha256: str) -> None:
        """Record the job's result."""

    def fail(self, job: HeldJob, reason: str) -> None:
        """Record that the engine could not run the job."""

    def fault(self, job: HeldJob, error: Exception) -> None:
        """Something other than the engine broke while serving the job."""

    def hand_back(self, job: HeldJob) -> None:
        """Put the job back in the queue, uncounted (shutdown)."""

    def renew(self, jobs: list[HeldJob]) -> float:
        """Renew the leases of `jobs`, setting `lost` on any no longer held; returns the
        lease's length in seconds."""

    def forget(self, job: HeldJob) -> None:
        """The loop is done with the job (whatever became of it)."""


class MinerLoop:
    """Serves a source's jobs on `engines` (model name -> engine), many at once."""

    def __init__(self, source: JobSource, engines: dict[str, Engine]) -> None:
        self.source = source
        self.engines = engines
        self.jobs_done = 0
        self.held: dict[str, HeldJob] = {}
        self._held_lock = threading.Lock()
        self._claiming = False
        self._draining = threading.Event()  # finish what is held, claim nothing more
        self._stopping = threading.Event()  # cut every generation short, hand jobs back
        self._heartbeat_wakeup = threading.Event()

    @property
    def busy(self) -> bool:
        """Whether a job is held, or being claimed."""
        return bool(self.held) or self._claiming

    def held_ids(self) -> list[str]:
        """The ids of the jobs held now, oldest claim first."""
        with self._held_lock:
            return list(self.held)

    def drain(self) -> None:
        """Finish the jobs held, take no more, then return from `run`."""
        self._draining.set()

    def stop(self) -> None:
        """Cut every generation short, hand every held job back, and return from `run`."""
        self._draining.set()
        self._stopping.set()
        self._heartbeat_wakeup.set()

    def run(self) -> None:
        """Serve until `drain` (and the batch is empty) or `stop`. Whatever the loop holds
        when it returns or raises goes back to the queue."""
        ended = threading.Event()
        heartbeat = threading.Thread(
            target=self._renew_leases, args=(ended,), name="miner-heartbeat", daemon=True
        )
        heartbeat.start()
        try:
            self.source.register(list(self.engines))
            announced = False
            while not self._stopping.is_set():
                if self._draining.is_set() and not self.held:
                    return
                if self._draining.is_set() and not announced:
                    announced = True
                    log.warning(
                        "stopping: finishing the %d jobs in hand (stop again to hand them back)",
                        len(self.held),
                    )
                if not self._draining.is_set():
                    self._fill()
                self._drop_lost()
                for engine in self.engines.values():
                    if engine.running and not self._stopping.is_set():
                        self._step(engine)
                self.source.flush()
        finally:
            self._hand_back_all()
            ended.set()
            self._heartbeat_wakeup.set()
            heartbeat.join(timeout=5)

    def _fill(self) -> None:
        free = {name: e.free_slots for name, e in self.engines.items() if e.free_slots}
        if not free:
            return
        if not self.held:
            self.source.wait_for_work(IDLE_WAIT_SECONDS)
            if self._draining.is_set():
                return
        self._claiming = True
        try:
            claimed = self.source.claim(free)
            for job in claimed:
                self._admit(job)
        finally:
            self._claiming = False
        if claimed:
            self._heartbeat_wakeup.set()

    def _admit(self, job: HeldJob) -> None:
        engine = self.engines[job.model]
        with self._held_lock:
            self.held[job.job_id] = job
        try:
            job.sequence = engine.admit(
                job.prompt,
                job.params,
                on_text=lambda text: self.source.progress(job, text),
                messages=job.messages,
            )
        except EngineError as e:
            log.warning("job %s cannot run: %s", job.job_id, e)
            self._settle(job, self.source.fail, job, f"{type(e).__name__}: {e}")
        except Exception as e:
            self._settle(job, self.source.fault, job, e)

    def _step(self, engine: Engine) -> None:
        try:
            finished = engine.step()
        except EngineError as e:
            # The batch is in an unknown state: end every job in it.
            log.error("the engine failed a step: %s", e)
            for job in self._jobs_of(engine):
                engine.abort(job.sequence)  # type: ignore[arg-type]
                self._settle(job, self.source.fault, job, e)
            return
        for sequence in finished:
            job = self._job_of(sequence)
            if job is None:
                continue
            if job.lost.is_set():
                self._drop(job)
                continue
            generation = sequence.generation()
            self._settle(job, self.source.complete, job, generation, engine.model.sha256)

    def _jobs_of(self, engine: Engine) -> list[HeldJob]:
        with self._held_lock:
            return [j for j in self.held.values() if self.engines[j.model] is engine and j.sequence]

    def _job_of(self, sequence: Sequence) -> HeldJob | None:
        with self._held_lock:
            for job in self.held.values():
                if job.sequence is sequence:
                    return job
        return None

    def _drop_lost(self) -> None:
        for job_id in self.held_ids():
            job = self.held.get(job_id)
            if job is not None and job.lost.is_set():
                self._drop(job)

    def _drop(self, job: HeldJob) -> None:
        """The job is not this miner's any more: stop it and record nothing."""
        tokens = 0
        if job.sequence is not None:
            tokens = self.engines[job.model].abort(job.sequence).completion_tokens
        log.info("job %s was cancelled after %d tokens (or its lease was lost)", job.job_id, tokens)
        self._release(job)

    def _settle(self, job: HeldJob, record: Callable[..., None], *args: Any) -> None:
        """Record a job's outcome with the source (`record(*args)`); whatever that raises is
        the job's fault."""
        try:
            record(*args)
        except Exception as e:
            log.warning("job %s: recording its outcome failed: %s", job.job_id, describe(e))
            try:
                self.source.fault(job, e)
            except Exception as again:
                log.warning("job %s: fault not recorded (%s)", job.job_id, describe(again))
        self.jobs_done += 1
        self._release(job)

    def _release(self, job: HeldJob) -> None:
        with self._held_lock:
            self.held.pop(job.job_id, None)
        try:
            self.source.forget(job)
        except Exception as e:
            log.warning("job %s: %s", job.job_id, describe(e))

    def _hand_back_all(self) -> None:
        for job_id in self.held_ids():
            job = self.held[job_id]
            if job.sequence is not None:
                self.engines[job.model].abort(job.sequence)
            try:
                self.source.hand_back(job)
                log.info("job %s handed back to the queue", job_id)
            except Exception as e:
                # Its lease runs out without heartbeats, and the job is requeued then.
                log.warning("job %s not handed back (%s); its lease will requeue it", job_id, e)
            self._release(job)

    def _renew_leases(self, ended: threading.Event) -> None:
        """Renew the held jobs' leases at a third of the lease, from the first claim on."""
        due: float | None = None  # when the next renewal is due; None while nothing is held
        while True:
            wait = 1.0 if due is None else max(due - time.monotonic(), 0.0)
            self._heartbeat_wakeup.wait(wait)
            self._heartbeat_wakeup.clear()
            if ended.is_set():
                return
            with self._held_lock:
                jobs = list(self.held.values())
            if not jobs:
                due = None
                continue
            period = max(min(job.lease_seconds for job in jobs) / 3, 0.05)
            if due is None:
                due = time.monotonic() + period
                continue
            if time.monotonic() < due:
                continue  # woken by a claim: the new job's lease is fresh
            try:
                lease_seconds = self.source.renew(jobs)
                for job in jobs:
                    job.lease_seconds = lease_seconds
                period = max(lease_seconds / 3, 0.05)
            except Exception as e:
                log.warning("renewing leases failed: %s", describe(e))
            due = time.monotonic() + period
