"""Rate limits: a token bucket per API key (rate and burst set per role) and one per client
address for the public reads. Over the limit a request gets 429 `RATE_LIMITED` with a
`Retry-After` of the whole seconds until a request would succeed.

The buckets live in this process's memory; the node is one process, so they hold across all
of its requests.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from aitbc_node.errors import TooManyRequests

MAX_BUCKETS = 100_000  # past this, the least recently used buckets (all full again) go


@dataclass(frozen=True)
class Rate:
    """`per_second` requests a second on average, `burst` at once."""

    per_second: float
    burst: int

    @classmethod
    def parse(cls, text: str) -> Rate | None:
        """`RATE[/BURST]` (per second); `0` or `off` means no limit."""
        if text in ("0", "off", "none"):
            return None
        rate_text, _, burst_text = text.partition("/")
        per_second = float(rate_text)
        burst = int(burst_text) if burst_text else max(1, math.ceil(per_second * 2))
        if per_second <= 0 or burst < 1:
            raise ValueError(f"a rate must be positive with a burst of at least 1: {text!r}")
        return cls(per_second, burst)

    def __str__(self) -> str:
        return f"{self.per_second:g}/{self.burst}"


DEFAULT_RATES: dict[str, Rate | None] = {
    "client": Rate(50, 100),
    "miner": Rate(200, 400),
    "admin": None,
    "public": Rate(50, 100),
}


class RateLimiter:
    """Token buckets by key, refilled continuously."""

    def __init__(self, rates: dict[str, Rate | None]) -> None:
        self.rates = rates
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def check(self, role: str, key: str) -> None:
        """Take one token from `key`'s bucket, or raise 429 saying when to come back."""
        rate = self.rates.get(role)
        if rate is None:
            return
        bucket = f"{role}:{key}"
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.pop(bucket, (float(rate.burst), now))
            tokens = min(rate.burst, tokens + (now - last) * rate.per_second)
            if tokens >= 1:
                self._buckets[bucket] = (tokens - 1, now)
                allowed = True
            else:
                self._buckets[bucket] = (tokens, now)
                allowed = False
            while len(self._buckets) > MAX_BUCKETS:
                self._buckets.popitem(last=False)
        if not allowed:
            wait = math.ceil((1 - tokens) / rate.per_second)
            raise TooManyRequests(
                f"rate limit of {rate.per_second:g} requests a second (burst {rate.burst}) "
                f"reached; retry in {wait} s",
                error_code="RATE_LIMITED",
                headers={"Retry-After": str(max(1, wait))},
            )
