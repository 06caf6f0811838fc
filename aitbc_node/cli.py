"""The `aitbc-node` command: `serve` (the default) and `keys`.

Run `aitbc-node --help`, or `aitbc-node COMMAND --help`, for every flag.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from aitbc_node import __version__
from aitbc_node.config import DEFAULT_HOST, DEFAULT_PORT, JobRules, Limits, default_data_dir
from aitbc_node.errors import ApiError
from aitbc_node.models import ModelError, embedded_model, parse_alias_arg, parse_model_arg

if TYPE_CHECKING:
    from aitbc_node.node import Node

COMMANDS = ("serve", "keys")


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
        "--log-level", default="warning", choices=["debug", "info", "warning", "error"]
    )
    serve.set_defaults(run=cmd_serve)

    keys = commands.add_parser(
        "keys",
        help="create, list and revoke API keys",
        description="Manage API keys. Works whether or not the node is running.",
    )
    key_commands = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    create = key_commands.add_parser("create", help="make a key and print it (shown only once)")
    create.add_argument("--role", required=True, choices=["client", "miner", "admin"])
    create.add_argument(
        "--name",
        required=True,
        help="the identity the key acts as: a client name, or the miner_id of a miner",
    )
    add_data_dir(create)
    create.set_defaults(run=cmd_keys_create)
    listing = key_commands.add_parser("list", help="list keys (never their secrets)")
    listing.add_argument("--json", action="store_true", help="print JSON")
    add_data_dir(listing)
    listing.set_defaults(run=cmd_keys_list)
    revoke = key_commands.add_parser("revoke", help="revoke a key by id (or unique name)")
    revoke.add_argument("key", help="a key id (key-...) or a key's name")
    add_data_dir(revoke)
    revoke.set_defaults(run=cmd_keys_revoke)
    return parser


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
    return 2


def cmd_serve(args: argparse.Namespace) -> int:
    from aitbc_node import server
    from aitbc_node.node import NodeSettings

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
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
    settings = NodeSettings(
        data_dir=(args.data_dir or default_data_dir()).expanduser().resolve(),
        host=args.host,
        port=args.port,
        models=models,
        run_miner=not args.no_miner,
        gpu_layers=args.gpu_layers,
        context=args.ctx_size,
        threads=args.threads,
        rules=JobRules(
            lease_seconds=args.lease_seconds,
            max_attempts=args.max_attempts,
            miner_timeout_seconds=args.miner_timeout,
            accept_unserved_models=args.accept_unserved_models,
            aliases=aliases,
        ),
        limits=Limits(max_tokens=args.max_tokens_limit),
    )
    try:
        sock = server.bind(settings.host, settings.port)
    except server.PortInUse as e:
        return fail(f"{e} (is another node running? pick another with --port)")
    port = sock.getsockname()[1]

    def banner(node: Node) -> None:
        print(startup_banner(node, port), flush=True)

    server.run(settings, sock, banner)
    print("aitbc-node: stopped cleanly", flush=True)
    return 0


def startup_banner(node: Node, port: int) -> str:
    """What `serve` prints once it is listening."""
    host = node.settings.host
    shown_host = f"[{host}]" if ":" in host else host
    base = f"http://{shown_host}:{port}"
    lines = [f"aitbc-node {__version__} is running", ""]
    lines.append(f"  API         {base}/api")
    lines.append(f"  Explorer    {base}/")
    lines.append(f"  Data        {node.data_dir}")
    if node.miner is not None:
        backend = node.miner.gpu_info["backend"]
        for engine in node.miner.engines.values():
            lines.append(f"  Model       {engine.model.name} ({engine.model.path.name}, {backend})")
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
    model = node.miners.served_models()[0] if node.miners.served_models() else "MODEL"
    lines += [
        "",
        "Try it:",
        f"  curl -s -X POST {base}/api/v1/jobs -H 'X-Api-Key: {client_key}' \\",
        "       -H 'Content-Type: application/json' \\",
        f'       -d \'{{"prompt": "Say hello", "model": "{model}"}}\'',
    ]
    return "\n".join(lines)


def _open_store(args: argparse.Namespace):
    from aitbc_node.store import Store

    data_dir = (args.data_dir or default_data_dir()).expanduser()
    from aitbc_node.node import DATABASE_FILE

    return Store(data_dir / DATABASE_FILE)


def cmd_keys_create(args: argparse.Namespace) -> int:
    from aitbc_node import keys

    store = _open_store(args)
    try:
        key, row = keys.create_key(store, args.role, args.name)
    except ApiError as e:
        return fail(e.detail)
    finally:
        store.close()
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
    print(f"revoked {row['key_id']} ({row['role']} {row['name']})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `aitbc-node` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv.insert(0, "serve")
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
