"""Time as the node stores it (integer milliseconds since the epoch) and shows it (RFC 3339 UTC)."""

from __future__ import annotations

import time
from functools import lru_cache


def now_ms() -> int:
    """The current time in whole milliseconds since the Unix epoch."""
    return time.time_ns() // 1_000_000


def rfc3339(ms: int | None) -> str | None:
    """Render epoch milliseconds as `2026-01-24T15:00:05.123Z`; None stays None."""
    if ms is None:
        return None
    return f"{_utc_second(ms // 1000)}.{ms % 1000:03d}Z"


@lru_cache(maxsize=4096)
def _utc_second(seconds: int) -> str:
    """`2026-01-24T15:00:05` for epoch `seconds`: a job's view shows up to four times, each
    rendered on every read of it, and recent seconds repeat, so they are kept."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
