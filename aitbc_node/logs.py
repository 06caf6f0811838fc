"""The node's logs: one format for its own loggers, Litestar's and uvicorn's, on stderr.

`setup` is called once by `serve` and `miner`. It replaces whatever handlers are installed with
one handler on the root logger, so every library's records come out in the node's format and
obey `--log-level`. Two formats:

- `text`: `2026-11-26T04:10:00.123Z WARNING aitbc_node.node: message request_id=...`
- `json`: one object a line: `time`, `level`, `logger`, `message`, and `request_id`,
  `exception` (the traceback) and the access fields where there are any.

Every record made while a request is being served carries that request's id (`REQUEST_ID`, set
by `requestlog.RequestLog`), so a traceback can be matched to the response that reported it.
The access log (`--access-log`) has a handler of its own, so it prints whatever `--log-level` is.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextvars import ContextVar

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")
ACCESS_LOGGER = "aitbc_node.access"
# The id of the request the current task is serving, if any.
REQUEST_ID: ContextVar[str | None] = ContextVar("aitbc_request_id", default=None)
# What an access record carries besides its message (see `requestlog`).
ACCESS_FIELDS = ("method", "path", "status", "duration_ms", "client")
# Libraries that install handlers of their own; theirs are removed so records reach ours.
FOREIGN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi", "litestar")


def _timestamp(record: logging.LogRecord) -> str:
    """RFC 3339 UTC with milliseconds, as the API writes times."""
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


class _RequestIdFilter(logging.Filter):
    """Stamp each record with the id of the request being served (None outside requests)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = REQUEST_ID.get()
        return True


class TextFormatter(logging.Formatter):
    """`TIME LEVEL LOGGER: MESSAGE request_id=ID`, then the traceback, if any."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {record.levelname} {record.name}: {record.getMessage()}"
        request_id = getattr(record, "request_id", None)
        if request_id:
            line += f" request_id={request_id}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        elif record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object a line (a traceback goes in `exception`, never across lines)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            entry["request_id"] = request_id
        for name in ACCESS_FIELDS:
            if hasattr(record, name):
                entry[name] = getattr(record, name)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def _handler(fmt: str) -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_RequestIdFilter())
    return handler


def setup(level: str = "warning", fmt: str = "text", *, access_log: bool = False) -> None:
    """Send every logger's records through one handler in format `fmt`, at `level` and above.

    With `access_log`, the access logger prints one line per request whatever the level.
    """
    if level not in LEVELS or fmt not in FORMATS:
        raise ValueError(f"log level {level!r} or format {fmt!r} is not known")
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(_handler(fmt))
    root.setLevel(level.upper())
    for name in FOREIGN_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.setLevel(logging.NOTSET)
        logger.propagate = True
    # uvicorn's own access log stays off: ours carries the request id.
    logging.getLogger("uvicorn.access").disabled = True
    access = logging.getLogger(ACCESS_LOGGER)
    access.handlers.clear()
    access.propagate = False
    access.disabled = not access_log
    if access_log:
        access.setLevel(logging.INFO)
        access.addHandler(_handler(fmt))
