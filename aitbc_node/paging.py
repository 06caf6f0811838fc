"""Paging for list endpoints: a bounded `limit` and an opaque cursor (newest first)."""

from __future__ import annotations

import base64

from aitbc_node.errors import BadRequest
from aitbc_node.store import Row

# Sequence numbers are SQLite integers; a cursor past the largest is not one the node made.
MAX_SEQ = 2**63 - 1


def encode_cursor(seq: int) -> str:
    """An opaque cursor for the rows below sequence number `seq`."""
    return base64.urlsafe_b64encode(f"s{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """The sequence number inside a cursor; 400 for one this node did not make."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        digits = raw[1:]
        if not raw.startswith("s") or not (digits.isascii() and digits.isdigit()):
            raise ValueError(raw)
        seq = int(digits)
        if seq > MAX_SEQ:
            raise ValueError(raw)
        return seq
    except ValueError:
        raise BadRequest(
            "cursor is not one this node gave out", error_code="INVALID_CURSOR"
        ) from None


def page(rows: list[Row], limit: int, key: str = "seq") -> tuple[list[Row], str | None]:
    """Split `limit + 1` fetched rows into one page and the cursor for the next."""
    items = rows[:limit]
    return items, encode_cursor(items[-1][key]) if len(rows) > limit else None


def before_cursor(cursor: str | None) -> int:
    """The sequence number a page starts below (everything, without a cursor)."""
    return decode_cursor(cursor) if cursor else MAX_SEQ
