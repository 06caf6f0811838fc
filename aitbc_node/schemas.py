"""The API's types: every request body, query value and response, as msgspec structs.

These are the edge. A request body is decoded straight into its struct (`edge.py`), so a value
that reaches `jobs.py`, `miners.py` or `webhooks.py` already has the right type, a bounded size
and range, and valid text; the OpenAPI document at `/api/schema` is generated from the same
types, so it cannot drift from what the node accepts and answers.

Bounds that an operator can lower at run time (`--max-tokens-limit`) are checked again by the
domain; the bounds here are the hard ceilings.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from aitbc_node.config import Limits

_LIMITS = Limits()

# Text a client sends is stored, hashed and signed: no NUL (C strings end there, and llama.cpp
# reads prompts as C strings) and no other control characters except tab, CR and LF. Lone
# UTF-16 surrogates are refused before this, when the JSON is decoded (`edge.py`).
TEXT_PATTERN = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f]*$"
# Names (models, miners) and ids: one line of printable text.
NAME_PATTERN = r"^[^\x00-\x1f\x7f]+$"
HEX64_PATTERN = r"^[0-9a-fA-F]{64}$"

MAX_INT = 2**53 - 1  # the largest integer every JSON reader (JavaScript included) keeps exact
MAX_SEED = 2**32 - 1
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 64
MAX_MESSAGES = 256
MAX_CAPABILITIES = 64
MAX_NAME_CHARS = 128
MAX_ERROR_CHARS = 65_536
MAX_URL_CHARS = 2048
MAX_GPU_INFO_ITEMS = 64
MAX_GPU_INFO_TEXT = 4096
MAX_TOKENS_CEILING = 1 << 20

# Query and path values (api.py declares them with these bounds).
ID_PATTERN = r"^[A-Za-z0-9._:-]+$"
MAX_ID_CHARS = 128
CURSOR_PATTERN = r"^[A-Za-z0-9_-]+$"
ADDRESS_PATTERN = r"^ait1[0-9a-z]+$"
IDEMPOTENCY_KEY_PATTERN = r"^[!-~]+$"  # printable ASCII, no spaces
MAX_IDEMPOTENCY_KEY_CHARS = 255
DEFAULT_LIST_LIMIT = _LIMITS.default_list_limit
MAX_LIST_LIMIT = _LIMITS.max_list_limit
MAX_WAIT_SECONDS = _LIMITS.max_wait_seconds
MAX_HEIGHT = 2**63 - 1  # SQLite's largest integer
# The most jobs one claim-next hands out, or one batch completion carries.
MAX_BATCH = 64

Text = Annotated[str, Meta(pattern=TEXT_PATTERN)]
Name = Annotated[str, Meta(min_length=1, max_length=MAX_NAME_CHARS, pattern=NAME_PATTERN)]
Count = Annotated[int, Meta(ge=0, le=MAX_INT)]
Timestamp = Annotated[str, Meta(description="RFC 3339 UTC, e.g. 2026-01-24T15:00:05Z")]
Hex64 = Annotated[str, Meta(pattern=HEX64_PATTERN)]
StopString = Annotated[str, Meta(min_length=1, max_length=MAX_STOP_CHARS, pattern=TEXT_PATTERN)]

JobStatus = Literal["pending", "running", "completed", "failed", "cancelled"]
EventName = Literal["job.completed", "job.failed", "job.cancelled"]


def fingerprint(value: Struct) -> str:
    """SHA-256 of a decoded request's canonical encoding (its fields in declared order, defaults
    filled in), so two requests that mean the same get the same fingerprint."""
    return hashlib.sha256(msgspec.json.encode(value)).hexdigest()


def to_builtins(value: Struct) -> dict[str, Any]:
    """A struct as plain JSON values (for storing and signing)."""
    return msgspec.to_builtins(value)


class Error(Struct):
    """Every error the API answers: a sentence for people and a code for programs."""

    detail: str
    error_code: Annotated[str, Meta(pattern=r"^[A-Z][A-Z0-9_]*$", examples=["JOB_NOT_FOUND"])]


# -- requests ----------------------------------------------------------------------------


class JobParams(Struct, forbid_unknown_fields=True, kw_only=True):
    """Generation parameters; every one is optional."""

    max_tokens: Annotated[int, Meta(ge=1, le=MAX_TOKENS_CEILING)] | None = None
    temperature: Annotated[float, Meta(ge=0, le=2)] = 0.7
    top_p: Annotated[float, Meta(gt=0, le=1)] = 0.95
    seed: Annotated[int, Meta(ge=0, le=MAX_SEED)] | None = None
    stop: StopString | Annotated[list[StopString], Meta(max_length=MAX_STOP_SEQUENCES)] = []
    ignore_eos: Annotated[
        bool,
        Meta(
            description="Generate through the model's end-of-text token, up to max_tokens"
            " (for benchmarks that must compare equal work)."
        ),
    ] = False
    min_tokens: Annotated[
        int,
        Meta(
            ge=0,
            le=MAX_TOKENS_CEILING,
            description="Tokens to generate before the end-of-text token may end the text"
            " (stop strings still apply).",
        ),
    ] = 0


ChatRole = Literal["system", "user", "assistant"]


class ChatMessage(Struct, forbid_unknown_fields=True, kw_only=True):
    """One turn of a conversation, rendered through the model's own chat template."""

    role: ChatRole
    content: Annotated[str, Meta(max_length=_LIMITS.max_prompt_chars, pattern=TEXT_PATTERN)]


Messages = Annotated[list[ChatMessage], Meta(min_length=1, max_length=MAX_MESSAGES)]


class SubmitJob(Struct, forbid_unknown_fields=True, kw_only=True):
    """`POST /v1/jobs`: a `prompt`, or a conversation as `messages` (one of the two)."""

    prompt: (
        Annotated[
            str,
            Meta(
                min_length=1,
                max_length=_LIMITS.max_prompt_chars,
                pattern=TEXT_PATTERN,
                examples=["Explain quantum computing"],
            ),
        ]
        | None
    ) = None
    messages: Annotated[
        Messages | None,
        Meta(
            description="Instead of `prompt`: system, user and assistant turns, which the miner"
            " renders through the model's chat template.",
            examples=[
                [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
            ],
        ),
    ] = None
    model: Annotated[
        Name | None,
        Meta(
            description="A model or alias the node serves; omitted, the node's default_model"
            " (see /api/health).",
            examples=["llama3.2"],
        ),
    ] = None
    params: JobParams | None = None


class MinerRequest(Struct, forbid_unknown_fields=True, kw_only=True):
    """`POST /v1/jobs/{job_id}/claim`."""

    miner_id: Name


class ProgressReport(Struct, forbid_unknown_fields=True, kw_only=True):
    """`POST /v1/jobs/{job_id}/progress`: the text generated since the last report."""

    miner_id: Name
    text: Annotated[str, Meta(max_length=_LIMITS.max_result_chars, pattern=TEXT_PATTERN)]


class Usage(Struct, forbid_unknown_fields=True, kw_only=True):
    """Token counts a miner reports."""

    prompt_tokens: Count = 0
    completion_tokens: Count = 0
    total_tokens: Count | None = None


class MinerSignature(Struct, forbid_unknown_fields=True, kw_only=True):
    """A remote miner's Ed25519 signature over the ASCII hex SHA-256 of its result."""

    alg: Literal["ed25519"]
    public_key: Hex64
    value: Annotated[str, Meta(pattern=r"^[0-9a-fA-F]{128}$")]


class ReportedResult(Struct, forbid_unknown_fields=True, kw_only=True):
    """What a miner reports of a job it ran: the result, its token counts, the model file's
    SHA-256 and the miner's co-signature."""

    result: Annotated[str, Meta(max_length=_LIMITS.max_result_chars, pattern=TEXT_PATTERN)]
    completed_at: Timestamp | None = None
    usage: Usage | None = None
    model_sha256: Annotated[str, Meta(min_length=1, max_length=128, pattern=NAME_PATTERN)] = (
        "unreported"
    )
    miner_signature: MinerSignature | None = None


class CompleteJob(ReportedResult, forbid_unknown_fields=True, kw_only=True):
    """`POST /v1/jobs/{job_id}/complete`."""

    miner_id: Name


class JobResult(ReportedResult, forbid_unknown_fields=True, kw_only=True):
    """One result in a batch completion: a `CompleteJob` body with the job's id."""

    job_id: Annotated[str, Meta(min_length=1, max_length=MAX_ID_CHARS, pattern=ID_PATTERN)]


class ClaimNext(Struct, forbid_unknown_fields=True, kw_only=True):
    """`POST /v1/jobs/claim-next`: up to `max_jobs` pending jobs for this miner's models, each
    handed to this miner alone; with `wait`, the answer comes as soon as one is submitted.
    Also renews the leases of the jobs this miner runs (as a heartbeat does), and first
    records the `results` it brings, so a busy miner hands in its work and takes more in one
    request."""

    miner_id: Name
    max_jobs: Annotated[int, Meta(ge=1, le=MAX_BATCH)] = 1
    wait: Annotated[float, Meta(ge=0, le=MAX_WAIT_SECONDS)] = 0
    results: Annotated[
        list[JobResult],
        Meta(
            max_length=MAX_BATCH,
            description="Results of jobs this miner ran, recorded (and on disk) before any"
            " wait begins, as `POST /v1/jobs/complete` records them; each one's outcome comes"
            " back in the answer's `results`, in this order.",
        ),
    ] = []


class CompleteJobs(Struct, forbid_unknown_fields=True, kw_only=True):
    """`POST /v1/jobs/complete`: several results of one miner in one request."""

    miner_id: Name
    results: Annotated[list[JobResult], Meta(min_length=1, max_length=MAX_BATCH)]


class FailJob(Struct, forbid_unknown_fields=True, kw_only=True):
    """`POST /v1/jobs/{job_id}/fail`."""

    miner_id: Name
    error: Annotated[str, Meta(min_length=1, max_length=MAX_ERROR_CHARS, pattern=TEXT_PATTERN)]


GpuScalar = (
    Annotated[str, Meta(max_length=MAX_GPU_INFO_TEXT, pattern=TEXT_PATTERN)]
    | Annotated[int, Meta(ge=-MAX_INT, le=MAX_INT)]
    | Annotated[float, Meta(ge=-MAX_INT, le=MAX_INT)]
    | bool
    | None
)
GpuInfo = dict[
    Annotated[str, Meta(min_length=1, max_length=MAX_NAME_CHARS, pattern=NAME_PATTERN)],
    GpuScalar
    | Annotated[
        list[dict[Annotated[str, Meta(max_length=MAX_NAME_CHARS)], GpuScalar]],
        Meta(max_length=MAX_GPU_INFO_ITEMS),
    ],
]


class RegisterMiner(Struct, forbid_unknown_fields=True, kw_only=True):
    """`POST /v1/miners/register`. `gpu_info` is an object of names to strings, numbers,
    booleans or null, or to lists of such objects (a device list)."""

    miner_id: Name
    capabilities: Annotated[list[Name], Meta(min_length=1, max_length=MAX_CAPABILITIES)]
    gpu_info: Annotated[GpuInfo, Meta(max_length=MAX_GPU_INFO_ITEMS)] = {}
    public_key: Annotated[
        Hex64 | None, Meta(description="The miner's Ed25519 public key: it co-signs results.")
    ] = None


class CreateWebhook(Struct, forbid_unknown_fields=True, kw_only=True):
    """`POST /v1/webhooks`."""

    url: Annotated[
        str,
        Meta(
            min_length=1,
            max_length=MAX_URL_CHARS,
            pattern=NAME_PATTERN,
            examples=["https://your-app.com/webhook"],
        ),
    ]
    events: Annotated[list[EventName], Meta(min_length=1, max_length=3)] = msgspec.field(
        default_factory=lambda: ["job.completed", "job.failed"]
    )


class VerifyRequest(Struct, forbid_unknown_fields=True, kw_only=True):
    """`POST /v1/receipts/verify`: a receipt and, optionally, the key to check it against."""

    receipt: dict[str, Any]
    public_key: Hex64 | None = None


# Every request type refuses unknown fields; the OpenAPI document describes them with
# msgspec's schemas (`request_schemas`), which say so.
REQUEST_TYPES: tuple[type[Struct], ...] = (
    JobParams,
    SubmitJob,
    MinerRequest,
    ProgressReport,
    Usage,
    MinerSignature,
    CompleteJob,
    ClaimNext,
    JobResult,
    CompleteJobs,
    FailJob,
    RegisterMiner,
    CreateWebhook,
    VerifyRequest,
)


def request_schemas() -> dict[str, Any]:
    """JSON Schemas of the request types (and the types inside them), by name, as OpenAPI
    components."""
    _, components = msgspec.json.schema_components(
        REQUEST_TYPES, ref_template="#/components/schemas/{name}"
    )
    return components


# -- responses ---------------------------------------------------------------------------


class TokenUsage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AppliedParams(Struct):
    """The params a job runs with: what the client sent, with the defaults filled in."""

    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    ignore_eos: bool = False
    min_tokens: int = 0


class Job(Struct):
    """A job as its client (or its miner, or an admin) sees it."""

    job_id: str
    status: JobStatus
    model: str
    served_model: str
    prompt: str
    params: AppliedParams
    result: str | None
    error: str | None
    error_code: str | None
    miner_id: str | None
    attempts: int
    usage: TokenUsage | None
    created_at: Timestamp
    started_at: Timestamp | None
    completed_at: Timestamp | None
    lease_expires_at: Timestamp | None
    receipt_id: str | None
    messages: list[ChatMessage] | None = None


class JobList(Struct):
    jobs: list[Job]
    next_cursor: str | None


class OfferedJobs(Struct):
    jobs: list[Job]


class Progress(Struct):
    job_id: str
    accepted: int


class Heartbeat(Struct):
    miner_id: str
    renewed: list[str]
    lease_seconds: float


class ResultOutcome(Struct, omit_defaults=True):
    """One result of a batch completion: the job as it now stands, or why it was refused
    (the error shape's `detail` and `error_code`); the other results stand either way."""

    job_id: str
    job: Job | None = None
    detail: str | None = None
    error_code: str | None = None


class ClaimedJobs(Struct):
    """The jobs a claim-next handed this miner (none when the wait ran out), the jobs it
    already ran whose leases were renewed, and the outcome of each result it brought."""

    jobs: list[Job]
    renewed: list[str]
    lease_seconds: float
    results: list[ResultOutcome]


class CompletedJobs(Struct):
    results: list[ResultOutcome]


class Miner(Struct):
    miner_id: str
    capabilities: list[str]
    gpu_info: dict[str, Any]
    builtin: bool
    online: bool
    state: Literal["idle", "busy", "offline"]
    public_key: str | None
    registered_at: Timestamp
    last_seen_at: Timestamp


class MinerList(Struct):
    miners: list[Miner]


class WhoAmI(Struct):
    key_id: str
    name: str
    role: Literal["client", "miner", "admin"]
    identity: str


class Webhook(Struct):
    webhook_id: str
    url: str
    events: list[EventName]
    created_at: Timestamp


class NewWebhook(Webhook):
    secret: Annotated[str, Meta(description="Signs every delivery; shown this once.")]


class WebhookList(Struct):
    webhooks: list[Webhook]


class DeletedWebhook(Struct):
    webhook_id: str
    deleted: bool


class DeliveryAttempt(Struct):
    attempt: int
    at: Timestamp
    duration_ms: int
    status_code: int | None
    error: str | None


class Delivery(Struct):
    event_id: str
    event: EventName
    job_id: str
    state: Literal["pending", "delivered", "failed"]
    next_attempt_at: Timestamp | None
    attempts: list[DeliveryAttempt]


class DeliveryList(Struct):
    deliveries: list[Delivery]
    next_cursor: str | None


class Signature(Struct):
    alg: Literal["ed25519"]
    key_id: str
    value: str


class ModelRef(Struct):
    name: str
    sha256: str


class Receipt(Struct, omit_defaults=True):
    """A signed receipt, exactly as the node signed it (see the README for each field)."""

    receipt_id: str
    job_id: str
    client_address: str
    miner_id: str
    model: ModelRef
    request_sha256: str
    result_sha256: str
    prompt_tokens: int
    completion_tokens: int
    units: int
    unit_price: int | str
    amount: int | str
    started_at: Timestamp
    completed_at: Timestamp
    node_key_id: str
    signature: Signature
    miner_signature: MinerSignature | None = None


class ReceiptEntry(Struct):
    receipt: Receipt
    block_height: int | None


class ReceiptList(Struct):
    receipts: list[ReceiptEntry]
    next_cursor: str | None


class Verdict(Struct):
    valid: bool
    reasons: list[str]
    public_key: str
    key_id: str | None


class BlockHeader(Struct):
    height: int
    prev_hash: str | None
    timestamp: Timestamp
    merkle_root: str
    receipt_count: int
    tx_count: int
    node_key_id: str
    node_public_key: str


class Block(BlockHeader):
    hash: str
    signature: Any


class BlockList(Struct):
    blocks: list[Block]
    next_cursor: str | None


class Transaction(Struct, rename={"from_": "from"}):
    tx_id: str
    kind: Literal["grant", "payment"]
    from_: str | None
    to: str
    amount: int | str
    amount_ait: str
    job_id: str | None
    created_at: Timestamp
    block_height: int | None
    receipt_id: str | None = None


class BlockDetail(Block):
    receipt_ids: list[str]
    transactions: list[Transaction]


class TransactionList(Struct):
    transactions: list[Transaction]
    next_cursor: str | None


class SealedBlock(Struct):
    header: BlockHeader
    hash: str
    signature: Any


class Proof(Struct):
    receipt_id: str
    block_height: int
    leaf: str
    index: int
    path: list[Any]
    block: SealedBlock


class Address(Struct):
    address: str
    kind: str | None
    identity: str | None
    balance: int
    balance_ait: str
    transactions: list[Transaction]
    next_cursor: str | None


class JobCounts(Struct):
    total: int
    pending: int
    running: int
    completed: int
    failed: int
    cancelled: int


class Stats(Struct):
    jobs: JobCounts
    queue_depth: int
    miners_online: int
    miners_total: int
    tokens_generated: int
    prompt_tokens: int
    average_job_latency_ms: float | None
    served_models: list[str]


class ExplorerStats(Struct):
    height: int | None
    receipts: int
    unsealed_receipts: int
    transactions: int
    accounts: int
    total_value_moved: int
    total_value_moved_ait: str
    jobs: JobCounts
    miners_online: int
    miners_total: int
    tokens_generated: int


Window = Literal["hour", "day"]


class WindowTotals(Struct):
    """The whole window's numbers; `queue_depth` is the queue now."""

    jobs_completed: int
    jobs_failed: int
    tokens: int
    tokens_per_second: float
    queue_depth: int
    latency_p50_ms: int | None
    latency_p95_ms: int | None


class TimePoint(WindowTotals):
    """One bucket of `GET /explorer/timeseries`: jobs that ended in it, and the queue at its
    end (or now, for the bucket still running), from `start` on."""

    start: Timestamp


class ModelWork(Struct):
    """Completed jobs of one served model over the window; `generation_tokens_per_second`
    is its tokens over the seconds its jobs spent running."""

    model: str
    jobs_completed: int
    tokens: int
    tokens_per_second: float
    generation_tokens_per_second: float | None


class MinerWork(Struct):
    """Completed jobs of one miner over the window (as `ModelWork`)."""

    miner_id: str
    jobs_completed: int
    tokens: int
    tokens_per_second: float
    generation_tokens_per_second: float | None


class TimeSeries(Struct):
    """`GET /explorer/timeseries`: a fixed number of points over the last hour or day."""

    window: Window
    bucket_seconds: int
    start: Timestamp
    end: Timestamp
    points: list[TimePoint]
    totals: WindowTotals
    models: list[ModelWork]
    miners: list[MinerWork]


class NodeIdentity(Struct):
    public_key: str
    key_id: str
    address: str


class NodeInfo(NodeIdentity):
    version: str
    height: int | None
    block_interval_seconds: float
    block_max_items: int
    unit: str
    price_per_token: dict[str, int]
    client_grant: int
    require_funds: bool


class Health(Struct):
    """`GET /health`: liveness, the models served, the built-in miner and background loops."""

    status: str
    version: str
    models: list[str]
    default_model: str | None
    aliases: dict[str, str]
    miner: dict[str, Any]
    node: NodeIdentity
    loops: dict[str, Any] = {}
