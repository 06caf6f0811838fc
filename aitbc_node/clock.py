"""Time as the node stores it (integer milliseconds since the epoch) and shows it (RFC 3339 UTC)."""

from __future__ import annotations

import time
from datetime import UTC, datetime


def now_ms() -> int:
    """The current time in whole milliseconds since the Unix epoch."""
    return time.time_ns() // 1_000_000


def rfc3339(ms: int | None) -> str | None:
    """Render epoch milliseconds as `2026-01-24T15:00:05.123Z`; None stays None."""
    if ms is None:
        return None
    moment = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"
