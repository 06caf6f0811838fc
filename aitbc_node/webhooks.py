"""Webhooks: clients register URLs, and the node posts their jobs' ends to them.

An event (`job.completed`, `job.failed`, `job.cancelled`) becomes one row per subscribed webhook
in the `deliveries` outbox, written in the same transaction as the job's change, so a crash or
restart never loses one; `delivery.py` sends them. Each request carries:

    AITBC-Event: job.completed
    AITBC-Event-Id: evt-...          (the same on every retry: receivers drop repeats by it)
    AITBC-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + raw body)>

so a receiver can reject forgeries (the HMAC) and replays (an old `t` or a seen event id).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from typing import Any
from urllib.parse import urlsplit

from aitbc_node.clock import now_ms, rfc3339
from aitbc_node.config import Limits
from aitbc_node.destinations import DestinationPolicy, NotAllowed
from aitbc_node.errors import BadRequest, Conflict, Forbidden, NotFound
from aitbc_node.jobs import job_view
from aitbc_node.keys import Principal
from aitbc_node.paging import before_cursor, page
from aitbc_node.schemas import CreateWebhook
from aitbc_node.store import Connection, Row, Store

EVENTS = ("job.completed", "job.failed", "job.cancelled")
EVENT_FOR_STATUS = {
    "completed": "job.completed",
    "failed": "job.failed",
    "cancelled": "job.cancelled",
}
MAX_WEBHOOKS_PER_CLIENT = 20
MAX_URL_CHARS = 2048


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The `AITBC-Signature` header value for `body` sent at `timestamp`."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def check_signature(secret: str, header: str, body: bytes) -> bool:
    """True when `header` is a valid `AITBC-Signature` of `body` (receivers' side)."""
    try:
        fields = dict(part.split("=", 1) for part in header.split(","))
        expected = sign(secret, int(fields["t"]), body)
    except (KeyError, ValueError):
        return False
    return hmac.compare_digest(expected, header)


def validate_url(url: Any, destinations: DestinationPolicy) -> str:
    """An http or https URL with a host that `destinations` allows; 400 otherwise."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL_CHARS:
        raise BadRequest("url must be an http or https URL", error_code="INVALID_URL")
    try:
        parts = urlsplit(url)
        host, _port = parts.hostname, parts.port  # .port raises on a bad port
    except ValueError as e:
        raise BadRequest(f"url cannot be parsed: {e}", error_code="INVALID_URL") from None
    if parts.scheme not in ("http", "https") or not host:
        raise BadRequest(
            "url must be an http:// or https:// URL with a host", error_code="INVALID_URL"
        )
    try:
        # A name the operator allowed is taken unresolved; the dispatcher resolves it per send.
        destinations.check_url(url, resolve=False)
    except NotAllowed as e:
        raise BadRequest(str(e), error_code="WEBHOOK_URL_NOT_ALLOWED") from None
    return url


def _webhook_view(row: Row) -> dict[str, Any]:
    return {
        "webhook_id": row["webhook_id"],
        "url": row["url"],
        "events": json.loads(row["events"]),
        "created_at": rfc3339(row["created_ms"]),
    }


class Webhooks:
    """Registration, the outbox, and the delivery log."""

    def __init__(
        self, store: Store, limits: Limits, destinations: DestinationPolicy | None = None
    ) -> None:
        self.store = store
        self.limits = limits
        # Where webhooks may point: checked at registration here, again by the dispatcher.
        self.destinations = destinations or DestinationPolicy()
        self.on_enqueued: Any = None  # set by the dispatcher: wakes it after a commit

    def create(self, principal: Principal, request: CreateWebhook) -> dict[str, Any]:
        """Register a webhook for `principal`; the answer holds its secret, shown this once."""
        principal.require("client", "admin")
        url = validate_url(request.url, self.destinations)
        events = request.events
        row = {
            "webhook_id": f"wh-{secrets.token_hex(8)}",
            "client": principal.identity,
            "url": url,
            "events": json.dumps(sorted(set(events))),
            "secret": f"whsec_{secrets.token_urlsafe(32)}",
            "created_ms": now_ms(),
        }
        with self.store.write() as db:
            count = db.one(
                "SELECT count(*) AS n FROM webhooks WHERE client = ? AND deleted_ms IS NULL",
                (principal.identity,),
            )
            if count and count["n"] >= MAX_WEBHOOKS_PER_CLIENT:
                raise Conflict(
                    f"a client may have {MAX_WEBHOOKS_PER_CLIENT} webhooks; delete one first",
                    error_code="TOO_MANY_WEBHOOKS",
                )
            db.execute(
                "INSERT INTO webhooks (webhook_id, client, url, events, secret, created_ms)"
                " VALUES (:webhook_id, :client, :url, :events, :secret, :created_ms)",
                row,
            )
        # The secret is shown this once; the node keeps it only to sign deliveries.
        return {**_webhook_view(row), "secret": row["secret"]}

    def list(self, principal: Principal) -> dict[str, Any]:
        principal.require("client", "admin")
        rows = self.store.read().execute(
            "SELECT * FROM webhooks WHERE client = ? AND deleted_ms IS NULL ORDER BY created_ms",
            (principal.identity,),
        )
        return {"webhooks": [_webhook_view(r) for r in rows]}

    def _owned(self, db: Connection, principal: Principal, webhook_id: str) -> Row:
        principal.require("client", "admin")
        row = db.one(
            "SELECT * FROM webhooks WHERE webhook_id = ? AND deleted_ms IS NULL", (webhook_id,)
        )
        if row is None:
            raise NotFound(f"webhook {webhook_id} not found", error_code="WEBHOOK_NOT_FOUND")
        if row["client"] != principal.identity and principal.role != "admin":
            raise Forbidden(f"webhook {webhook_id} is not yours", error_code="NOT_YOUR_WEBHOOK")
        return row

    def delete(self, principal: Principal, webhook_id: str) -> dict[str, Any]:
        """Delete a webhook; events not yet delivered to it are dropped."""
        with self.store.write() as db:
            self._owned(db, principal, webhook_id)
            db.execute(
                "UPDATE webhooks SET deleted_ms = ? WHERE webhook_id = ?", (now_ms(), webhook_id)
            )
            db.execute(
                "UPDATE deliveries SET state = 'failed' WHERE webhook_id = ? AND state = 'pending'",
                (webhook_id,),
            )
        return {"webhook_id": webhook_id, "deleted": True}

    def deliveries(
        self, principal: Principal, webhook_id: str, limit: int, cursor: str | None
    ) -> dict[str, Any]:
        """A webhook's events, newest first, each with every attempt made to deliver it."""
        db = self.store.read()
        self._owned(db, principal, webhook_id)
        rows = db.execute(
            "SELECT * FROM deliveries WHERE webhook_id = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
            (webhook_id, before_cursor(cursor), limit + 1),
        )
        items, next_cursor = page(rows, limit)
        out = []
        for row in items:
            attempts = db.execute(
                "SELECT * FROM delivery_attempts WHERE event_id = ? ORDER BY seq",
                (row["event_id"],),
            )
            out.append(
                {
                    "event_id": row["event_id"],
                    "event": row["event"],
                    "job_id": row["job_id"],
                    "state": row["state"],
                    "next_attempt_at": (
                        rfc3339(row["next_attempt_ms"]) if row["state"] == "pending" else None
                    ),
                    "attempts": [
                        {
                            "attempt": a["attempt"],
                            "at": rfc3339(a["started_ms"]),
                            "duration_ms": a["duration_ms"],
                            "status_code": a["status_code"],
                            "error": a["error"],
                        }
                        for a in attempts
                    ],
                }
            )
        return {"deliveries": out, "next_cursor": next_cursor}

    def enqueue(self, db: Connection, job: Row) -> int:
        """Queue the event of a job that just ended (its row, as written) for each of its
        client's webhooks that wants it, inside the job change's own transaction."""
        event = EVENT_FOR_STATUS[job["status"]]
        hooks = db.execute(
            "SELECT webhook_id, events FROM webhooks WHERE client = ? AND deleted_ms IS NULL",
            (job["client"],),
        )
        wanted = [h for h in hooks if event in json.loads(h["events"])]
        if not wanted:  # the common case: no view to build
            return 0
        now = now_ms()
        view = job_view(job)
        for hook in wanted:
            event_id = f"evt-{secrets.token_hex(8)}"
            body = {
                "event": event,
                "event_id": event_id,
                "created_at": rfc3339(now),
                "job": view,
                "receipt_id": view["receipt_id"],
            }
            db.execute(
                "INSERT INTO deliveries (event_id, webhook_id, event, job_id, body, state,"
                " next_attempt_ms, created_ms) VALUES (?, ?, ?, ?, ?, 'pending', ?, ?)",
                (
                    event_id,
                    hook["webhook_id"],
                    event,
                    job["job_id"],
                    json.dumps(body, separators=(",", ":")),
                    now,
                    now,
                ),
            )
        return len(wanted)

    def wake(self) -> None:
        """Tell the dispatcher new deliveries are due, once the enqueuing commit is on disk
        (see `Store.after_commit`)."""
        if self.on_enqueued is not None:
            self.store.after_commit(self.on_enqueued)
