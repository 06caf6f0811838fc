"""The client commands of `aitbc-node`: talk to a running node over its API.

    aitbc-node submit "Explain SQLite" --wait     # print the answer (as it comes, on a terminal)
    aitbc-node jobs --status completed            # your jobs, newest first
    aitbc-node job JOB_ID                         # one job
    aitbc-node cancel JOB_ID                      # a pending or running job
    aitbc-node receipt RECEIPT_OR_JOB_ID --verify # a signed receipt, checked here
    aitbc-node stats                              # the node's public numbers

Every command takes `--url` (else `$AITBC_URL`, else http://127.0.0.1:8080/api) and
`--api-key` (else `$AITBC_API_KEY`; `receipt` and `stats` need none), and `--json` for
machine-readable output. Results go to stdout, diagnostics to stderr.

Exit status:

    0  success
    1  `submit --wait`: the job ended failed or cancelled; `receipt --verify`: INVALID
    2  usage error: bad flags, no API key, a malformed --pubkey or URL
    3  the node answered with an error: `aitbc-node: error: DETAIL (ERROR_CODE)` on stderr
    4  the node could not be reached (after a few retries)
    5  `submit --wait --timeout`: the time ran out before the job ended (it goes on)
  130  interrupted (Ctrl-C); a job being waited for goes on

The calls go through `aitbc_node.client.CoordinatorClient` (imported only when a command
runs, so `aitbc-node serve` does not pay for it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import re
import shlex
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from aitbc_node.client import CoordinatorClient

DEFAULT_URL = "http://127.0.0.1:8080/api"
STATUSES = ("pending", "running", "completed", "failed", "cancelled")
TERMINAL = ("completed", "failed", "cancelled")

EXIT_OK = 0
EXIT_FAILED = 1  # the job ended failed/cancelled, or the receipt is INVALID
EXIT_USAGE = 2
EXIT_API_ERROR = 3
EXIT_UNREACHABLE = 4
EXIT_TIMEOUT = 5
EXIT_INTERRUPTED = 130

PROGRESS_TICK = 1.0  # seconds between updates of the terminal status line


def _exit_help(one: str | None = None, more: str = "") -> str:
    """The exit statuses, as each command's description ends."""
    failed = f"1 {one}; " if one else ""
    return (
        f"Exit status: 0 success; {failed}2 usage error (bad flags, no API key); 3 the node "
        f"answered with an error (printed as DETAIL (ERROR_CODE)); 4 the node could not be "
        f"reached{more}."
    )


PUBKEY_PATTERN = re.compile(r"[0-9a-fA-F]{64}")


class UsageError(Exception):
    """A problem with the command line itself (exit status 2)."""


def add_client_commands(commands: argparse._SubParsersAction) -> None:
    """Add submit, jobs, job, cancel, receipt and stats to the `aitbc-node` parser."""
    submit = commands.add_parser(
        "submit",
        allow_abbrev=False,  # a mistyped flag is an error with a hint, never a guess
        help="submit a job to a node; with --wait, print its answer",
        description="Submit a prompt as a job. Without --wait, print the job id (the job "
        "JSON with --json). With --wait, wait for the job to end (the node long-polls, so "
        "the answer comes the moment it is ready) and print the result text (the final job "
        "JSON with --json). When stdout is a terminal the answer is printed as it is "
        "generated, then a line on stderr gives its tokens, tokens/s and time to first "
        "token; otherwise, on a terminal stderr, the job's state and the time waited show "
        "on one line meanwhile. PROMPT '-' reads the prompt from stdin. "
        + _exit_help(
            "with --wait, the job ended failed or cancelled",
            "; 5 --timeout ran out (the job goes on; its id is printed)",
        ),
    )
    submit.add_argument("prompt", metavar="PROMPT", help="the prompt ('-': read it from stdin)")
    submit.add_argument(
        "--model", help="the model to run (default: the node's default_model from /api/health)"
    )
    submit.add_argument("--max-tokens", type=int, help="tokens to generate at most")
    submit.add_argument("--temperature", type=float, help="sampling temperature, 0 to 2")
    submit.add_argument("--top-p", type=float, help="nucleus sampling, above 0 up to 1")
    submit.add_argument("--seed", type=int, help="sampling seed, for repeatable answers")
    submit.add_argument(
        "--stop", action="append", metavar="TEXT", help="stop at TEXT (repeatable, up to 4)"
    )
    submit.add_argument(
        "--min-tokens", type=int, help="tokens to generate before end-of-text may end the text"
    )
    submit.add_argument(
        "--ignore-eos",
        action="store_true",
        default=None,
        help="generate through end-of-text, up to --max-tokens (for benchmarks)",
    )
    submit.add_argument("--wait", action="store_true", help="wait for the job and print it")
    submit.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="with --wait: give up waiting after SECONDS (default: wait until the job ends)",
    )
    _add_common(submit, key_required=True)
    submit.set_defaults(run=_runner(cmd_submit, key_required=True))

    jobs = commands.add_parser(
        "jobs",
        allow_abbrev=False,
        help="list your jobs on a node, newest first",
        description="List the jobs of your API key (every job, for an admin key), newest "
        "first: a table of id, status, model, creation time and the prompt's start, or the "
        "page as JSON with --json. " + _exit_help(),
    )
    jobs.add_argument("--status", choices=STATUSES, help="only jobs in this state")
    jobs.add_argument("--limit", type=int, help="jobs to show at most (the node's default: 20)")
    jobs.add_argument("--cursor", help="the next page: the cursor a previous listing gave")
    _add_common(jobs, key_required=True)
    jobs.set_defaults(run=_runner(cmd_jobs, key_required=True))

    job = commands.add_parser(
        "job",
        allow_abbrev=False,
        help="show one job",
        description="Show one job: its state, model, miner, times, token usage, receipt, "
        "prompt and result (the job JSON with --json). " + _exit_help(),
    )
    job.add_argument("job_id", metavar="JOB_ID", help="the job's id (job-...)")
    _add_common(job, key_required=True)
    job.set_defaults(run=_runner(cmd_job, key_required=True))

    cancel = commands.add_parser(
        "cancel",
        allow_abbrev=False,
        help="cancel a pending or running job",
        description="Cancel one of your jobs while it is pending or running (a job that has "
        "already ended answers JOB_ALREADY_FINISHED, exit status 3). " + _exit_help(),
    )
    cancel.add_argument("job_id", metavar="JOB_ID", help="the job's id (job-...)")
    _add_common(cancel, key_required=True)
    cancel.set_defaults(run=_runner(cmd_cancel, key_required=True))

    receipt = commands.add_parser(
        "receipt",
        allow_abbrev=False,
        help="show a job's signed receipt; --verify checks its signature here",
        description="Show a signed receipt, by receipt id (rcpt-...) or by the id of the "
        "completed job it proves (job-...). With --verify, check its Ed25519 signature "
        "here, against --pubkey, else $AITBC_NODE_PUBKEY, else (trust on first use, with a "
        "note on stderr) the key the node itself shows on /api/health. No API key needed "
        "for a receipt id. " + _exit_help("with --verify, the receipt is INVALID"),
    )
    receipt.add_argument("receipt_id", metavar="ID", help="a receipt id, or a job id")
    receipt.add_argument("--verify", action="store_true", help="verify the signature here")
    receipt.add_argument(
        "--pubkey",
        help="the node public key you trust, 64 hex characters (`aitbc-node keys show` on "
        "the node's machine; default $AITBC_NODE_PUBKEY)",
    )
    _add_common(receipt, key_required=False)
    receipt.set_defaults(run=_runner(cmd_receipt, key_required=False))

    stats = commands.add_parser(
        "stats",
        allow_abbrev=False,
        help="show a node's public numbers",
        description="Show a node's jobs by state, queue depth, miners online, tokens "
        "generated and average latency (GET /v1/stats; no API key needed). " + _exit_help(),
    )
    _add_common(stats, key_required=False)
    stats.set_defaults(run=_runner(cmd_stats, key_required=False))


def _add_common(parser: argparse.ArgumentParser, *, key_required: bool) -> None:
    parser.add_argument(
        "--url",
        help=f"the node's API base URL (default $AITBC_URL, else {DEFAULT_URL})",
    )
    parser.add_argument(
        "--api-key",
        help="your API key (default $AITBC_API_KEY)"
        + ("" if key_required else "; not needed here"),
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=2,
        help="retries of a refused connection, a 5xx or a 429 before giving up (%(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON")


# -- running a command ---------------------------------------------------------------------


def _runner(
    command: Callable[[CoordinatorClient, argparse.Namespace], int], *, key_required: bool
) -> Callable[[argparse.Namespace], int]:
    """`command` with its client made, and every failure turned into its exit status."""

    def run(args: argparse.Namespace) -> int:
        from aitbc_node.client import CoordinatorClient, CoordinatorError, CoordinatorUnavailable

        url = args.url or os.environ.get("AITBC_URL") or DEFAULT_URL
        api_key = args.api_key or os.environ.get("AITBC_API_KEY") or None
        if not url.startswith(("http://", "https://")):
            return _usage(f"the URL must start with http:// or https://: {url!r}")
        if key_required and not api_key:
            return _usage("no API key: pass --api-key KEY or set AITBC_API_KEY")
        if args.retries < 0:
            return _usage("--retries must be 0 or more")
        client = CoordinatorClient(url, api_key, retries=args.retries)
        try:
            return command(client, args)
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED
        except UsageError as e:
            return _usage(str(e))
        except CoordinatorUnavailable as e:
            _say(f"error: cannot reach the node at {url}: {e.detail} ({e.error_code})")
            return EXIT_UNREACHABLE
        except CoordinatorError as e:
            hint = ""
            if e.status == 404 and e.error_code in ("NOT_FOUND", "HTTP_404"):
                hint = f"; is {url} the API base, e.g. {DEFAULT_URL}?"
            _say(f"error: {e.detail} ({e.error_code}){hint}")
            return EXIT_API_ERROR
        except json.JSONDecodeError as e:  # a 2xx answer that is not JSON: not a node's API
            _say(f"error: the answer from {url} is not the node API's JSON: {e} (INVALID_ANSWER)")
            return EXIT_API_ERROR
        finally:
            client.close()

    return run


def _say(message: str) -> None:
    print(f"aitbc-node: {message}", file=sys.stderr, flush=True)


def _usage(message: str) -> int:
    _say(f"error: {message}")
    return EXIT_USAGE


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


# -- submit --------------------------------------------------------------------------------


def cmd_submit(client: CoordinatorClient, args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if args.timeout is not None and args.timeout <= 0:
        raise UsageError("--timeout must be above 0 seconds")
    params = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
        "stop": args.stop,
        "min_tokens": args.min_tokens,
        "ignore_eos": args.ignore_eos,
    }
    params = {k: v for k, v in params.items() if v is not None}
    started = time.monotonic()
    job = client.submit_job(prompt, args.model, **params)
    if not args.wait:
        if args.json:
            _print_json(job)
        else:
            print(job["job_id"])
        return EXIT_OK
    if not args.json and _is_terminal(sys.stdout):
        return stream_answer(client, job, started, args.timeout)

    line = StatusLine(sys.stderr)
    try:
        job = wait_for(client, job, started, args.timeout, line)
    except TimeoutError:
        line.clear()
        _say(
            f"gave up waiting after {args.timeout:g} s; job {job['job_id']} goes on "
            f"(see `aitbc-node job {job['job_id']}`)"
        )
        return EXIT_TIMEOUT
    except KeyboardInterrupt:
        line.clear()
        _say(f"interrupted; job {job['job_id']} goes on (`aitbc-node cancel {job['job_id']}`)")
        return EXIT_INTERRUPTED
    finally:
        line.clear()

    if args.json:
        _print_json(job)
    elif job["status"] == "completed":
        print(job["result"])
    if job["status"] == "failed":
        _say(f"job {job['job_id']} failed: {job.get('error')} ({job.get('error_code')})")
        return EXIT_FAILED
    if job["status"] == "cancelled":
        _say(f"job {job['job_id']} was cancelled")
        return EXIT_FAILED
    return EXIT_OK


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def stream_answer(
    client: CoordinatorClient, job: dict[str, Any], started: float, timeout: float | None
) -> int:
    """`submit --wait` with stdout on a terminal: the answer printed as the miner generates
    it, then on stderr its tokens, tokens/s and time to first token.

    The stream is read on a thread so that this one can tick the status line until the first
    text comes, and give up at `timeout`, whatever the stream is doing."""
    from aitbc_node.client import JobFailed

    job_id = job["job_id"]
    pieces: queue.Queue[tuple[str, Any]] = queue.Queue()

    def read() -> None:
        try:
            for piece in client.stream_job(job_id):
                pieces.put(("text", piece))
            pieces.put(("end", None))
        except Exception as e:  # handed over, to be raised where the command runs
            pieces.put(("error", e))

    threading.Thread(target=read, name="job-stream", daemon=True).start()
    line = StatusLine(sys.stderr)
    deadline = math.inf if timeout is None else time.monotonic() + timeout
    first: float | None = None
    wrote = False
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(job_id)
            try:
                kind, value = pieces.get(timeout=min(remaining, PROGRESS_TICK))
            except queue.Empty:
                if first is None:
                    line.show(
                        f"{job_id}  waiting for the first token  {time.monotonic() - started:.0f}s"
                    )
                continue
            if kind == "error":
                raise value
            if kind == "end":
                break
            if first is None:
                first = time.monotonic()
                line.clear()
            sys.stdout.write(value)
            sys.stdout.flush()
            wrote = True
    except (TimeoutError, KeyboardInterrupt, JobFailed) as e:
        line.clear()
        if wrote:
            print(flush=True)  # the diagnostics start on a line of their own
        if isinstance(e, JobFailed):
            _say(str(e))
            return EXIT_FAILED
        if isinstance(e, TimeoutError):
            _say(
                f"gave up waiting after {timeout:g} s; job {job_id} goes on "
                f"(see `aitbc-node job {job_id}`)"
            )
            return EXIT_TIMEOUT
        _say(f"interrupted; job {job_id} goes on (`aitbc-node cancel {job_id}`)")
        return EXIT_INTERRUPTED
    except Exception:
        line.clear()
        if wrote:
            print(flush=True)  # the error goes on a line of its own
        raise
    ended = time.monotonic()
    print(flush=True)  # as when piped: the result, then a newline
    usage = client.get_job(job_id).get("usage") or {}
    _say(_speed(usage.get("completion_tokens"), started, first, ended))
    return EXIT_OK


def _speed(tokens: int | None, started: float, first: float | None, ended: float) -> str:
    """The closing line of a streamed answer: tokens/s over the generation (from the first
    text to the end; from the submission when all came at once), time to first token."""
    if tokens is None:
        return f"done in {ended - started:.2f} s"
    if first is None:
        return f"{tokens} tokens in {ended - started:.2f} s"
    generating = ended - first if ended - first > 0.05 else ended - started
    return (
        f"{tokens} tokens, {tokens / generating:.1f} tokens/s, "
        f"first token after {first - started:.2f} s"
    )


def wait_for(
    client: CoordinatorClient,
    job: dict[str, Any],
    started: float,
    timeout: float | None,
    line: StatusLine,
) -> dict[str, Any]:
    """The job once it has ended. Off a terminal this is `client.wait_for_job`; on one, the
    same long-polling in short steps, so the status line can tick."""
    job_id = job["job_id"]
    if job["status"] in TERMINAL:
        return job
    if not line.enabled:
        return client.wait_for_job(job_id, timeout=math.inf if timeout is None else timeout)
    deadline = math.inf if timeout is None else time.monotonic() + timeout
    while True:
        line.show(f"{job_id}  {job['status']}  {time.monotonic() - started:.0f}s")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(job_id)
        job = client.get_job(job_id, wait=round(min(remaining, PROGRESS_TICK), 3))
        if job["status"] in TERMINAL:
            return job


class StatusLine:
    """One self-updating line (`\\r...`) on a terminal; nothing at all when not a terminal."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        try:
            self.enabled = stream.isatty()
        except (AttributeError, ValueError):
            self.enabled = False
        self.width = 0

    def _columns(self) -> int:
        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns
        except (OSError, ValueError):
            columns = 0
        return max(20, columns - 1) if columns > 0 else 79  # 0: a terminal of unknown size

    def show(self, text: str) -> None:
        if not self.enabled:
            return
        text = text[: self._columns()]
        self.stream.write("\r" + text + " " * max(0, self.width - len(text)))
        self.stream.flush()
        self.width = len(text)

    def clear(self) -> None:
        if self.enabled and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0


# -- jobs, job, cancel ----------------------------------------------------------------------


def _short(text: str | None, width: int) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= width else text[: width - 1] + "…"


def cmd_jobs(client: CoordinatorClient, args: argparse.Namespace) -> int:
    page = client.list_jobs(status=args.status, limit=args.limit, cursor=args.cursor)
    if args.json:
        _print_json(page)
        return EXIT_OK
    rows = page["jobs"]
    model_width = max([len("MODEL"), *(len(j["model"]) for j in rows)])
    print(f"{'ID':<20}  {'STATUS':<9}  {'MODEL':<{model_width}}  {'CREATED':<24}  PROMPT")
    for j in rows:
        print(
            f"{j['job_id']:<20}  {j['status']:<9}  {j['model']:<{model_width}}  "
            f"{j['created_at']:<24}  {_short(j['prompt'], 40)}"
        )
    if not rows:
        _say("no jobs" + (f" with status {args.status}" if args.status else ""))
    if page.get("next_cursor"):
        _say(f"more: {_next_page(args, page['next_cursor'])}")
    return EXIT_OK


def _next_page(args: argparse.Namespace, cursor: str) -> str:
    """The command for the next page: this one's --url, --status and --limit again (never
    the API key, a secret), and the cursor."""
    words = ["aitbc-node", "jobs"]
    if args.url:
        words += ["--url", args.url]
    if args.status:
        words += ["--status", args.status]
    if args.limit is not None:
        words += ["--limit", str(args.limit)]
    return shlex.join([*words, "--cursor", cursor])


def _job_text(job: dict[str, Any]) -> str:
    model = job["model"]
    if job.get("served_model") and job["served_model"] != model:
        model += f" (served as {job['served_model']})"
    fields = [
        ("job", job["job_id"]),
        ("status", job["status"]),
        ("model", model),
        ("params", json.dumps(job.get("params") or {}, ensure_ascii=False)),
        ("miner", job.get("miner_id")),
        ("attempts", job.get("attempts")),
        ("created", job.get("created_at")),
        ("started", job.get("started_at")),
        ("ended", job.get("completed_at")),
    ]
    usage = job.get("usage")
    if usage:
        fields.append(
            (
                "tokens",
                f"{usage['prompt_tokens']} prompt + {usage['completion_tokens']} completion",
            )
        )
    if job.get("receipt_id"):
        fields.append(("receipt", job["receipt_id"]))
    if job.get("error") or job.get("error_code"):
        fields.append(("error", f"{job.get('error')} ({job.get('error_code')})"))
    lines = [f"{name:<9} {value}" for name, value in fields if value is not None]
    lines += ["", "prompt:", _indent(job.get("prompt") or "")]
    if job.get("result") is not None:
        lines += ["", "result:", _indent(job["result"])]
    return "\n".join(lines)


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines() or [""])


def cmd_job(client: CoordinatorClient, args: argparse.Namespace) -> int:
    job = client.get_job(args.job_id)
    if args.json:
        _print_json(job)
    else:
        print(_job_text(job))
    return EXIT_OK


def cmd_cancel(client: CoordinatorClient, args: argparse.Namespace) -> int:
    job = client.cancel_job(args.job_id)
    if args.json:
        _print_json(job)
    else:
        print(f"cancelled {job['job_id']}")
    return EXIT_OK


# -- receipt -----------------------------------------------------------------------------


def cmd_receipt(client: CoordinatorClient, args: argparse.Namespace) -> int:
    from aitbc_node.client import CoordinatorError
    from aitbc_node.receipts import verify_receipt

    pubkey, source = None, None
    if args.verify:
        pubkey, source = args.pubkey, "--pubkey"
        if not pubkey and os.environ.get("AITBC_NODE_PUBKEY"):
            pubkey, source = os.environ["AITBC_NODE_PUBKEY"], "AITBC_NODE_PUBKEY"
        if pubkey and not PUBKEY_PATTERN.fullmatch(pubkey):
            raise UsageError(f"{source} must be 64 hex characters (an Ed25519 public key)")
    elif args.pubkey:
        raise UsageError("--pubkey goes with --verify")

    receipt_id = args.receipt_id
    if receipt_id.startswith("job-"):
        if not client.headers:
            raise UsageError(
                "a job id needs your API key (--api-key or AITBC_API_KEY); a receipt id does not"
            )
        job = client.get_job(receipt_id)
        if not job.get("receipt_id"):
            raise CoordinatorError(
                404,
                f"job {receipt_id} is {job['status']} and has no receipt "
                "(only completed jobs have one)",
                "RECEIPT_NOT_FOUND",
            )
        receipt_id = job["receipt_id"]
    receipt = client.get_receipt(receipt_id)

    if not args.verify:
        if args.json:
            _print_json(receipt)
        else:
            print(_receipt_text(receipt))
        return EXIT_OK

    if not pubkey:
        pubkey, source = client.health()["node"]["public_key"], "/api/health"
        _say(
            f"note: verifying against the public key the node itself reports on /api/health "
            f"({pubkey}): trust on first use, which proves nothing if this is not the node you "
            "think. Pin the key instead: take it from `aitbc-node keys show` on the node's "
            "machine and pass --pubkey KEY or set AITBC_NODE_PUBKEY=KEY."
        )
    verdict = verify_receipt(receipt, pubkey)
    if args.json:
        _print_json(
            {
                "receipt": receipt,
                "verification": {
                    "valid": verdict.valid,
                    "reasons": verdict.reasons,
                    "public_key": pubkey,
                    "public_key_from": source,
                },
            }
        )
    else:
        print(_receipt_text(receipt))
        print()
        if verdict.valid:
            print(f"VALID: {receipt.get('receipt_id')} is signed by {pubkey[:16]}...")
        else:
            print(f"INVALID: {receipt.get('receipt_id')} (checked against {pubkey[:16]}...)")
            for reason in verdict.reasons:
                print(f"  - {reason}")
    return EXIT_OK if verdict.valid else EXIT_FAILED


def _receipt_text(r: dict[str, Any]) -> str:
    model = r.get("model") or {}
    signature = r.get("signature") or {}
    fields = [
        ("receipt", r.get("receipt_id")),
        ("job", r.get("job_id")),
        ("client", r.get("client_address")),
        ("miner", r.get("miner_id")),
        ("model", f"{model.get('name')} (sha256 {model.get('sha256')})"),
        ("request", f"sha256 {r.get('request_sha256')}"),
        ("result", f"sha256 {r.get('result_sha256')}"),
        (
            "tokens",
            f"{r.get('prompt_tokens')} prompt + {r.get('completion_tokens')} completion "
            f"= {r.get('units')} units",
        ),
        ("amount", f"{r.get('amount')} nAIT ({r.get('unit_price')} nAIT a unit)"),
        ("started", r.get("started_at")),
        ("completed", r.get("completed_at")),
        ("signed by", f"{signature.get('key_id')} ({signature.get('alg')})"),
    ]
    if r.get("miner_signature"):
        fields.append(("co-signed", "by the miner's own key"))
    return "\n".join(f"{name:<10} {value}" for name, value in fields)


# -- stats --------------------------------------------------------------------------------


def cmd_stats(client: CoordinatorClient, args: argparse.Namespace) -> int:
    stats = client.stats()
    if args.json:
        _print_json(stats)
        return EXIT_OK
    shown = set()

    def show(name: str, value: Any, *keys: str) -> None:
        shown.update(keys)
        print(f"{name:<13} {value}")

    jobs = stats.get("jobs")
    if isinstance(jobs, dict):
        counts = ", ".join(f"{jobs.get(s, 0)} {s}" for s in STATUSES)
        show("jobs", f"{jobs.get('total', 0)}: {counts}", "jobs")
    if "queue_depth" in stats:
        show("queue depth", stats["queue_depth"], "queue_depth")
    if "miners_online" in stats:
        show(
            "miners",
            f"{stats['miners_online']} online of {stats.get('miners_total', '?')}",
            "miners_online",
            "miners_total",
        )
    if "served_models" in stats:
        show("models", ", ".join(stats["served_models"]) or "none", "served_models")
    if "tokens_generated" in stats:
        show(
            "tokens",
            f"{stats['tokens_generated']} generated, {stats.get('prompt_tokens', 0)} prompt",
            "tokens_generated",
            "prompt_tokens",
        )
    if "average_job_latency_ms" in stats:
        latency = stats["average_job_latency_ms"]
        show(
            "avg latency",
            "-" if latency is None else f"{latency} ms",
            "average_job_latency_ms",
        )
    for key, value in stats.items():
        if key not in shown:
            show(key.replace("_", " "), json.dumps(value) if not isinstance(value, str) else value)
    return EXIT_OK
