"""Jobs: submission, the state machine, and the views the API shows.

    pending -> running (claimed by one miner, with a lease) -> completed | failed
    pending | running -> cancelled (by the owner)

Every change is one statement guarded by the state it expects, inside `BEGIN IMMEDIATE`, so two
miners can never hold the same job and a terminal state is never left. When such a guarded
statement changes nothing, `_explain` reads the row to say why, with the right status code.
"""

from __future__ import annotations

import json
import math
import secrets
from typing import TYPE_CHECKING, Any

from aitbc_node.clock import now_ms, rfc3339
from aitbc_node.config import JobRules, Limits
from aitbc_node.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    PaymentRequired,
    TooManyRequests,
)
from aitbc_node.keys import Principal
from aitbc_node.ledger import Ledger, balance, client_address, format_ait
from aitbc_node.miners import Miners
from aitbc_node.paging import decode_cursor, page, parse_limit
from aitbc_node.receipts import hash_result
from aitbc_node.signals import Signals
from aitbc_node.signing import verify_signature
from aitbc_node.store import Connection, Row, Store

if TYPE_CHECKING:
    from aitbc_node.webhooks import Webhooks

STATUSES = ("pending", "running", "completed", "failed", "cancelled")
TERMINAL = ("completed", "failed", "cancelled")
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 64
MAX_SEED = 2**32 - 1


def new_job_id() -> str:
    return f"job-{secrets.token_hex(8)}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def validate_params(params: Any, limits: Limits) -> dict[str, Any]:
    """Check a job's params and return them with defaults filled in; 400 names what is wrong."""
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise BadRequest("params must be an object", error_code="INVALID_PARAMS")
    known = {"max_tokens", "temperature", "top_p", "seed", "stop"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise BadRequest(
            f"unknown params: {', '.join(unknown)} (known: {', '.join(sorted(known))})",
            error_code="UNKNOWN_PARAMS",
        )
    out: dict[str, Any] = {
        "max_tokens": params.get("max_tokens", limits.default_max_tokens),
        "temperature": params.get("temperature", 0.7),
        "top_p": params.get("top_p", 0.95),
        "seed": params.get("seed"),
        "stop": params.get("stop", []),
    }
    problems = []
    if not _is_int(out["max_tokens"]) or not 1 <= out["max_tokens"] <= limits.max_tokens:
        problems.append(f"max_tokens must be an integer from 1 to {limits.max_tokens}")
    if not _is_number(out["temperature"]) or not 0 <= out["temperature"] <= 2:
        problems.append("temperature must be a number from 0 to 2")
    if not _is_number(out["top_p"]) or not 0 < out["top_p"] <= 1:
        problems.append("top_p must be a number greater than 0 and at most 1")
    if out["seed"] is not None and (not _is_int(out["seed"]) or not 0 <= out["seed"] <= MAX_SEED):
        problems.append(f"seed must be an integer from 0 to {MAX_SEED}")
    stop = out["stop"]
    if isinstance(stop, str):
        stop = out["stop"] = [stop]
    if (
        not isinstance(stop, list)
        or len(stop) > MAX_STOP_SEQUENCES
        or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop)
    ):
        problems.append(
            f"stop must be a string or a list of at most {MAX_STOP_SEQUENCES} non-empty strings"
            f" of at most {MAX_STOP_CHARS} characters"
        )
    if problems:
        raise BadRequest("; ".join(problems), error_code="INVALID_PARAMS")
    return out


def job_view(row: Row) -> dict[str, Any]:
    """A job as the API shows it."""
    usage = None
    if row["prompt_tokens"] is not None or row["completion_tokens"] is not None:
        prompt_tokens = row["prompt_tokens"] or 0
        completion_tokens = row["completion_tokens"] or 0
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }
    return {
        "job_id": row["job_id"],
        "status": row["status"],
        "model": row["model"],
        "served_model": row["served_model"],
        "prompt": row["prompt"],
        "params": json.loads(row["params"]),
        "result": row["result"],
        "error": row["error"],
        "error_code": row["error_code"],
        "miner_id": row["miner_id"],
        "attempts": row["attempts"],
        "usage": usage,
        "created_at": rfc3339(row["created_ms"]),
        "started_at": rfc3339(row["started_ms"]),
        "completed_at": rfc3339(row["completed_ms"]),
        "lease_expires_at": (
            rfc3339(row["lease_expires_ms"]) if row["status"] == "running" else None
        ),
        "receipt_id": row["receipt_id"],
    }


class Jobs:
    """The job rules over the store."""

    def __init__(
        self,
        store: Store,
        miners: Miners,
        signals: Signals,
        ledger: Ledger,
        webhooks: Webhooks,
        rules: JobRules,
        limits: Limits,
    ) -> None:
        self.store = store
        self.ledger = ledger
        self.webhooks = webhooks
        self.miners = miners
        self.signals = signals
        self.rules = rules
        self.limits = limits

    # -- clients -------------------------------------------------------------------------

    def resolve_model(self, requested: str) -> str:
        """The model a request for `requested` runs on; 400 when no miner serves it."""
        served_model = self.rules.aliases.get(requested, requested)
        served = self.miners.served_models()
        if served_model in served or self.rules.accept_unserved_models:
            return served_model
        aliases = [f"{a} -> {m}" for a, m in sorted(self.rules.aliases.items()) if m in served]
        detail = (
            f"no miner serves model {requested!r}; served models: {', '.join(served) or 'none'}"
        )
        if aliases:
            detail += f"; aliases: {', '.join(aliases)}"
        raise BadRequest(detail, error_code="UNKNOWN_MODEL")

    def submit(self, principal: Principal, body: Any) -> dict[str, Any]:
        """Validate and store a new pending job for `principal`, then wake the miners."""
        principal.require("client", "admin")
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object", error_code="INVALID_BODY")
        _reject_unknown(body, {"prompt", "model", "params"})
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise BadRequest("prompt must be a non-empty string", error_code="INVALID_PROMPT")
        if len(prompt) > self.limits.max_prompt_chars:
            raise BadRequest(
                f"prompt is {len(prompt)} characters; the limit is {self.limits.max_prompt_chars}",
                error_code="PROMPT_TOO_LONG",
            )
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("model must be a non-empty string", error_code="INVALID_MODEL")
        params = validate_params(body.get("params"), self.limits)
        served_model = self.resolve_model(model)
        with self.store.write() as db:
            self._check_queue(db, principal.identity)
            if self.rules.require_funds:
                self._check_funds(db, principal.identity, served_model, params["max_tokens"])
            row = db.one(
                "INSERT INTO jobs (job_id, client, prompt, model, served_model, params, status,"
                " created_ms) VALUES (?, ?, ?, ?, ?, ?, 'pending', ?) RETURNING *",
                (
                    new_job_id(),
                    principal.identity,
                    prompt,
                    model,
                    served_model,
                    json.dumps(params),
                    now_ms(),
                ),
            )
        self.signals.work_available()
        assert row is not None
        return job_view(row)

    def _check_queue(self, db: Connection, identity: str) -> None:
        """429 `QUEUE_FULL` when the client's or the node's pending jobs are at their bound."""
        mine = db.one(
            "SELECT count(*) AS n FROM jobs WHERE client = ? AND status = 'pending'", (identity,)
        )
        everyone = db.one("SELECT count(*) AS n FROM jobs WHERE status = 'pending'")
        assert mine is not None and everyone is not None
        for pending, bound, whose in (
            (mine["n"], self.limits.max_pending_per_client, "your"),
            (everyone["n"], self.limits.max_pending, "this node's"),
        ):
            if pending >= bound:
                wait = self._drain_seconds(db, pending - bound + 1)
                raise TooManyRequests(
                    f"{whose} queue is full ({pending} pending jobs, the bound is {bound});"
                    f" retry in about {wait} s",
                    error_code="QUEUE_FULL",
                    headers={"Retry-After": str(wait)},
                )

    def _drain_seconds(self, db: Connection, jobs: int) -> int:
        """About how long until `jobs` more jobs leave the queue, from recent service times."""
        recent = db.one(
            "SELECT avg(completed_ms - started_ms) AS ms FROM (SELECT completed_ms, started_ms"
            " FROM jobs WHERE status = 'completed' ORDER BY seq DESC LIMIT 50)"
        )
        per_job_ms = (recent or {}).get("ms") or 1000
        miners = max(1, sum(1 for m in self.miners.list() if m["online"]))
        return max(1, math.ceil(per_job_ms * jobs / miners / 1000))

    def _check_funds(self, db: Connection, identity: str, model: str, max_tokens: int) -> None:
        """402 unless the client's balance covers `max_tokens` of `model`."""
        address = client_address(identity)
        worst_case = max_tokens * self.ledger.pricing.unit_price(model)
        held = balance(db, address)
        if held < worst_case:
            raise PaymentRequired(
                f"{address} holds {format_ait(held)} AIT; max_tokens={max_tokens} of {model}"
                f" may cost up to {format_ait(worst_case)} AIT",
                error_code="INSUFFICIENT_FUNDS",
            )

    def _visible_row(self, principal: Principal, job_id: str) -> Row:
        row = self.store.read().one("SELECT * FROM jobs WHERE job_id = ?", (job_id,))
        if row is None:
            raise NotFound(f"job {job_id} not found", error_code="JOB_NOT_FOUND")
        if not self._may_see(principal, row):
            raise Forbidden(f"job {job_id} is not yours", error_code="NOT_YOUR_JOB")
        return row

    @staticmethod
    def _may_see(principal: Principal, row: Row) -> bool:
        if principal.role == "admin":
            return True
        if principal.role == "client":
            return row["client"] == principal.identity
        return row["miner_id"] == principal.identity

    def get(self, principal: Principal, job_id: str) -> dict[str, Any]:
        """One job, if `principal` may see it."""
        return job_view(self._visible_row(principal, job_id))

    def peek(self, job_id: str) -> dict[str, Any]:
        """One job's view, with no access check: for a caller that already made one."""
        row = self.store.read().one("SELECT * FROM jobs WHERE job_id = ?", (job_id,))
        if row is None:
            raise NotFound(f"job {job_id} not found", error_code="JOB_NOT_FOUND")
        return job_view(row)

    def list(
        self,
        principal: Principal,
        status: str | None,
        limit_param: str | None,
        cursor: str | None,
    ) -> dict[str, Any]:
        """The jobs `principal` may see, newest first, a page at a time."""
        if status is not None and status not in STATUSES:
            raise BadRequest(
                f"status must be one of {', '.join(STATUSES)}", error_code="INVALID_STATUS"
            )
        limit = parse_limit(limit_param, self.limits)
        where, args = [], []
        if principal.role == "client":
            where.append("client = ?")
            args.append(principal.identity)
        elif principal.role == "miner":
            where.append("miner_id = ?")
            args.append(principal.identity)
        if status is not None:
            where.append("status = ?")
            args.append(status)
        if cursor:
            where.append("seq < ?")
            args.append(decode_cursor(cursor))
        sql = "SELECT * FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq DESC LIMIT ?"
        rows = self.store.read().execute(sql, (*args, limit + 1))
        items, next_cursor = page(rows, limit)
        return {"jobs": [job_view(r) for r in items], "next_cursor": next_cursor}

    def cancel(self, principal: Principal, job_id: str) -> dict[str, Any]:
        """Cancel a pending or running job of `principal`'s; 409 once it has ended."""
        principal.require("client", "admin")
        with self.store.write() as db:
            row = db.one("SELECT * FROM jobs WHERE job_id = ?", (job_id,))
            if row is None:
                raise NotFound(f"job {job_id} not found", error_code="JOB_NOT_FOUND")
            if not self._may_see(principal, row):
                raise Forbidden(f"job {job_id} is not yours", error_code="NOT_YOUR_JOB")
            if row["status"] in TERMINAL:
                raise Conflict(
                    f"job {job_id} is already {row['status']}", error_code="JOB_ALREADY_FINISHED"
                )
            row = db.one(
                "UPDATE jobs SET status = 'cancelled', completed_ms = ?, lease_expires_ms = NULL"
                " WHERE job_id = ? RETURNING *",
                (now_ms(), job_id),
            )
            assert row is not None
            queued = self.webhooks.enqueue(db, row)
        self.signals.job_cancelled(job_id)
        if queued:
            self.webhooks.wake()
        return job_view(row)

    # -- miners --------------------------------------------------------------------------

    def available(self, principal: Principal, miner_id: str | None, limit: int = 10) -> dict:
        """Pending jobs for the models `miner_id` registered, oldest first."""
        miner = self.miners.require_registered(principal, miner_id)
        rows = self.store.read().execute(
            "SELECT * FROM jobs WHERE status = 'pending' AND served_model IN"
            " (SELECT value FROM json_each(?)) ORDER BY seq LIMIT ?",
            (miner["capabilities"], limit),
        )
        return {"jobs": [job_view(r) for r in rows]}

    def claim(self, principal: Principal, job_id: str, body: Any) -> dict[str, Any]:
        """Claim `job_id` for the miner in `body`: exactly one of racing claims wins."""
        miner_id = _miner_id_of(body)
        _reject_unknown(body, {"miner_id"})
        miner = self.miners.require_registered(principal, miner_id)
        row = self.claim_as(miner["miner_id"], miner["capabilities"], job_id)
        return job_view(row)

    def claim_as(self, miner_id: str, capabilities_json: str, job_id: str | None) -> Row:
        """Claim `job_id`, or with None the oldest job for these models (NotFound if none)."""
        now = now_ms()
        target = (
            "job_id = :job_id"
            if job_id is not None
            else "seq = (SELECT seq FROM jobs WHERE status = 'pending' AND served_model IN"
            " (SELECT value FROM json_each(:caps)) ORDER BY seq LIMIT 1)"
        )
        with self.store.write(durable=False) as db:
            row = db.one(
                "UPDATE jobs SET status = 'running', miner_id = :miner, attempts = attempts + 1,"
                " started_ms = :now, lease_expires_ms = :lease"
                f" WHERE {target} AND status = 'pending'"
                " AND served_model IN (SELECT value FROM json_each(:caps)) RETURNING *",
                {
                    "job_id": job_id,
                    "miner": miner_id,
                    "now": now,
                    "lease": now + self.rules.lease_ms,
                    "caps": capabilities_json,
                },
            )
            if row is None:
                if job_id is None:
                    raise NotFound("no pending job for these models", error_code="NO_JOB")
                self._explain(db, job_id, miner_id, action="claim")
        assert row is not None
        self.signals.job_changed(row["job_id"])
        return row

    def progress(self, principal: Principal, job_id: str, body: Any) -> dict[str, Any]:
        """Text a remote miner has generated so far for a job it holds (for streams)."""
        miner_id = _miner_id_of(body)
        _reject_unknown(body, {"miner_id", "text"})
        text = body.get("text")
        if not isinstance(text, str) or len(text) > self.limits.max_result_chars:
            raise BadRequest("text must be a string", error_code="INVALID_TEXT")
        self.miners.require_registered(principal, miner_id)
        row = self.store.read().one("SELECT status, miner_id FROM jobs WHERE job_id = ?", (job_id,))
        if row is None or row["status"] != "running" or row["miner_id"] != miner_id:
            self._explain(self.store.read(), job_id, miner_id, action="report progress on")
        if text:
            self.signals.text_generated(job_id, text)
        return {"job_id": job_id, "accepted": len(text)}

    def heartbeat(self, principal: Principal, miner_id: str) -> dict[str, Any]:
        """Renew the leases of every job `miner_id` is running."""
        self.miners.require_registered(principal, miner_id)
        renewed = self.renew_leases(miner_id)
        return {"miner_id": miner_id, "renewed": renewed, "lease_seconds": self.rules.lease_seconds}

    def renew_leases(self, miner_id: str) -> list[str]:
        """Push the lease of each running job of `miner_id` a full lease into the future."""
        with self.store.write(durable=False) as db:
            rows = db.execute(
                "UPDATE jobs SET lease_expires_ms = ? WHERE miner_id = ? AND status = 'running'"
                " RETURNING job_id",
                (now_ms() + self.rules.lease_ms, miner_id),
            )
        return [r["job_id"] for r in rows]

    def complete(self, principal: Principal, job_id: str, body: Any) -> dict[str, Any]:
        """Record a remote miner's result."""
        miner_id = _miner_id_of(body)
        _reject_unknown(
            body, {"miner_id", "result", "completed_at", "usage", "model_sha256", "miner_signature"}
        )
        model_sha256 = body.get("model_sha256", "unreported")
        if not isinstance(model_sha256, str) or not 0 < len(model_sha256) <= 128:
            raise BadRequest(
                "model_sha256 must be the hex SHA-256 of the model file",
                error_code="INVALID_MODEL_SHA256",
            )
        result = body.get("result")
        if not isinstance(result, str):
            raise BadRequest("result must be a string", error_code="INVALID_RESULT")
        if len(result) > self.limits.max_result_chars:
            raise BadRequest(
                f"result is longer than {self.limits.max_result_chars} characters",
                error_code="RESULT_TOO_LONG",
            )
        usage = body.get("usage") or {}
        if not isinstance(usage, dict) or not all(
            _is_int(usage.get(k, 0)) and usage.get(k, 0) >= 0
            for k in ("prompt_tokens", "completion_tokens")
        ):
            raise BadRequest(
                "usage must be an object with non-negative integer prompt_tokens and"
                " completion_tokens",
                error_code="INVALID_USAGE",
            )
        miner_signature = body.get("miner_signature")
        # Validate everything before the first write (the miner's last_seen), so a bad
        # request leaves the store exactly as it was.
        registered = self.store.read().one(
            "SELECT public_key FROM miners WHERE miner_id = ?", (miner_id,)
        )
        if registered is not None:
            check_miner_signature(registered["public_key"], miner_signature, result)
        self.miners.require_registered(principal, miner_id)
        row = self.finish(
            job_id,
            miner_id,
            result=result,
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens"),
            model_sha256=model_sha256,
            miner_signature=miner_signature,
        )
        return job_view(row)

    def fail(self, principal: Principal, job_id: str, body: Any) -> dict[str, Any]:
        """Record that a remote miner could not run the job."""
        miner_id = _miner_id_of(body)
        _reject_unknown(body, {"miner_id", "error"})
        error = body.get("error")
        if not isinstance(error, str) or not error:
            raise BadRequest("error must be a non-empty string", error_code="INVALID_ERROR")
        self.miners.require_registered(principal, miner_id)
        row = self.finish(job_id, miner_id, error=error[:4000], error_code="MINER_ERROR")
        return job_view(row)

    def finish(
        self,
        job_id: str,
        miner_id: str,
        *,
        result: str | None = None,
        error: str | None = None,
        error_code: str | None = None,
        prompt_tokens: int | None = None,
        completion_tokens: int | None = None,
        model_sha256: str = "unreported",
        miner_signature: dict[str, str] | None = None,
    ) -> Row:
        """Move a job this miner holds to completed (a result) or failed (an error).

        A completion writes the job, its signed receipt and its payment in one transaction.
        """
        status = "failed" if error is not None else "completed"
        with self.store.write() as db:
            row = db.one(
                "UPDATE jobs SET status = ?, result = ?, error = ?, error_code = ?,"
                " prompt_tokens = ?, completion_tokens = ?, completed_ms = ?,"
                " lease_expires_ms = NULL"
                " WHERE job_id = ? AND status = 'running' AND miner_id = ? RETURNING *",
                (
                    status,
                    result,
                    error,
                    error_code,
                    prompt_tokens,
                    completion_tokens,
                    now_ms(),
                    job_id,
                    miner_id,
                ),
            )
            if row is None:
                action = "complete" if status == "completed" else "fail"
                self._explain(db, job_id, miner_id, action=action)
            assert row is not None
            if status == "completed":
                receipt = self.ledger.issue_receipt(
                    db, row, model_sha256=model_sha256, miner_signature=miner_signature
                )
                row["receipt_id"] = receipt["receipt_id"]
            queued = self.webhooks.enqueue(db, row)
        self.signals.job_changed(job_id, finished=True)
        if queued:
            self.webhooks.wake()
        return row

    def release(self, job_id: str, miner_id: str) -> bool:
        """Hand a claimed job back to the queue without counting the attempt (clean shutdown)."""
        with self.store.write() as db:
            db.execute(
                "UPDATE jobs SET status = 'pending', miner_id = NULL, started_ms = NULL,"
                " lease_expires_ms = NULL, attempts = max(attempts - 1, 0)"
                " WHERE job_id = ? AND status = 'running' AND miner_id = ?",
                (job_id, miner_id),
            )
            released = db.changes() > 0
        if released:
            self.signals.forget_text(job_id)
            self.signals.job_changed(job_id)
            self.signals.work_available()
        return released

    def expire_leases(self) -> dict[str, list[str]]:
        """Requeue running jobs whose lease ran out, or fail them once out of attempts."""
        now = now_ms()
        with self.store.write() as db:
            failed = db.execute(
                "UPDATE jobs SET status = 'failed', error_code = 'LEASE_EXPIRED',"
                " error = 'the miner stopped renewing its lease ' || attempts ||"
                " ' time(s); giving up after ' || :max || ' attempts',"
                " completed_ms = :now, lease_expires_ms = NULL"
                " WHERE status = 'running' AND lease_expires_ms < :now AND attempts >= :max"
                " RETURNING *",
                {"now": now, "max": self.rules.max_attempts},
            )
            queued = sum(self.webhooks.enqueue(db, row) for row in failed)
            requeued = db.execute(
                "UPDATE jobs SET status = 'pending', miner_id = NULL, started_ms = NULL,"
                " lease_expires_ms = NULL"
                " WHERE status = 'running' AND lease_expires_ms < :now RETURNING job_id",
                {"now": now},
            )
        for row in failed:
            self.signals.job_changed(row["job_id"], finished=True)
        for row in requeued:
            self.signals.forget_text(row["job_id"])
            self.signals.job_changed(row["job_id"])
        if requeued:
            self.signals.work_available()
        if queued:
            self.webhooks.wake()
        return {
            "failed": [r["job_id"] for r in failed],
            "requeued": [r["job_id"] for r in requeued],
        }

    def next_lease_expiry_ms(self) -> int | None:
        """When the soonest lease of a running job runs out."""
        row = self.store.read().one(
            "SELECT min(lease_expires_ms) AS soonest FROM jobs WHERE status = 'running'"
        )
        return row["soonest"] if row else None

    def requeue_interrupted(self, miner_id: str) -> dict[str, list[str]]:
        """At start: end the leases of the jobs this node's own miner held when it died."""
        with self.store.write() as db:
            db.execute(
                "UPDATE jobs SET lease_expires_ms = 0 WHERE status = 'running' AND miner_id = ?",
                (miner_id,),
            )
        return self.expire_leases()

    def _explain(self, db: Connection, job_id: str, miner_id: str, *, action: str) -> None:
        """Raise the error that says why `action` on `job_id` changed nothing."""
        row = db.one("SELECT status, miner_id, served_model FROM jobs WHERE job_id = ?", (job_id,))
        if row is None:
            raise NotFound(f"job {job_id} not found", error_code="JOB_NOT_FOUND")
        status = row["status"]
        if status == "cancelled":
            raise Conflict(f"job {job_id} was cancelled", error_code="JOB_CANCELLED")
        if status in TERMINAL:
            raise Conflict(f"job {job_id} is already {status}", error_code="JOB_ALREADY_FINISHED")
        if action == "claim":
            if status == "running":
                raise Conflict(
                    f"job {job_id} is already claimed by another miner",
                    error_code="JOB_ALREADY_CLAIMED",
                )
            raise Conflict(
                f"miner {miner_id} does not serve model {row['served_model']!r}",
                error_code="MODEL_NOT_SERVED",
            )
        if status == "pending":
            raise Conflict(
                f"job {job_id} is not claimed; claim it before you {action} it",
                error_code="JOB_NOT_CLAIMED",
            )
        raise Forbidden(
            f"job {job_id} is held by another miner, not {miner_id}", error_code="NOT_JOB_MINER"
        )

    # -- numbers ---------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Public numbers: jobs by status, queue depth, tokens generated, latency."""
        db = self.store.read()
        by_status = {s: 0 for s in STATUSES}
        for r in db.execute("SELECT status, count(*) AS n FROM jobs GROUP BY status"):
            by_status[r["status"]] = r["n"]
        totals = (
            db.one(
                "SELECT coalesce(sum(completion_tokens), 0) AS completion,"
                " coalesce(sum(prompt_tokens), 0) AS prompt,"
                " avg(completed_ms - created_ms) AS latency_ms"
                " FROM jobs WHERE status = 'completed'"
            )
            or {}
        )
        miners = self.miners.list()
        latency = totals.get("latency_ms")
        return {
            "jobs": {"total": sum(by_status.values()), **by_status},
            "queue_depth": by_status["pending"],
            "miners_online": sum(1 for m in miners if m["online"]),
            "miners_total": len(miners),
            "tokens_generated": totals.get("completion", 0),
            "prompt_tokens": totals.get("prompt", 0),
            "average_job_latency_ms": round(latency, 1) if latency is not None else None,
            "served_models": self.miners.served_models(),
        }


def _miner_id_of(body: Any) -> str:
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object", error_code="INVALID_BODY")
    miner_id = body.get("miner_id")
    if not isinstance(miner_id, str) or not miner_id:
        raise BadRequest("miner_id must be a non-empty string", error_code="INVALID_MINER_ID")
    return miner_id


def _reject_unknown(body: dict[str, Any], known: set[str]) -> None:
    unknown = sorted(set(body) - known)
    if unknown:
        raise BadRequest(f"unknown fields: {', '.join(unknown)}", error_code="UNKNOWN_FIELDS")


def check_miner_signature(registered_key: str | None, signature: Any, result: str) -> None:
    """A miner that registered a key must co-sign its result: `{alg, public_key, value}` over
    the result's SHA-256 (hex, ASCII), with exactly the registered key."""
    if registered_key is None:
        if signature is not None:
            raise BadRequest(
                "this miner registered no public key, so it cannot co-sign; register one",
                error_code="INVALID_MINER_SIGNATURE",
            )
        return
    if not isinstance(signature, dict) or set(signature) != {"alg", "public_key", "value"}:
        raise BadRequest(
            "this miner registered a public key: miner_signature"
            ' {"alg": "ed25519", "public_key", "value"} is required',
            error_code="MINER_SIGNATURE_REQUIRED",
        )
    if signature["public_key"] != registered_key or signature["alg"] != "ed25519":
        raise BadRequest(
            "miner_signature names a key other than the one this miner registered",
            error_code="INVALID_MINER_SIGNATURE",
        )
    message = hash_result(result).encode("ascii")
    if not verify_signature(registered_key, message, str(signature["value"])):
        raise BadRequest(
            "miner_signature does not verify over the result's SHA-256",
            error_code="INVALID_MINER_SIGNATURE",
        )
