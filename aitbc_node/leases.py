"""The lease reaper: a thread that requeues (or fails) jobs whose miner stopped renewing."""

from __future__ import annotations

import logging

from aitbc_node.background import Loop
from aitbc_node.clock import now_ms
from aitbc_node.jobs import Jobs
from aitbc_node.metrics import Metrics

log = logging.getLogger("aitbc_node.leases")

# The reaper sleeps until the soonest lease runs out, but never longer than this, so a lease
# granted while it sleeps is still seen soon after it expires.
MAX_SLEEP_SECONDS = 1.0
MIN_SLEEP_SECONDS = 0.02


class LeaseReaper(Loop):
    """Runs `Jobs.expire_leases` whenever a lease may have run out."""

    def __init__(self, jobs: Jobs, metrics: Metrics | None = None) -> None:
        super().__init__("lease-reaper", self.reap)
        self.jobs = jobs
        self.metrics = metrics if metrics is not None else jobs.metrics

    def reap(self) -> float:
        """One pass; returns the seconds until the soonest lease runs out (capped)."""
        outcome = self.jobs.expire_leases()
        self.metrics.leases_expired(
            requeued=len(outcome["requeued"]), failed=len(outcome["failed"])
        )
        for job_id in outcome["requeued"]:
            log.warning("lease of %s ran out; job requeued", job_id)
        for job_id in outcome["failed"]:
            log.warning("lease of %s ran out too often; job failed", job_id)
        soonest = self.jobs.next_lease_expiry_ms()
        if soonest is None:
            return MAX_SLEEP_SECONDS
        return min(max((soonest - now_ms()) / 1000 + 0.005, MIN_SLEEP_SECONDS), MAX_SLEEP_SECONDS)
