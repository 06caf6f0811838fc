"""The `aitbc-node` command: `serve` (the default) and `keys`.

Run `aitbc-node --help`, or `aitbc-node COMMAND --help`, for every flag.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from aitbc_node import __version__, logs
from aitbc_node.client_cli import add_client_commands
from aitbc_node.config import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    ConnectionLimits,
    JobRules,
    Limits,
    default_data_dir,
)
from aitbc_node.delivery import RetryPolicy
from aitbc_node.destinations import DestinationPolicy
from aitbc_node.errors import ApiError, StorageFull
from aitbc_node.ledger import (
    DEFAULT_GRANT,
    DEFAULT_PRICE_PER_1K,
    PriceError,
    Pricing,
    format_ait,
    parse_ait,
)
from aitbc_node.models import ModelError, embedded_model, parse_alias_arg, parse_model_arg
from aitbc_node.ratelimit import DEFAULT_RATES, Rate

if TYPE_CHECKING:
    from aitbc_node.node import Node
    from aitbc_node.store import Store

EXIT_INVALID = 1  # `verify` found a break
EXIT_USAGE = 2  # bad arguments or input


# The most jobs one model serves at once (the engine's own bound).
MAX_PARALLEL = 64


def whole_number(value: str, high: int | None = None, low: int = 1) -> int:
    """An argparse type: a whole number from `low` to `high` (no upper bound when None)."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if high is not None and not low <= number <= high:
        raise argparse.ArgumentTypeError(f"{number} is not between {low} and {high}")
    if number < low:
        raise argparse.ArgumentTypeError(f"{number} is less than {low}")
    return number


def block_height(value: str) -> int:
    """`verify --since`: a block height, a whole number from 0."""
    return whole_number(value, low=0)


def parallel_count(value: str) -> int:
    """`--parallel`: a whole number of sequences, 1 to MAX_PARALLEL."""
    return whole_number(value, MAX_PARALLEL)


def proxy_network(value: str) -> str:
    """`--trust-proxy`: an IP network (CIDR) or a single address, normalised."""
    import ipaddress

    try:
        return str(ipaddress.ip_network(value.strip(), strict=False))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not an IP network (e.g. 10.0.0.0/8) or address"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aitbc-node",
        description="A single-box AITBC compute node: the Coordinator API, a SQLite job store "
        "and a built-in llama.cpp miner in one process. With no command it runs `serve`.",
    )
    parser.add_argument("--version", action="version", version=f"aitbc-node {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the node (the default command)",
        description="Run the node: the API under /api, the explorer at /, and the built-in "
        "miner on the embedded SmolLM2-135M-Instruct model unless --model or --no-miner says "
        "otherwise. Stop it with Ctrl-C or SIGTERM.",
    )
    serve.add_argument("--host", default=DEFAULT_HOST, help="address to listen on (%(default)s)")
    serve.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="port to listen on (%(default)s)"
    )
    add_data_dir(serve)
    serve.add_argument(
        "--config",
        metavar="PATH",
        help="read serve's settings from this TOML file, keys the flag names (port = 8081); "
        "default $AITBC_CONFIG, else $XDG_CONFIG_HOME/aitbc-node/config.toml when it exists. "
        "Every flag can also be set by an AITBC_<FLAG> environment variable (AITBC_PORT); "
        "precedence: flag > environment > file > default",
    )
    serve.add_argument(
        "--print-config",
        action="store_true",
        help="print every setting's effective value and where it came from, then exit",
    )
    serve.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="[NAME=]PATH",
        help="a GGUF model for the built-in miner (repeatable); NAME defaults to the file name "
        "without .gguf; without --model the embedded smollm2-135m-instruct is served",
    )
    serve.add_argument(
        "--alias",
        action="append",
        default=[],
        metavar="NAME=MODEL",
        help="let jobs ask for MODEL by another NAME (repeatable), "
        "e.g. --alias llama3.2=smollm2-135m-instruct",
    )
    serve.add_argument(
        "--no-miner", action="store_true", help="coordinator only: run no built-in miner"
    )
    serve.add_argument(
        "--gpu-layers",
        type=int,
        default=None,
        help="model layers to put on the GPU (-1: all); default all where llama.cpp has a "
        "GPU backend, else 0",
    )
    serve.add_argument(
        "--ctx-size", type=int, default=4096, help="context size in tokens (%(default)s)"
    )
    serve.add_argument(
        "--threads", type=int, default=None, help="CPU threads for llama.cpp (all cores)"
    )
    serve.add_argument(
        "--parallel",
        type=parallel_count,
        default=None,
        metavar="N",
        help="jobs each model serves at once, in one batch (1 to 64); default 8 on a GPU, 4 on "
        "a CPU, halved until their KV cache (N x --ctx-size tokens) fits in a quarter of "
        "the free memory",
    )
    rules = JobRules()
    serve.add_argument(
        "--lease-seconds",
        type=float,
        default=rules.lease_seconds,
        help="how long a claim lasts without a heartbeat (%(default)s)",
    )
    serve.add_argument(
        "--max-attempts",
        type=int,
        default=rules.max_attempts,
        help="claims a job gets before an expired lease fails it (%(default)s)",
    )
    serve.add_argument(
        "--miner-timeout",
        type=float,
        default=rules.miner_timeout_seconds,
        help="seconds after which a silent remote miner counts as offline (%(default)s)",
    )
    serve.add_argument(
        "--accept-unserved-models",
        action="store_true",
        help="queue jobs for models no miner serves yet, instead of refusing them",
    )
    serve.add_argument(
        "--max-tokens-limit",
        type=int,
        default=Limits().max_tokens,
        help="the largest max_tokens a job may ask for (%(default)s)",
    )
    serve.add_argument(
        "--price",
        action="append",
        default=[],
        metavar="MODEL=AIT",
        help="price of MODEL in AIT per 1,000 tokens (repeatable)",
    )
    serve.add_argument(
        "--default-price",
        default=DEFAULT_PRICE_PER_1K,
        metavar="AIT",
        help="price of other models in AIT per 1,000 tokens (%(default)s)",
    )
    serve.add_argument(
        "--credit",
        default=format_ait(DEFAULT_GRANT),
        metavar="AIT",
        help="AIT granted to the default client key made on first start (%(default)s)",
    )
    serve.add_argument(
        "--require-funds",
        action="store_true",
        help="refuse jobs (402) from clients whose balance cannot cover max_tokens",
    )
    serve.add_argument(
        "--block-interval",
        type=float,
        default=2.0,
        help="seconds between blocks, when there is anything to seal (%(default)s)",
    )
    serve.add_argument(
        "--block-max-items",
        type=int,
        default=500,
        help="receipts and transactions per block at most (%(default)s)",
    )
    serve.add_argument(
        "--rate",
        action="append",
        default=[],
        metavar="ROLE=RATE[/BURST]",
        help="requests a second (and burst) per API key of ROLE (client, miner, admin), or per "
        "client address for public reads (public); 0 means no limit; repeatable (defaults: "
        + ", ".join(f"{r}={v or 0}" for r, v in DEFAULT_RATES.items())
        + ")",
    )
    limits = Limits()
    serve.add_argument(
        "--max-pending-per-client",
        type=int,
        default=limits.max_pending_per_client,
        help="pending jobs one client may have queued (%(default)s)",
    )
    serve.add_argument(
        "--max-pending",
        type=int,
        default=limits.max_pending,
        help="pending jobs the node queues in all (%(default)s)",
    )
    retry = RetryPolicy()
    serve.add_argument(
        "--webhook-retry-base",
        type=float,
        default=retry.base_seconds,
        help="seconds before a failed webhook delivery's first retry; doubles each time "
        "(%(default)s)",
    )
    serve.add_argument(
        "--webhook-max-attempts",
        type=int,
        default=retry.max_attempts,
        help="delivery attempts before a webhook event is given up (%(default)s)",
    )
    serve.add_argument(
        "--webhook-timeout",
        type=float,
        default=retry.timeout_seconds,
        help="seconds a webhook receiver has to answer (%(default)s)",
    )
    serve.add_argument(
        "--webhook-allow",
        action="append",
        default=[],
        metavar="CIDR|HOST",
        help="let webhooks reach this network or host name although it is not public "
        "(repeatable), e.g. 127.0.0.1/32 for a receiver on this box; loopback, private, "
        "link-local and other non-public addresses are refused otherwise",
    )
    serve.add_argument(
        "--durability",
        choices=["full", "normal"],
        default="full",
        help="full: every committed job and receipt survives a power cut (an fsync per "
        "write); normal: it survives a crash of the process but a power cut may lose the "
        "last moments, for ~10x cheaper writes (%(default)s)",
    )
    serve.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="let browser pages on ORIGIN (e.g. http://localhost:3000) call the API; "
        "repeatable; '*' allows any",
    )
    serve.add_argument(
        "--trust-proxy",
        action="append",
        default=[],
        type=proxy_network,
        metavar="CIDR",
        help="a reverse proxy's network (repeatable): from a peer inside it, the client "
        "address (public rate limit, access log) is the right-most X-Forwarded-For address "
        "not itself trusted; from any other peer the header is ignored",
    )
    limits_ = ConnectionLimits()
    serve.add_argument(
        "--header-timeout",
        type=float,
        default=limits_.header_timeout,
        metavar="S",
        help="seconds a connection has to send a complete request head, from connecting or "
        "from the first byte of a later request; then it is closed (%(default)s)",
    )
    serve.add_argument(
        "--keep-alive-timeout",
        type=float,
        default=limits_.keep_alive_timeout,
        metavar="S",
        help="seconds an idle connection is kept open between requests (%(default)s)",
    )
    serve.add_argument(
        "--max-connections",
        type=int,
        default=limits_.max_connections,
        metavar="N",
        help="open connections at most; past it a new one is answered 503 "
        "TOO_MANY_CONNECTIONS (%(default)s)",
    )
    serve.add_argument(
        "--metrics-key",
        metavar="KEY",
        help="GET /metrics (Prometheus) answers only requests with Authorization: Bearer KEY "
        "or X-Api-Key: KEY, others 401; without it /metrics is public",
    )
    serve.add_argument(
        "--no-metrics",
        action="store_true",
        help="serve no GET /metrics at all (404)",
    )
    add_log_flags(serve, access_log=True)
    serve.set_defaults(run=cmd_serve)

    miner = commands.add_parser(
        "miner",
        help="serve another node's jobs from this box (a remote miner)",
        description="Join a coordinator as a miner: register this box's models and device, "
        "wait for jobs by long-polling, run them with llama.cpp and report the results, "
        "co-signed with this miner's own key. Ctrl-C once finishes the job in hand and "
        "exits; twice fails it and exits.",
    )
    miner.add_argument(
        "--coordinator",
        default=os.environ.get("AITBC_URL"),
        metavar="URL",
        help="the coordinator's API base URL, e.g. http://10.0.0.5:8080/api ($AITBC_URL)",
    )
    miner.add_argument(
        "--api-key",
        default=os.environ.get("AITBC_API_KEY"),
        help="a miner key from the coordinator's `aitbc-node keys create --role miner` "
        "($AITBC_API_KEY)",
    )
    miner.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="[NAME=]PATH",
        help="a GGUF model to serve (repeatable); default the embedded smollm2-135m-instruct",
    )
    miner.add_argument(
        "--miner-id", help="the miner id (default: the identity the API key acts as)"
    )
    miner.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help=f"where this miner keeps its key (default {default_data_dir() / 'miner'})",
    )
    miner.add_argument("--gpu-layers", type=int, default=None, help="as for serve")
    miner.add_argument("--ctx-size", type=int, default=4096, help="as for serve (%(default)s)")
    miner.add_argument("--threads", type=int, default=None, help="as for serve")
    miner.add_argument(
        "--parallel", type=parallel_count, default=None, metavar="N", help="as for serve"
    )
    add_log_flags(miner, access_log=False)
    miner.set_defaults(run=cmd_miner)

    keys = commands.add_parser(
        "keys",
        help="create, list and revoke API keys",
        description="Manage API keys. Works whether or not the node is running.",
    )
    key_commands = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    create = key_commands.add_parser(
        "create", help="make a key and print it (shown only once)", allow_abbrev=False
    )
    create.add_argument("--role", required=True, choices=["client", "miner", "admin"])
    create.add_argument(
        "--name",
        required=True,
        help="the identity the key acts as: a client name, or the miner_id of a miner",
    )
    create.add_argument(
        "--credit",
        default=format_ait(DEFAULT_GRANT),
        metavar="AIT",
        help="AIT granted to a new client's address (%(default)s)",
    )
    create.add_argument("--json", action="store_true", help="print the key and its details as JSON")
    add_data_dir(create)
    create.set_defaults(run=cmd_keys_create)
    listing = key_commands.add_parser(
        "list", help="list keys (never their secrets)", allow_abbrev=False
    )
    listing.add_argument("--json", action="store_true", help="print JSON")
    add_data_dir(listing)
    listing.set_defaults(run=cmd_keys_list)
    revoke = key_commands.add_parser(
        "revoke", help="revoke a key by id (or unique name)", allow_abbrev=False
    )
    revoke.add_argument("key", help="a key id (key-...) or a key's name")
    revoke.add_argument("--json", action="store_true", help="print the revoked key as JSON")
    add_data_dir(revoke)
    revoke.set_defaults(run=cmd_keys_revoke)
    show = key_commands.add_parser(
        "show",
        help="print the node's public key (what verifiers pin), never its secret",
        allow_abbrev=False,
    )
    show.add_argument("--json", action="store_true", help="print JSON")
    add_data_dir(show)
    show.set_defaults(run=cmd_keys_show)

    selftest = commands.add_parser(
        "selftest",
        help="check that this machine runs a model: load it, generate, say on what",
        description="Load a model (default the embedded smollm2-135m-instruct), generate "
        "--tokens tokens from a fixed prompt, and print what llama.cpp runs on (the CPU "
        "variant it picked for this processor, or the GPU) and the speed. Nothing is stored "
        "and no port is opened. Exit status: 0 when tokens came out, 1 when not, 2 for bad "
        "arguments (a missing model file).",
        allow_abbrev=False,
    )
    selftest.add_argument(
        "--model", metavar="[NAME=]PATH", help="a GGUF model (default: the embedded one)"
    )
    selftest.add_argument(
        "--tokens", type=whole_number, default=16, help="tokens to generate (%(default)s)"
    )
    selftest.add_argument("--gpu-layers", type=int, default=None, help="as for serve")
    selftest.add_argument("--threads", type=int, default=None, help="as for serve")
    selftest.add_argument("--json", action="store_true", help="print the report as JSON")
    selftest.set_defaults(run=cmd_selftest)

    verify = commands.add_parser(
        "verify",
        help="verify a receipt, or a node's whole ledger, offline",
        description="Verify offline. `verify RECEIPT.json --pubkey KEY [--proof PROOF.json]` "
        "checks one receipt (and its inclusion in a block) against a node key you trust. "
        "`verify --data-dir DIR` re-checks a node's whole chain: every hash, Merkle root, "
        "signature, link and balance; it names the first break, and the tip's height, for "
        "`--since` next time. With --json, the verdict as JSON. Exit status: 0 valid, "
        "1 invalid, 2 bad input.",
        allow_abbrev=False,
    )
    verify.add_argument("receipt", nargs="?", type=Path, help="a receipt JSON file ('-': stdin)")
    verify.add_argument("--pubkey", help="the trusted node public key (64 hex characters)")
    verify.add_argument(
        "--proof", type=Path, help="the receipt's proof JSON (GET /api/v1/receipts/ID/proof)"
    )
    verify.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="check the whole ledger of the node in DIR (trusting DIR's node key, or --pubkey)",
    )
    verify.add_argument(
        "--since",
        type=block_height,
        metavar="HEIGHT",
        help="with --data-dir: check only blocks HEIGHT to the tip, their receipts and"
        " transactions, and the unsealed ones, and that block HEIGHT links to block HEIGHT-1."
        " Blocks below HEIGHT are NOT looked at: they are trusted as already verified (pass"
        " the tip height of your last VALID line). Balances are not re-summed (that needs"
        " the whole history)",
    )
    verify.add_argument("--json", action="store_true", help="print the verdict as JSON")
    verify.set_defaults(run=cmd_verify)
    add_client_commands(commands)
    return parser


def add_log_flags(parser: argparse.ArgumentParser, *, access_log: bool) -> None:
    """--log-level and --log-format (and --access-log where there are requests to log)."""
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=list(logs.LEVELS),
        help="the least severe log lines to print, on stderr (%(default)s)",
    )
    parser.add_argument(
        "--log-format",
        default="text",
        choices=list(logs.FORMATS),
        help="text: 'TIME LEVEL LOGGER: MESSAGE'; json: one JSON object a line (%(default)s)",
    )
    if access_log:
        parser.add_argument(
            "--access-log",
            action="store_true",
            help="log one line per request (method, path, status, duration, request id), "
            "whatever --log-level is",
        )


def add_data_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help=f"where the node keeps its database and keys (default {default_data_dir()}; "
        "$AITBC_DATA_DIR overrides)",
    )


def fail(message: str) -> int:
    print(f"aitbc-node: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def load_engine_first() -> None:
    """Load llama.cpp's libraries before anything imports numpy.

    On a CUDA build, numpy loaded first (sqlite-utils imports it when it is installed, and
    llama-cpp-python depends on it) makes the first model load die with a segmentation
    fault; llama-cpp-python's own order, its libraries and then numpy, works. Seen on an
    H100 with CUDA 13: the README's GPU section has the story.
    """
    import aitbc_node.engine  # noqa: F401


def cmd_serve(args: argparse.Namespace) -> int:
    if not args.no_miner:
        load_engine_first()
    from aitbc_node import server
    from aitbc_node.lock import DataDirLock, DataDirLocked
    from aitbc_node.node import NodeSettings, StartupError

    logs.setup(args.log_level, args.log_format, access_log=args.access_log)
    try:
        models = [parse_model_arg(m) for m in args.model]
        if not models and not args.no_miner:
            models = [embedded_model()]
        aliases = dict(parse_alias_arg(a) for a in args.alias)
    except ModelError as e:
        return fail(str(e))
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        return fail(f"two models share a name: {', '.join(names)}; use --model NAME=PATH")
    for alias, target in aliases.items():
        if alias in names:
            return fail(f"--alias {alias}={target}: {alias} is already a model's name")
        if not args.no_miner and target not in names:
            print(
                f"aitbc-node: note: alias {alias} points at {target}, which the built-in miner "
                "does not serve; a remote miner must serve it",
                file=sys.stderr,
            )
    if args.max_attempts < 1 or args.lease_seconds <= 0:
        return fail("--max-attempts must be at least 1 and --lease-seconds above 0")
    if args.block_interval <= 0 or args.block_max_items < 1:
        return fail("--block-interval must be above 0 and --block-max-items at least 1")
    try:
        pricing = Pricing(
            default_per_token=parse_ait(args.default_price, per=1000),
            per_model={
                model: parse_ait(price, per=1000)
                for model, price in (parse_alias_arg(p) for p in args.price)
            },
            grant=parse_ait(args.credit),
        )
    except (PriceError, ModelError) as e:
        return fail(f"bad price or credit: {e} (prices are AIT per 1,000 tokens)")
    rates = dict(DEFAULT_RATES)
    try:
        for arg in args.rate:
            role, rate = parse_alias_arg(arg)
            if role not in rates:
                raise ValueError(f"{role!r} is not one of {', '.join(rates)}")
            rates[role] = Rate.parse(rate)
    except (ValueError, ModelError) as e:
        return fail(f"bad --rate: {e} (give ROLE=RATE[/BURST], e.g. client=10/20)")
    if min(args.max_pending, args.max_pending_per_client, args.webhook_max_attempts) < 1:
        return fail(
            "--max-pending, --max-pending-per-client and --webhook-max-attempts must be >= 1"
        )
    try:
        DestinationPolicy(args.webhook_allow)
    except ValueError as e:
        return fail(f"bad --webhook-allow: {e}")
    settings = NodeSettings(
        data_dir=(args.data_dir or default_data_dir()).expanduser().resolve(),
        host=args.host,
        port=args.port,
        models=models,
        run_miner=not args.no_miner,
        gpu_layers=args.gpu_layers,
        context=args.ctx_size,
        threads=args.threads,
        parallel=args.parallel,
        rules=JobRules(
            lease_seconds=args.lease_seconds,
            max_attempts=args.max_attempts,
            miner_timeout_seconds=args.miner_timeout,
            accept_unserved_models=args.accept_unserved_models,
            require_funds=args.require_funds,
            aliases=aliases,
        ),
        limits=Limits(
            max_tokens=args.max_tokens_limit,
            max_pending_per_client=args.max_pending_per_client,
            max_pending=args.max_pending,
        ),
        pricing=pricing,
        block_interval=args.block_interval,
        block_max_items=args.block_max_items,
        cors_origins=args.cors_origin,
        synchronous=args.durability.upper(),
        rates=rates,
        webhook_retry=RetryPolicy(
            base_seconds=args.webhook_retry_base,
            max_attempts=args.webhook_max_attempts,
            timeout_seconds=args.webhook_timeout,
        ),
        webhook_allow=args.webhook_allow,
        trusted_proxies=args.trust_proxy,
        metrics=not args.no_metrics,
        metrics_key=args.metrics_key,
    )
    if args.metrics_key is not None and not args.metrics_key.strip():
        return fail("--metrics-key must not be empty")
    if min(args.header_timeout, args.keep_alive_timeout) <= 0 or args.max_connections < 1:
        return fail(
            "--header-timeout and --keep-alive-timeout must be above 0, --max-connections >= 1"
        )
    connection_limits = ConnectionLimits(
        header_timeout=args.header_timeout,
        keep_alive_timeout=args.keep_alive_timeout,
        max_connections=args.max_connections,
    )
    # One node per data directory, taken before anything opens the store: a second node
    # would requeue the first one's running jobs as if they had been interrupted.
    data_lock = DataDirLock(settings.data_dir)
    try:
        data_lock.acquire()
    except DataDirLocked as e:
        return fail(str(e))
    except OSError as e:
        return fail(f"cannot lock the data directory {settings.data_dir}: {e.strerror}")
    try:
        try:
            sock = server.bind(settings.host, settings.port)
        except server.PortInUse as e:
            return fail(f"{e} (is another node running? pick another with --port)")
        port = sock.getsockname()[1]

        def banner(node: Node) -> None:
            print(startup_banner(node, port), flush=True)

        try:
            server.run(settings, sock, banner, connection_limits)
        except StartupError as e:
            return fail(str(e))
        except ApiError as e:  # e.g. the first start's keys clash with a key made before it
            return fail(e.detail)
    finally:
        data_lock.release()
    print("aitbc-node: stopped cleanly", flush=True)
    return 0


def startup_banner(node: Node, port: int) -> str:
    """What `serve` prints once it is listening."""
    host = node.settings.host
    shown_host = f"[{host}]" if ":" in host else host
    base = f"http://{shown_host}:{port}"
    lines = [f"aitbc-node {__version__} is running", ""]
    lines.append(f"  API         {base}/api")
    lines.append(f"  OpenAI      {base}/v1 (base_url for OpenAI clients; the client key below)")
    lines.append(f"  Explorer    {base}/")
    lines.append(f"  Data        {node.data_dir}")
    if node.miner is not None:
        backend = node.miner.gpu_info["backend"]
        for engine in node.miner.engines.values():
            lines.append(
                f"  Model       {engine.model.name} ({engine.model.path.name}, {backend},"
                f" {engine.parallel} at once)"
            )
    else:
        lines.append("  Miner       none built in (--no-miner); remote miners serve the jobs")
    for alias, target in node.settings.rules.aliases.items():
        lines.append(f"  Alias       {alias} -> {target}")
    client_key = node.credentials.get("client", "")
    from aitbc_node.keys import is_live

    if is_live(node.store, client_key):
        lines.append(f"  Client key  {client_key}")
    else:
        lines.append("  Client key  (the default key was revoked; make one with `keys create`)")
    lines.append(f"  Keys file   {node.data_dir / 'credentials.json'}")
    lines.append(f"  Node key    {node.key.public_key_hex} ({node.key.key_id})")
    model = node.miners.served_models()[0] if node.miners.served_models() else "MODEL"
    lines += [
        "",
        "Try it:",
        f"  curl -s -X POST {base}/api/v1/jobs -H 'X-Api-Key: {client_key}' \\",
        "       -H 'Content-Type: application/json' \\",
        f'       -d \'{{"prompt": "Say hello", "model": "{model}"}}\'',
    ]
    return "\n".join(lines)


def _data_dir(args: argparse.Namespace) -> Path:
    return (args.data_dir or default_data_dir()).expanduser()


def _open_store(args: argparse.Namespace, *, must_exist: bool = False) -> Store:
    from aitbc_node.node import DATABASE_FILE
    from aitbc_node.store import Store

    path = _data_dir(args) / DATABASE_FILE
    if must_exist and not path.exists():
        raise FileNotFoundError(f"no node database at {path}")
    return Store(path)


def cmd_keys_create(args: argparse.Namespace) -> int:
    from aitbc_node import keys

    try:
        credit = parse_ait(args.credit)
    except PriceError as e:
        return fail(f"bad --credit: {e}")
    store = _open_store(args)
    try:
        key, row = keys.create_key(store, args.role, args.name, credit=credit)
    except ApiError as e:
        return fail(e.detail)
    finally:
        store.close()
    if args.json:
        print(json.dumps({"key": key, **_key_view(row)}, indent=2))
    else:
        print(key)
    print(
        f"(key id {row['key_id']}, role {row['role']}, acts as {row['identity']}; "
        "store it now, it is not shown again)",
        file=sys.stderr,
    )
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    from aitbc_node import keys

    store = _open_store(args)
    try:
        rows = keys.list_keys(store)
    finally:
        store.close()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'KEY ID':<18} {'ROLE':<7} {'NAME':<20} {'CREATED':<25} REVOKED")
    for r in rows:
        print(
            f"{r['key_id']:<18} {r['role']:<7} {r['name']:<20} {r['created_at']:<25} "
            f"{r['revoked_at'] or '-'}"
        )
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from aitbc_node import keys

    store = _open_store(args)
    try:
        row = keys.revoke_key(store, args.key)
    except ApiError as e:
        return fail(e.detail)
    finally:
        store.close()
    if args.json:
        print(json.dumps(_key_view(row), indent=2))
    else:
        print(f"revoked {row['key_id']} ({row['role']} {row['name']})")
    return 0


def _key_view(row: dict) -> dict[str, object]:
    """A key's row as `keys list --json` shows it: never its hash."""
    from aitbc_node.clock import rfc3339

    return {
        "key_id": row["key_id"],
        "name": row["name"],
        "role": row["role"],
        "identity": row["identity"],
        "created_at": rfc3339(row["created_ms"]),
        "revoked_at": rfc3339(row.get("revoked_ms")),
    }


SELFTEST_PROMPT = "Write a short story about a lighthouse keeper."


def cmd_selftest(args: argparse.Namespace) -> int:
    import json
    import time

    load_engine_first()
    from aitbc_node.engine import Engine, EngineError, default_gpu_layers, device_info

    try:
        model = parse_model_arg(args.model) if args.model else embedded_model()
    except ModelError as e:
        return fail(str(e))
    gpu_layers = args.gpu_layers if args.gpu_layers is not None else default_gpu_layers()
    info = device_info(gpu_layers)
    report: dict = {
        "model": model.name,
        "backend": info["backend"],
        "device": info["name"],
        "cpu_variant": info["cpu_variant"],
        "llama_cpp_version": info["llama_cpp_version"],
    }
    started = time.perf_counter()
    try:
        engine = Engine(model, gpu_layers=gpu_layers, context=512, threads=args.threads, parallel=1)
        loaded = time.perf_counter()
        # ignore_eos: exactly --tokens tokens, so runs compare.
        params = {
            "max_tokens": args.tokens,
            "temperature": 0.0,
            "top_p": 1.0,
            "seed": 1,
            "stop": [],
            "ignore_eos": True,
            "min_tokens": 0,
        }
        generation = engine.generate(SELFTEST_PROMPT, params)
        done = time.perf_counter()
        engine.close()
    except EngineError as e:
        report["error"] = str(e)
        print(json.dumps(report) if args.json else f"aitbc-node selftest: failed: {e}")
        return 1
    seconds = done - loaded
    report |= {
        "ok": generation.completion_tokens > 0,
        "load_seconds": round(loaded - started, 3),
        "completion_tokens": generation.completion_tokens,
        "generate_seconds": round(seconds, 3),
        "tokens_per_second": round(generation.completion_tokens / seconds, 1) if seconds else None,
        "text": generation.text,
    }
    if args.json:
        print(json.dumps(report))
    else:
        where = (
            f"GPU {report['device']}"
            if report["backend"] == "gpu"
            else f"CPU {report['device']} (llama.cpp variant {report['cpu_variant']})"
        )
        print(
            f"aitbc-node selftest: {model.name} on {where}, llama-cpp-python "
            f"{report['llama_cpp_version']}\n"
            f"  loaded in {report['load_seconds']:.2f} s; {generation.completion_tokens} tokens "
            f"in {seconds:.2f} s ({report['tokens_per_second']} tokens/s)\n"
            f"  {generation.text.strip()[:200]!r}\n"
            + ("ok" if report["ok"] else "FAILED: no tokens came out"),
            flush=True,
        )
    return 0 if report["ok"] else 1


def cmd_miner(args: argparse.Namespace) -> int:
    import signal

    load_engine_first()
    from aitbc_node.client import CoordinatorClient, CoordinatorError
    from aitbc_node.engine import Engine, EngineError, default_gpu_layers, device_info
    from aitbc_node.remote_miner import RemoteMiner
    from aitbc_node.signing import KeyFileError, NodeKey

    logs.setup(args.log_level, args.log_format)
    if not args.coordinator or not args.api_key:
        return fail(
            "--coordinator URL and --api-key KEY are required (or AITBC_URL and AITBC_API_KEY)"
        )
    try:
        models = [parse_model_arg(m) for m in args.model] or [embedded_model()]
    except ModelError as e:
        return fail(str(e))
    data_dir = (args.data_dir or default_data_dir() / "miner").expanduser()
    try:
        key = NodeKey.load_or_create(data_dir / "miner.key")
    except KeyFileError as e:
        return fail(str(e))
    client = CoordinatorClient(args.coordinator, args.api_key)
    try:
        miner_id = args.miner_id or client.whoami()["identity"]
    except CoordinatorError as e:
        return fail(f"cannot reach the coordinator at {args.coordinator}: {e.detail}")
    gpu_layers = args.gpu_layers if args.gpu_layers is not None else default_gpu_layers()
    gpu_info = device_info(gpu_layers)  # before any model loads, as in serve
    try:
        engines = {
            m.name: Engine(
                m,
                gpu_layers=gpu_layers,
                context=args.ctx_size,
                threads=args.threads,
                parallel=args.parallel,
            )
            for m in models
        }
    except EngineError as e:
        return fail(str(e))
    miner = RemoteMiner(client, miner_id, engines, key, gpu_info)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: miner.request_stop())
    print(
        f"aitbc-node miner {miner_id}: serving"
        f" {', '.join(f'{n} ({e.parallel} at once)' for n, e in engines.items())}"
        f" for {args.coordinator}\n"
        f"  miner key   {key.public_key_hex} ({key.key_id})",
        flush=True,
    )
    try:
        miner.run()
    except CoordinatorError as e:
        return fail(f"the coordinator refused this miner: {e.detail}")
    print(f"aitbc-node miner: stopped after {miner.jobs_done} jobs", flush=True)
    return 0


def cmd_keys_show(args: argparse.Namespace) -> int:
    from aitbc_node.node import NODE_KEY_FILE
    from aitbc_node.signing import KeyFileError, NodeKey

    path = _data_dir(args) / NODE_KEY_FILE
    if not path.exists():
        return fail(f"no node key at {path}; start the node once to make one")
    try:
        key = NodeKey.load_or_create(path)
    except KeyFileError as e:
        return fail(str(e))
    shown = {"public_key": key.public_key_hex, "key_id": key.key_id, "address": key.address}
    if args.json:
        print(json.dumps(shown, indent=2))
    else:
        for name, value in shown.items():
            print(f"{name:<11} {value}")
    return 0


def _read_json(path: Path) -> object:
    text = sys.stdin.read() if str(path) == "-" else path.read_text()
    return json.loads(text)


def cmd_verify(args: argparse.Namespace) -> int:
    if args.receipt is None and args.data_dir is None:
        return fail("give a receipt file (with --pubkey) or --data-dir DIR")
    if args.since is not None and (args.receipt is not None or args.data_dir is None):
        return fail("--since HEIGHT goes with --data-dir DIR (a ledger), not a receipt file")
    if args.receipt is not None:
        return _verify_receipt_file(args)
    return _verify_ledger(args)


def _verify_receipt_file(args: argparse.Namespace) -> int:
    from aitbc_node.chain import verify_inclusion
    from aitbc_node.receipts import verify_receipt

    if not args.pubkey:
        return fail("--pubkey is required: the node public key you trust (keys show, /api/health)")
    try:
        receipt = _read_json(args.receipt)
        proof = _read_json(args.proof) if args.proof else None
    except (OSError, ValueError) as e:
        return fail(f"cannot read the receipt or proof: {e}")
    if not isinstance(receipt, dict):
        return fail("the receipt file must hold a JSON object")
    if proof is not None:
        if not isinstance(proof, dict):
            return fail("the proof file must hold a JSON object")
        reasons = verify_inclusion(receipt, proof, args.pubkey)
    else:
        reasons = verify_receipt(receipt, args.pubkey).reasons
    receipt_id = receipt.get("receipt_id", "the receipt")
    if args.json:
        verdict: dict[str, object] = {
            "valid": not reasons,
            "receipt_id": receipt.get("receipt_id"),
            "public_key": args.pubkey,
            "reasons": reasons,
        }
        if proof is not None:
            verdict["block_height"] = None if reasons else proof["block"]["header"]["height"]
        print(json.dumps(verdict, indent=2))
        return EXIT_INVALID if reasons else 0
    if reasons:
        print(f"INVALID: {receipt_id}")
        for reason in reasons:
            print(f"  - {reason}")
        return EXIT_INVALID
    where = f", included in block {proof['block']['header']['height']}" if proof else ""
    print(f"VALID: {receipt_id} is signed by {args.pubkey[:16]}...{where}")
    return 0


def _verify_ledger(args: argparse.Namespace) -> int:
    from aitbc_node.audit import audit
    from aitbc_node.node import NODE_KEY_FILE
    from aitbc_node.signing import KeyFileError, NodeKey

    pubkey = args.pubkey
    if not pubkey:
        key_path = _data_dir(args) / NODE_KEY_FILE
        if not key_path.exists():
            return fail(f"no node key at {key_path}; pass --pubkey")
        try:
            pubkey = NodeKey.load_or_create(key_path).public_key_hex
        except KeyFileError as e:
            return fail(str(e))
    try:
        store = _open_store(args, must_exist=True)
    except FileNotFoundError as e:
        return fail(str(e))
    try:
        report = audit(store.read(), pubkey, since=args.since)
    except ValueError as e:  # --since past the tip
        return fail(str(e))
    finally:
        store.close()
    if args.json:
        verdict = {
            "valid": report.ok,
            "public_key": pubkey,
            "since": args.since,
            "first_height": report.first_height,
            "tip_height": report.tip_height,
            "blocks": report.blocks,
            "receipts": report.receipts,
            "transactions": report.transactions,
            "unsealed": report.unsealed,
            "balances_checked": report.balances_checked,
            "problems": report.problems,
        }
        print(json.dumps(verdict, indent=2))
        return 0 if report.ok else EXIT_INVALID
    # The range names the tip, which `--since` takes next time.
    counts = (
        f"blocks {report.first_height}-{report.tip_height} ({report.blocks} blocks),"
        f" {report.receipts} receipts, {report.transactions} transactions"
        f" ({report.unsealed} not yet sealed)"
    )
    if report.ok and report.balances_checked:
        print(f"VALID: {counts}; every hash, root, signature, link and balance checks out")
        return 0
    if report.ok:
        first = report.first_height
        trusted = (
            f", block {first} linking to block {first - 1} as stored (blocks before it not"
            " looked at)"
            if first
            else ""
        )
        print(
            f"VALID: {counts}; every hash, root, signature and link checks out{trusted};"
            " balances not re-summed: that needs the whole history (verify without --since)"
        )
        return 0
    print(f"INVALID: {report.problems[0]}")
    for problem in report.problems[1:]:
        print(f"  also: {problem}")
    print(f"({counts})")
    return EXIT_INVALID


def chosen_parser(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> argparse.ArgumentParser:
    """The parser of the (sub-)command `args` were parsed for: `submit`, `keys create`..."""
    while True:
        chosen = None
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                chosen = action.choices.get(getattr(args, action.dest, None) or "")
        if chosen is None:
            return parser
        parser = chosen


def reject_unknown(
    parser: argparse.ArgumentParser, args: argparse.Namespace, unknown: list[str]
) -> NoReturn:
    """Exit 2 over arguments no parser took, with the usage of the command they were given
    to and, for a mistyped flag, the closest real one. (argparse alone blames the top-level
    command, whose usage does not help.)"""
    import difflib

    command = chosen_parser(parser, args)
    flags = [o for a in command._actions for o in a.option_strings if len(o) > 2]
    message = "unrecognized arguments: " + " ".join(unknown)
    hints = [
        close[0]
        for word in unknown
        if word.startswith("-")
        for close in [difflib.get_close_matches(word.split("=", 1)[0], flags, n=1, cutoff=0.75)]
        if close
    ]
    if hints:
        message += f" (did you mean {' or '.join(dict.fromkeys(hints))}?)"
    command.error(message)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `aitbc-node` command."""
    # The data directory and everything in it (the database and its -wal and -shm files
    # hold webhook secrets and prompts) are the owner's alone, whichever command makes them.
    os.umask(0o077)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv.insert(0, "serve")
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        reject_unknown(parser, args, unknown)
    if args.command == "serve":
        # Flags are parsed; options no flag set take their AITBC_* env or config file value.
        from aitbc_node import settings_sources

        try:
            resolved = settings_sources.resolve(
                settings_sources.subparser(parser, "serve"), argv[1:], args
            )
        except settings_sources.ConfigError as e:
            return fail(str(e))
        if args.print_config:
            print(resolved.render(args))
            return 0
    try:
        return args.run(args)
    except StorageFull as e:  # a full disk is the operator's to fix: one line, no traceback
        return fail(e.detail)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        return fail(f"no space left on the device for {e.filename or 'the data directory'}")


if __name__ == "__main__":
    raise SystemExit(main())
