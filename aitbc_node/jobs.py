"""Jobs: submission, the state machine, and the views the API shows.

    pending -> running (claimed by one miner, with a lease) -> completed | failed
    pending | running -> cancelled (by the owner)

Every change is one statement guarded by the state it expects, inside `BEGIN IMMEDIATE`, so two
miners can never hold the same job and a terminal state is never left. When such a guarded
statement changes nothing, `_explain` reads the row to say why, with the right status code.
"""

from __future__ import annotations

import math
import secrets
import threading
import time
from typing import TYPE_CHECKING, Any

from aitbc_node.canonical import stored_json, stored_text
from aitbc_node.clock import now_ms, rfc3339
from aitbc_node.config import JobRules, Limits
from aitbc_node.counters import average_latency_ms, job_counts, read_counters
from aitbc_node.errors import (
    ApiError,
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    PaymentRequired,
    TooManyRequests,
)
from aitbc_node.keys import Principal
from aitbc_node.ledger import Ledger, balance, client_address, format_ait, new_receipt_id
from aitbc_node.metrics import Metrics
from aitbc_node.miners import Miners
from aitbc_node.paging import decode_cursor, page
from aitbc_node.receipts import hash_result
from aitbc_node.schemas import (
    ClaimNext,
    CompleteJob,
    CompleteJobs,
    FailJob,
    JobParams,
    JobResult,
    MinerRequest,
    MinerSignature,
    ProgressReport,
    ReportedResult,
    SubmitJob,
    Usage,
    fingerprint,
    to_builtins,
)
from aitbc_node.signals import Signals
from aitbc_node.signing import verify_signature
from aitbc_node.store import Connection, Row, Store

if TYPE_CHECKING:
    from aitbc_node.webhooks import Webhooks

TERMINAL = ("completed", "failed", "cancelled")
# Idempotency keys are kept at least this long (the IETF draft and Stripe keep 24 hours).
IDEMPOTENCY_KEY_MS = 24 * 3600 * 1000
# A job that breaks the built-in miner this many times (an unexpected error while serving or
# recording it, or the process dying while it ran) is failed `POISON_JOB`, not claimed again.
MAX_FAULTS = 2
# The head of an `available` offer is held for its miner this long (other miners are offered
# other jobs first), looking this many jobs past the limit for ones nobody holds.
OFFER_HOLD_SECONDS = 2.0
OFFER_LOOKAHEAD = 32
# How many ended jobs' views are kept for the long polls that wait on them.
ENDED_VIEWS_KEPT = 4096


# Pending jobs take turns by client, so one client cannot hold every slot while others wait:
# a job's turn is its place in its client's own queue plus the jobs that client has running
# now; the lowest turn goes first, the oldest among equals. A client with 20 jobs queued and
# another with 1 get the first and second slots, then turns alternate.
# Each client's running jobs are counted once (not once per pending job of theirs: with 30
# pending and 60 running that was 1,800 rows read for every claim).
_PENDING_WITH_TURN = (
    "SELECT pending.seq, row_number() OVER (PARTITION BY pending.client ORDER BY pending.seq)"
    " + coalesce(running.n, 0) AS turn"
    " FROM jobs AS pending LEFT JOIN (SELECT client, count(*) AS n FROM jobs"
    " WHERE status = 'running' GROUP BY client) AS running ON running.client = pending.client"
    " WHERE pending.status = 'pending'"
    " AND pending.served_model IN (SELECT value FROM json_each(:caps))"
)
PENDING_IN_TURN = (
    f"SELECT jobs.* FROM jobs JOIN ({_PENDING_WITH_TURN}) AS t USING (seq)"
    " ORDER BY t.turn, t.seq LIMIT :limit"
)
# The same jobs' keys alone, for a claim's UPDATE. Read on their own first: as a subquery of
# the UPDATE the same statement took ten times as long (1 ms against 0.1 ms with 64 running).
_SEQS_IN_TURN = f"SELECT seq FROM ({_PENDING_WITH_TURN}) ORDER BY turn, seq LIMIT :limit"
# How many jobs for these models are pending, counted up to :over (an index range, no more).
_PENDING_UP_TO = (
    "SELECT count(*) AS n FROM (SELECT 1 FROM jobs WHERE status = 'pending'"
    " AND served_model IN (SELECT value FROM json_each(:caps)) LIMIT :over)"
)


def new_job_id() -> str:
    return f"job-{secrets.token_hex(8)}"


def job_params(params: JobParams | None, limits: Limits) -> dict[str, Any]:
    """A job's params as stored, with defaults filled in; 400 past the node's own token bound
    (the types allow up to the hard ceiling, an operator may set less)."""
    params = params or JobParams()
    max_tokens = params.max_tokens
    if max_tokens is None:  # the default, within what this node allows
        max_tokens = min(limits.default_max_tokens, limits.max_tokens)
    if max_tokens > limits.max_tokens:
        raise BadRequest(
            f"params.max_tokens: this node allows at most {limits.max_tokens}",
            error_code="INVALID_PARAMS",
        )
    if params.min_tokens > max_tokens:
        raise BadRequest(
            f"params.min_tokens: {params.min_tokens} is more than max_tokens ({max_tokens})",
            error_code="INVALID_PARAMS",
        )
    stop = [params.stop] if isinstance(params.stop, str) else list(params.stop)
    return {
        "max_tokens": max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "seed": params.seed,
        "stop": stop,
        "ignore_eos": params.ignore_eos,
        "min_tokens": params.min_tokens,
    }


def plain_transcript(messages: list[dict[str, str]]) -> str:
    """A conversation as plain text, for miners (and models) that know no chat template:
    one `Role: content` paragraph per turn, then `Assistant:` to answer."""
    turns = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n\n".join([*turns, "Assistant:"])


def job_messages(row: Row) -> list[dict[str, str]] | None:
    """The job's conversation, or None for a job asked with a plain prompt."""
    return stored_json(row["messages"]) if row.get("messages") else None


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
        "params": stored_json(row["params"]),
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
        "messages": job_messages(row),
    }


class _ResultBatch:
    """A miner's results on their way into the store (a batch completion, or the results a
    claim-next brings): the outcome of each refused one by its index, the rows of the
    finished ones, and how many webhook events they queued."""

    def __init__(self, results: list[JobResult]) -> None:
        self.results = results
        self.outcomes: dict[int, dict[str, Any]] = {}
        self.finished: list[tuple[int, Row]] = []
        self.queued = 0

    def refuse(self, index: int, job_id: str, error: ApiError) -> None:
        self.outcomes[index] = {
            "job_id": job_id,
            "detail": error.detail,
            "error_code": error.error_code,
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
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.ledger = ledger
        self.webhooks = webhooks
        self.miners = miners
        self.signals = signals
        self.rules = rules
        self.limits = limits
        self.metrics = metrics if metrics is not None else Metrics()
        # The views of jobs lately ended, for the long polls that wait on them (each would
        # read its row again): an ended job changes no more, so its view stays true.
        self._ended_views: dict[str, dict[str, Any]] = {}
        self._ended_views_lock = threading.Lock()
        # Jobs lately offered to a miner by `available`: job id -> (miner id, held until).
        self._offers: dict[str, tuple[str, float]] = {}
        self._offers_lock = threading.Lock()
        self._offers_pruned = 0.0

    # -- clients -------------------------------------------------------------------------

    def resolve_model(self, requested: str) -> str:
        """The model a request for `requested` runs on; 400 when no miner serves it."""
        served_model = self.rules.aliases.get(requested, requested)
        if self.rules.accept_unserved_models or self.miners.serves(served_model):
            return served_model
        served = self.miners.served_models()
        aliases = [f"{a} -> {m}" for a, m in sorted(self.rules.aliases.items()) if m in served]
        detail = (
            f"no miner serves model {requested!r}; served models: {', '.join(served) or 'none'}"
        )
        if aliases:
            detail += f"; aliases: {', '.join(aliases)}"
        raise BadRequest(detail, error_code="UNKNOWN_MODEL")

    def default_model(self) -> str | None:
        """The model a job that names none runs on: the built-in miner's first model (which
        cannot vanish with a remote miner), else the first model some miner serves."""
        if self.miners.builtin_models:
            return self.miners.builtin_models[0]
        served = self.miners.served_models()
        return served[0] if served else None

    def submit(
        self, principal: Principal, request: SubmitJob, idempotency_key: str | None = None
    ) -> tuple[dict[str, Any], bool]:
        """Store a new pending job for `principal` and wake the miners; returns the job and
        whether it is new. With an `idempotency_key` the client used before, for the same
        request, the job that request made comes back instead (409 for another request)."""
        principal.require("client", "admin")
        prompt, messages = self._prompt_of(request)
        model = request.model or self.default_model()
        if model is None:
            raise BadRequest(
                "model is required: no miner serves a default model", error_code="INVALID_MODEL"
            )
        params = job_params(request.params, self.limits)
        served_model = self.resolve_model(model)
        now = now_ms()
        with self.store.write() as db:
            if idempotency_key is not None:
                earlier = self._idempotent_replay(db, principal, idempotency_key, request)
                if earlier is not None:
                    return job_view(earlier), False
            self._check_queue(db, principal.identity)
            if self.rules.require_funds:
                self._check_funds(db, principal.identity, served_model, params["max_tokens"])
            row = db.one(
                "INSERT INTO jobs (job_id, client, prompt, messages, model, served_model, params,"
                " status, created_ms) VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', ?) RETURNING *",
                (
                    new_job_id(),
                    principal.identity,
                    prompt,
                    messages,
                    model,
                    served_model,
                    stored_text(params),
                    now,
                ),
            )
            assert row is not None
            if idempotency_key is not None:
                db.execute(
                    "INSERT OR REPLACE INTO idempotency_keys"
                    " (client, idempotency_key, request_hash, job_id, created_ms)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (principal.identity, idempotency_key, fingerprint(request), row["job_id"], now),
                )
                db.execute(
                    "DELETE FROM idempotency_keys WHERE created_ms < ?",
                    (now - IDEMPOTENCY_KEY_MS,),
                )
        self.signals.work_available(served_model)
        return job_view(row), True

    def _prompt_of(self, request: SubmitJob) -> tuple[str, str | None]:
        """The job's prompt text and its messages as JSON (None for a plain prompt): exactly
        one of the two must be sent, and neither may be blank or over the length limit."""
        if (request.prompt is None) == (request.messages is None):
            if request.prompt is None:
                raise BadRequest(
                    "prompt is required (or messages, a list of chat turns)",
                    error_code="INVALID_PROMPT",
                )
            raise BadRequest("send prompt or messages, not both", error_code="INVALID_PROMPT")
        if request.messages is not None:
            messages = [{"role": m.role, "content": m.content} for m in request.messages]
            if not any(m["content"].strip() for m in messages):
                raise BadRequest("messages must not all be blank", error_code="INVALID_MESSAGES")
            chars = sum(len(m["content"]) for m in messages)
            if chars > self.limits.max_prompt_chars:
                raise BadRequest(
                    f"messages hold {chars} characters; the limit is"
                    f" {self.limits.max_prompt_chars}",
                    error_code="PROMPT_TOO_LONG",
                )
            return plain_transcript(messages), stored_text(messages)
        prompt = request.prompt
        assert prompt is not None
        if not prompt.strip():
            raise BadRequest("prompt must not be blank", error_code="INVALID_PROMPT")
        if len(prompt) > self.limits.max_prompt_chars:
            raise BadRequest(
                f"prompt is {len(prompt)} characters; the limit is {self.limits.max_prompt_chars}",
                error_code="PROMPT_TOO_LONG",
            )
        return prompt, None

    def _idempotent_replay(
        self, db: Connection, principal: Principal, key: str, request: SubmitJob
    ) -> Row | None:
        """The job an earlier submit with this client's `key` made, if it was this same
        request; 409 `IDEMPOTENCY_KEY_REUSED` if it was another."""
        earlier = db.one(
            "SELECT request_hash, job_id FROM idempotency_keys"
            " WHERE client = ? AND idempotency_key = ? AND created_ms >= ?",
            (principal.identity, key, now_ms() - IDEMPOTENCY_KEY_MS),
        )
        if earlier is None:
            return None
        if earlier["request_hash"] != fingerprint(request):
            raise Conflict(
                f"Idempotency-Key {key!r} was used for another request (job"
                f" {earlier['job_id']}); use a new key for a new job",
                error_code="IDEMPOTENCY_KEY_REUSED",
            )
        return db.one("SELECT * FROM jobs WHERE job_id = ?", (earlier["job_id"],))

    def _check_queue(self, db: Connection, identity: str) -> None:
        """429 `QUEUE_FULL` when the client's or the node's pending jobs are at their bound."""
        mine = db.one(
            "SELECT count(*) AS n FROM jobs WHERE client = ? AND status = 'pending'", (identity,)
        )
        # The node's count from the counters the triggers keep: one row, however deep the
        # queue (a count(*) read every pending job on every submit).
        everyone = db.one("SELECT jobs_pending AS n FROM stats_counters WHERE id = 1")
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
        limit: int,
        cursor: str | None,
    ) -> dict[str, Any]:
        """The jobs `principal` may see, newest first, a page at a time."""
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
        """Pending jobs for the models `miner_id` registered, in turn by client (see
        `PENDING_IN_TURN`); a job just offered first to another miner comes after the rest,
        so miners polling together are not all sent after the same job."""
        miner = self.miners.require_registered(principal, miner_id)
        assert miner_id is not None
        rows = self.store.read().execute(
            PENDING_IN_TURN,
            {"caps": miner["capabilities"], "limit": limit + OFFER_LOOKAHEAD},
        )
        return {"jobs": [job_view(r) for r in self._offer(miner_id, rows, limit)]}

    def _offer(self, miner_id: str, rows: list[Row], limit: int) -> list[Row]:
        """The first `limit` of `rows` for `miner_id`, those held for other miners last; the
        first one offered is held for this miner for `OFFER_HOLD_SECONDS`."""
        now = time.monotonic()
        with self._offers_lock:
            if now >= self._offers_pruned + OFFER_HOLD_SECONDS:
                self._offers = {j: h for j, h in self._offers.items() if h[1] > now}
                self._offers_pruned = now
            free, held = [], []
            for row in rows:
                holder = self._offers.get(row["job_id"])
                taken = holder is not None and holder[0] != miner_id and holder[1] > now
                (held if taken else free).append(row)
            if free:  # a miner of the tutorial's kind claims the first job it is offered
                self._offers[free[0]["job_id"]] = (miner_id, now + OFFER_HOLD_SECONDS)
        return (free + held)[:limit]

    def claim(self, principal: Principal, job_id: str, miner_id: str) -> dict[str, Any]:
        """Claim `job_id` for `miner_id`: exactly one of racing claims wins."""
        miner = self.miners.require_registered(principal, miner_id)
        row = self.claim_as(miner["miner_id"], miner["capabilities"], job_id)
        return job_view(row)

    def claim_as(self, miner_id: str, capabilities_json: str, job_id: str | None) -> Row:
        """Claim `job_id`, or with None the next job in turn for these models (NotFound if
        none)."""
        with self.store.write(durable=False) as db:
            rows = self._claim(db, miner_id, capabilities_json, job_id, 1)
            if not rows:
                if job_id is None:
                    raise NotFound("no pending job for these models", error_code="NO_JOB")
                self._explain(db, job_id, miner_id, action="claim")
        self.signals.job_changed(rows[0]["job_id"])
        return rows[0]

    def claim_many(self, miner_id: str, capabilities_json: str, limit: int) -> list[Row]:
        """Claim up to `limit` jobs in turn for these models at once (none: an empty list)."""
        with self.store.write(durable=False) as db:
            rows = self._claim(db, miner_id, capabilities_json, None, limit)
        for row in rows:
            self.signals.job_changed(row["job_id"])
        return rows

    def claim_next(self, principal: Principal, request: ClaimNext) -> dict[str, Any]:
        """Hand `miner_id` up to `max_jobs` pending jobs for its models, each to it alone (one
        guarded statement in one transaction: racing miners get disjoint jobs, never a 409),
        renew the leases of the jobs it already runs and mark it seen, in one write; the
        results it brings are recorded first in that write (as `complete_many` records them),
        each with its outcome in the answer's `results`."""
        miner_id = request.miner_id
        self.miners.require_acting_as(principal, miner_id)
        batch = _ResultBatch(request.results)
        # Only results need the fsync; a claim alone may be lost in a power cut (its jobs go
        # back to the queue when their leases run out).
        with self.store.write(durable=bool(batch.results)) as db:
            miner = self.miners.mark_seen(db, miner_id)
            if miner is None:
                raise self.miners.not_registered(miner_id)
            if batch.results:
                self._check_results(batch, miner["public_key"])
                self._record_results(db, miner_id, batch)
            renewed = self._renew(db, miner_id)
            rows = self._claim(db, miner_id, miner["capabilities"], None, request.max_jobs)
        for row in rows:
            self.signals.job_changed(row["job_id"])
        return {
            "jobs": [job_view(r) for r in rows],
            "renewed": renewed,
            "lease_seconds": self.rules.lease_seconds,
            "results": self._results_recorded(batch),
        }

    def served_by(self, miner_id: str) -> list[str]:
        """The models `miner_id` registered ([] when it is not registered)."""
        miner = self.store.read().one(
            "SELECT capabilities FROM miners WHERE miner_id = ?", (miner_id,)
        )
        return stored_json(miner["capabilities"]) if miner else []

    def has_pending(self, models: list[str]) -> bool:
        """Whether a job for one of `models` is pending (one indexed read: worth a claim)."""
        row = self.store.read().one(
            "SELECT 1 AS found FROM jobs WHERE status = 'pending'"
            " AND served_model IN (SELECT value FROM json_each(?)) LIMIT 1",
            (stored_text(models),),
        )
        return row is not None

    def _claim(
        self, db: Connection, miner_id: str, capabilities_json: str, job_id: str | None, limit: int
    ) -> list[Row]:
        """Inside a write: move `job_id` (or the next `limit` jobs in turn) for these models
        from pending to running for `miner_id`; the rows claimed, in turn order."""
        params: dict[str, Any] = {"job_id": job_id, "caps": capabilities_json, "limit": limit}
        if job_id is not None:
            target = "job_id = :job_id"
        else:
            pending = db.one(_PENDING_UP_TO, {**params, "over": limit + 1})
            if pending is None or pending["n"] == 0:
                return []
            if pending["n"] <= limit:
                # All of them: the turn order would choose every one, so it is not computed.
                target = "1"
            else:
                seqs = [row["seq"] for row in db.execute(_SEQS_IN_TURN, params)]
                params["seqs"] = stored_text(seqs)
                target = "seq IN (SELECT value FROM json_each(:seqs))"
        now = now_ms()
        rows = db.execute(
            "UPDATE jobs SET status = 'running', miner_id = :miner, attempts = attempts + 1,"
            " started_ms = :now, lease_expires_ms = :lease"
            f" WHERE {target} AND status = 'pending'"
            " AND served_model IN (SELECT value FROM json_each(:caps)) RETURNING *",
            {**params, "miner": miner_id, "now": now, "lease": now + self.rules.lease_ms},
        )
        # RETURNING gives no order; keep the queue's (turn order is close to seq order).
        return sorted(rows, key=lambda r: r["seq"])

    def progress(self, principal: Principal, job_id: str, report: ProgressReport) -> dict[str, Any]:
        """Text a remote miner has generated so far for a job it holds (for streams)."""
        miner_id, text = report.miner_id, report.text
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
            return self._renew(db, miner_id)

    def _renew(self, db: Connection, miner_id: str) -> list[str]:
        rows = db.execute(
            "UPDATE jobs SET lease_expires_ms = ? WHERE miner_id = ? AND status = 'running'"
            " RETURNING job_id",
            (now_ms() + self.rules.lease_ms, miner_id),
        )
        return [r["job_id"] for r in rows]

    def complete(self, principal: Principal, job_id: str, report: CompleteJob) -> dict[str, Any]:
        """Record a remote miner's result."""
        miner_id = report.miner_id
        # Check everything before the first write (the miner's last_seen), so a bad request
        # leaves the store exactly as it was.
        self._check_signature(miner_id, report.miner_signature, report.result)
        self.miners.require_registered(principal, miner_id)
        row = self.finish(job_id, miner_id, **self._completion(report))
        return job_view(row)

    def complete_many(self, principal: Principal, request: CompleteJobs) -> dict[str, Any]:
        """Record several results of one miner in one transaction (one fsync for all). Each
        result stands or is refused on its own: a refused one (a bad signature, a job no
        longer this miner's) comes back with its error and changes nothing."""
        miner_id = request.miner_id
        self.miners.require_acting_as(principal, miner_id)
        registered = self.store.read().one(
            "SELECT public_key FROM miners WHERE miner_id = ?", (miner_id,)
        )
        if registered is None:
            raise self.miners.not_registered(miner_id)
        batch = _ResultBatch(request.results)
        self._check_results(batch, registered["public_key"])
        with self.store.write() as db:
            self.miners.mark_seen(db, miner_id)
            self._record_results(db, miner_id, batch)
        return {"results": self._results_recorded(batch)}

    @staticmethod
    def _check_results(batch: _ResultBatch, public_key: str | None) -> None:
        """Refuse each result of `batch` whose co-signature does not hold for `public_key`."""
        for index, item in enumerate(batch.results):
            try:
                check_miner_signature(public_key, item.miner_signature, item.result)
            except ApiError as e:
                batch.refuse(index, item.job_id, e)

    def _record_results(self, db: Connection, miner_id: str, batch: _ResultBatch) -> None:
        """Inside a write: finish the job of each result of `batch` not yet refused, each in
        a savepoint of its own, so a refused one (already finished, not this miner's) takes
        back only its own changes."""
        for index, item in enumerate(batch.results):
            if index in batch.outcomes:
                continue
            db.execute("SAVEPOINT result")
            try:
                row, events = self._finish_in(db, item.job_id, miner_id, self._completion(item))
            except ApiError as e:
                db.execute("ROLLBACK TO result")
                batch.refuse(index, item.job_id, e)
            else:
                batch.finished.append((index, row))
                batch.queued += events
            db.execute("RELEASE result")

    def _results_recorded(self, batch: _ResultBatch) -> list[dict[str, Any]]:
        """After the write of `batch`: count the finished jobs, wake what waits on them; each
        result's outcome, in the order they came."""
        for index, row in batch.finished:
            batch.outcomes[index] = {"job_id": row["job_id"], "job": self._finished(row)}
        if batch.queued:
            self.webhooks.wake()
        return [batch.outcomes[i] for i in range(len(batch.results))]

    def _check_signature(
        self, miner_id: str, signature: MinerSignature | None, result: str
    ) -> None:
        registered = self.store.read().one(
            "SELECT public_key FROM miners WHERE miner_id = ?", (miner_id,)
        )
        if registered is not None:
            check_miner_signature(registered["public_key"], signature, result)

    @staticmethod
    def _completion(report: ReportedResult) -> dict[str, Any]:
        """`finish`'s arguments for a miner's reported result."""
        usage = report.usage or Usage()
        return {
            "result": report.result,
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "model_sha256": report.model_sha256,
            "miner_signature": (
                to_builtins(report.miner_signature) if report.miner_signature else None
            ),
        }

    def fail(self, principal: Principal, job_id: str, report: FailJob) -> dict[str, Any]:
        """Record that a remote miner could not run the job."""
        self.miners.require_registered(principal, report.miner_id)
        row = self.finish(
            job_id, report.miner_id, error=report.error[:4000], error_code="MINER_ERROR"
        )
        return job_view(row)

    def hand_back(self, principal: Principal, job_id: str, report: MinerRequest) -> dict[str, Any]:
        """A remote miner gives a claimed job back to the queue, uncounted (it is shutting
        down): the job is pending again, for any miner."""
        self.miners.require_registered(principal, report.miner_id)
        if not self.release(job_id, report.miner_id):
            self._explain(self.store.read(), job_id, report.miner_id, action="release")
        return self.peek(job_id)

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
        outcome = {
            "result": result,
            "error": error,
            "error_code": error_code,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "model_sha256": model_sha256,
            "miner_signature": miner_signature,
        }
        with self.store.write() as db:
            row, queued = self._finish_in(db, job_id, miner_id, outcome)
        self._finished(row)
        if queued:
            self.webhooks.wake()
        return row

    def _finish_in(
        self, db: Connection, job_id: str, miner_id: str, outcome: dict[str, Any]
    ) -> tuple[Row, int]:
        """Inside a write: `finish`'s changes (`outcome` holds its keyword arguments); the
        job's row and how many webhook events it queued."""
        status = "failed" if outcome.get("error") is not None else "completed"
        # A completion names its receipt in the same statement that ends the job.
        receipt_id = new_receipt_id() if status == "completed" else None
        row = db.one(
            "UPDATE jobs SET status = ?, result = ?, error = ?, error_code = ?,"
            " prompt_tokens = ?, completion_tokens = ?, completed_ms = ?,"
            " lease_expires_ms = NULL, receipt_id = ?"
            " WHERE job_id = ? AND status = 'running' AND miner_id = ? RETURNING *",
            (
                status,
                outcome.get("result"),
                outcome.get("error"),
                outcome.get("error_code"),
                outcome.get("prompt_tokens"),
                outcome.get("completion_tokens"),
                now_ms(),
                receipt_id,
                job_id,
                miner_id,
            ),
        )
        if row is None:
            action = "complete" if status == "completed" else "fail"
            self._explain(db, job_id, miner_id, action=action)
        assert row is not None
        if receipt_id is not None:
            self.ledger.issue_receipt(
                db,
                row,
                receipt_id=receipt_id,
                model_sha256=outcome.get("model_sha256", "unreported"),
                miner_signature=outcome.get("miner_signature"),
            )
        return row, self.webhooks.enqueue(db, row)

    def _finished(self, row: Row) -> dict[str, Any]:
        """After a finish: once it is committed, count it and wake what waits on the job
        with its view at hand (`ended_view`); that view."""
        if row["status"] == "completed":
            # Before job_changed lets its first-text time go (actions run in order).
            self.store.after_commit(lambda: self._count_completion(row))
        view = job_view(row)
        self.store.after_commit(lambda: self._remember_ended(row["job_id"], view))
        self.signals.job_changed(row["job_id"], finished=True)
        return view

    def _remember_ended(self, job_id: str, view: dict[str, Any]) -> None:
        with self._ended_views_lock:
            self._ended_views[job_id] = view
            if len(self._ended_views) > ENDED_VIEWS_KEPT:
                del self._ended_views[next(iter(self._ended_views))]  # the oldest

    def ended_view(self, job_id: str) -> dict[str, Any] | None:
        """The job's view once it has ended, else None: kept from its finish when it ended
        lately, else one row read by key."""
        with self._ended_views_lock:
            view = self._ended_views.get(job_id)
        if view is not None:
            return view
        view = self.peek(job_id)
        return view if view["status"] in TERMINAL else None

    def _count_completion(self, row: Row) -> None:
        """Add a completed job's tokens and timings to the metrics. Time to first token is
        known only when its miner reported text as it went (the built-in miner always does;
        a remote miner through `progress`)."""
        started = row["started_ms"]
        first_text = self.signals.first_text_ms(row["job_id"])
        self.metrics.job_completed(
            row["served_model"],
            prompt_tokens=row["prompt_tokens"] or 0,
            completion_tokens=row["completion_tokens"] or 0,
            queue_wait_s=(started - row["created_ms"]) / 1000,
            ttft_s=None if first_text is None else (first_text - started) / 1000,
            generation_s=(row["completed_ms"] - started) / 1000,
        )

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
        """At start: end the leases of the jobs this node's own miner held when it died.

        Each counts a fault, as it may be what killed the process: one at its `MAX_FAULTS`th
        is failed `POISON_JOB` rather than run (and perhaps crash the node) again. Returns
        `expire_leases`'s outcome (which also covers remote miners' leases that ran out)
        with `interrupted`: the ids of this miner's own jobs.
        """
        with self.store.write() as db:
            interrupted = db.execute(
                "UPDATE jobs SET lease_expires_ms = 0, faults = faults + 1"
                " WHERE status = 'running' AND miner_id = ? RETURNING job_id",
                (miner_id,),
            )
            poisoned, queued = self._poison(
                db,
                "status = 'running' AND miner_id = :miner AND faults >= :max",
                {"miner": miner_id},
                "the node's process died while it ran",
            )
        self._announce_ended(poisoned, queued)
        outcome = self.expire_leases()
        outcome["failed"] += poisoned
        outcome["interrupted"] = [r["job_id"] for r in interrupted]
        return outcome

    def record_fault(self, job_id: str, miner_id: str, cause: str) -> str | None:
        """Count a fault against a job `miner_id` holds (serving or recording it raised), or
        a pending one that claiming raised on: requeue it for one more try, or fail it
        `POISON_JOB` at its `MAX_FAULTS`th fault.

        Returns the job's new status, or None when it was neither.
        """
        with self.store.write() as db:
            counted = db.one(
                "UPDATE jobs SET faults = faults + 1 WHERE job_id = ?"
                " AND (status = 'running' AND miner_id = ? OR status = 'pending')"
                " RETURNING faults",
                (job_id, miner_id),
            )
            if counted is None:
                return None
            poisoned, queued = self._poison(db, "job_id = :job_id", {"job_id": job_id}, cause)
            if not poisoned:
                db.execute(
                    "UPDATE jobs SET status = 'pending', miner_id = NULL, started_ms = NULL,"
                    " lease_expires_ms = NULL WHERE job_id = ?",
                    (job_id,),
                )
        if poisoned:
            self._announce_ended(poisoned, queued)
            return "failed"
        self.signals.forget_text(job_id)
        self.signals.job_changed(job_id)
        self.signals.work_available()
        return "pending"

    def oldest_claimable(self, capabilities_json: str) -> str | None:
        """The id of the job a claim for these models takes next (the one it failed on)."""
        # The id alone: the rest of the row may be what cannot be read.
        row = self.store.read().one(
            f"SELECT job_id FROM jobs WHERE seq = (SELECT seq FROM ({PENDING_IN_TURN}))",
            {"caps": capabilities_json, "limit": 1},
        )
        return row["job_id"] if row else None

    def _poison(
        self, db: Connection, where: str, args: dict[str, Any], cause: str
    ) -> tuple[list[str], int]:
        """Fail `POISON_JOB` the jobs matching `where` that reached `MAX_FAULTS`; returns
        their ids and how many webhook events were queued."""
        failed = db.execute(
            "UPDATE jobs SET status = 'failed', error_code = 'POISON_JOB',"
            " error = 'this job broke the built-in miner ' || faults || ' times; giving up'"
            " || ' (last: ' || :cause || ')', completed_ms = :now, lease_expires_ms = NULL"
            f" WHERE {where} AND faults >= :max RETURNING job_id",
            {**args, "cause": cause[:2000], "now": now_ms(), "max": MAX_FAULTS},
        )
        queued = 0
        for job_id in (r["job_id"] for r in failed):
            # What broke the miner (text that cannot be read back, say) may break the event
            # too; the job still ends, without it.
            db.execute("SAVEPOINT poison_event")
            try:
                row = db.one("SELECT * FROM jobs WHERE job_id = ?", (job_id,))
                assert row is not None
                queued += self.webhooks.enqueue(db, row)
            except (ValueError, TypeError, KeyError):
                db.execute("ROLLBACK TO poison_event")
            db.execute("RELEASE poison_event")
        return [r["job_id"] for r in failed], queued

    def _announce_ended(self, job_ids: list[str], queued: int) -> None:
        """After the commit: wake what waits on these jobs, and the webhook dispatcher."""
        for job_id in job_ids:
            self.signals.job_changed(job_id, finished=True)
        if queued:
            self.webhooks.wake()

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
        # One row of totals kept by triggers (`counters`): flat in the size of the history.
        totals = read_counters(self.store.read())
        miners = self.miners.list()
        return {
            "jobs": job_counts(totals),
            "queue_depth": totals["jobs_pending"],
            "miners_online": sum(1 for m in miners if m["online"]),
            "miners_total": len(miners),
            "tokens_generated": totals["completion_tokens"],
            "prompt_tokens": totals["prompt_tokens"],
            "average_job_latency_ms": average_latency_ms(totals),
            "served_models": self.miners.served_models(),
        }


def check_miner_signature(
    registered_key: str | None, signature: MinerSignature | None, result: str
) -> None:
    """A miner that registered a key must co-sign its result: `{alg, public_key, value}` over
    the result's SHA-256 (hex, ASCII), with exactly the registered key."""
    if registered_key is None:
        if signature is not None:
            raise BadRequest(
                "this miner registered no public key, so it cannot co-sign; register one",
                error_code="INVALID_MINER_SIGNATURE",
            )
        return
    if signature is None:
        raise BadRequest(
            "this miner registered a public key: miner_signature"
            ' {"alg": "ed25519", "public_key", "value"} is required',
            error_code="MINER_SIGNATURE_REQUIRED",
        )
    if signature.public_key != registered_key:
        raise BadRequest(
            "miner_signature names a key other than the one this miner registered",
            error_code="INVALID_MINER_SIGNATURE",
        )
    message = hash_result(result).encode("ascii")
    if not verify_signature(registered_key, message, signature.value):
        raise BadRequest(
            "miner_signature does not verify over the result's SHA-256",
            error_code="INVALID_MINER_SIGNATURE",
        )
