"""The lease reaper: a thread that requeues (or fails) jobs whose miner stopped renewing."""

from __future__ import annotations

import logging
import threading

from aitbc_node.clock import now_ms
from aitbc_node.jobs import Jobs

log = logging.getLogger("aitbc_node.leases")

# The reaper sleeps until the soonest lease runs out, but never longer than this, so a lease
# granted while it sleeps is still seen soon after it expires.
MAX_SLEEP_SECONDS = 1.0
MIN_SLEEP_SECONDS = 0.02


class LeaseReaper:
    """Runs `Jobs.expire_leases` whenever a lease may have run out."""

    def __init__(self, jobs: Jobs) -> None:
        self.jobs = jobs
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-reaper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                outcome = self.jobs.expire_leases()
                for job_id in outcome["requeued"]:
                    log.warning("lease of %s ran out; job requeued", job_id)
                for job_id in outcome["failed"]:
                    log.warning("lease of %s ran out too often; job failed", job_id)
                soonest = self.jobs.next_lease_expiry_ms()
            except Exception:
                log.exception("lease reaper pass failed")
                soonest = None
            wait = MAX_SLEEP_SECONDS
            if soonest is not None:
                wait = min(max((soonest - now_ms()) / 1000 + 0.005, MIN_SLEEP_SECONDS), wait)
            self._stop.wait(wait)
