"""The `aitbc-node` command as a user runs it."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aitbc_node import __version__
from aitbc_node.cli import build_parser
from aitbc_node.client import CoordinatorClient, CoordinatorError
from aitbc_node.signing import NodeKey
from tests.conftest import GENERATION_WAIT, ROOT, SMOL, NodeProcess, run_cli


def test_version_and_help() -> None:
    assert run_cli("--version").stdout.strip() == f"aitbc-node {__version__}"
    help_text = run_cli("--help").stdout
    assert "serve" in help_text and "keys" in help_text
    serve_help = run_cli("serve", "--help").stdout
    for flag in (
        "--host",
        "--port",
        "--data-dir",
        "--model",
        "--no-miner",
        "--gpu-layers",
        "--alias",
        "--lease-seconds",
    ):
        assert flag in serve_help


def test_start_banner_names_urls_data_dir_model_and_client_key(start_node) -> None:
    node: NodeProcess = start_node("--alias", f"llama3.2={SMOL}")
    out = node.output()
    assert f"http://127.0.0.1:{node.port}/api" in out
    assert f"http://127.0.0.1:{node.port}/" in out
    assert str(node.data_dir) in out
    assert SMOL in out and "llama3.2 -> " + SMOL in out
    assert node.client_key in out
    assert node.admin_key not in out


def test_first_start_makes_private_keys_and_data_dir(start_node) -> None:
    node: NodeProcess = start_node()
    creds = node.data_dir / "credentials.json"
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    assert stat.S_IMODE(node.data_dir.stat().st_mode) == 0o700
    assert set(json.loads(creds.read_text())) == {"admin", "client", "miner"}
    # the store keeps only hashes of the keys
    db = (node.data_dir / "node.db").read_bytes()
    for key in json.loads(creds.read_text()).values():
        assert key.encode() not in db


def test_keys_create_list_revoke(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    key = run_cli("keys", "create", "--role", "client", "--name", "carol", "--data-dir", data)
    assert key.stdout.startswith("ait_client_") and "not shown again" in key.stderr
    dup = run_cli(
        "keys", "create", "--role", "client", "--name", "carol", "--data-dir", data, check=False
    )
    assert dup.returncode == 2 and "exists" in dup.stderr
    bad = run_cli(
        "keys", "create", "--role", "client", "--name", "no spaces", "--data-dir", data, check=False
    )
    assert bad.returncode == 2 and "name must be" in bad.stderr
    listed = json.loads(run_cli("keys", "list", "--json", "--data-dir", data).stdout)
    assert [(k["name"], k["role"], k["revoked_at"]) for k in listed] == [("carol", "client", None)]
    assert key.stdout.strip() not in json.dumps(listed)
    assert "carol" in run_cli("keys", "list", "--data-dir", data).stdout
    out = run_cli("keys", "revoke", "carol", "--data-dir", data).stdout
    assert listed[0]["key_id"] in out
    listed = json.loads(run_cli("keys", "list", "--json", "--data-dir", data).stdout)
    assert listed[0]["revoked_at"] is not None
    missing = run_cli("keys", "revoke", "key-nope", "--data-dir", data, check=False)
    assert missing.returncode == 2 and "no key" in missing.stderr


def test_keys_create_and_revoke_print_json(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    made = run_cli(
        "keys", "create", "--role", "client", "--name", "dave", "--json", "--data-dir", data
    )
    created = json.loads(made.stdout)
    assert created["key"].startswith("ait_client_")
    assert "not shown again" in made.stderr
    listed = json.loads(run_cli("keys", "list", "--json", "--data-dir", data).stdout)
    assert listed == [{k: v for k, v in created.items() if k != "key"}]  # as `keys list`
    revoked = json.loads(run_cli("keys", "revoke", "dave", "--json", "--data-dir", data).stdout)
    assert revoked["key_id"] == created["key_id"] and revoked["revoked_at"] is not None
    assert revoked == json.loads(run_cli("keys", "list", "--json", "--data-dir", data).stdout)[0]


def _leaf_commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every command that runs (`submit`, `keys create`...), with its parser."""
    subcommands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subcommands:
        return [(path, parser)]
    return [
        leaf
        for action in subcommands
        for name, sub in action.choices.items()
        for leaf in _leaf_commands(sub, (*path, name))
    ]


def test_every_command_that_prints_a_result_has_json() -> None:
    leaves = dict(_leaf_commands(build_parser()))
    assert ("verify",) in leaves and ("keys", "revoke") in leaves and ("submit",) in leaves
    # serve and miner run until stopped; their output is a banner and logs (--log-format json).
    without = {
        path for path, parser in leaves.items() if "--json" not in parser._option_string_actions
    }
    assert without == {("serve",), ("miner",)}


def _sealed_proof(node: NodeProcess, receipt_id: str) -> dict:
    with CoordinatorClient(node.url, node.client_key) as client:
        deadline = time.monotonic() + GENERATION_WAIT
        while True:
            try:
                return client.get_receipt_proof(receipt_id)
            except CoordinatorError as e:
                assert e.error_code == "RECEIPT_NOT_SEALED", e
                assert time.monotonic() < deadline, "the receipt was never sealed"
                time.sleep(0.1)


def test_verify_prints_json(node: NodeProcess, tmp_path: Path) -> None:
    job = node.submit("Name a colour.", params={"max_tokens": 8, "seed": 3})
    job = node.wait_for(job["job_id"], ("completed",), timeout=GENERATION_WAIT)
    receipt = node.request("GET", f"/v1/receipts/{job['receipt_id']}").json()
    proof = _sealed_proof(node, job["receipt_id"])
    pubkey = node.request("GET", "/health").json()["node"]["public_key"]
    (tmp_path / "r.json").write_text(json.dumps(receipt))
    (tmp_path / "p.json").write_text(json.dumps(proof))

    valid = run_cli("verify", str(tmp_path / "r.json"), "--pubkey", pubkey, "--json")
    assert json.loads(valid.stdout) == {
        "valid": True,
        "receipt_id": receipt["receipt_id"],
        "public_key": pubkey,
        "reasons": [],
    }
    included = run_cli(
        "verify", str(tmp_path / "r.json"), "--pubkey", pubkey, "--proof", str(tmp_path / "p.json")
    )
    as_json = run_cli(
        "verify",
        str(tmp_path / "r.json"),
        "--pubkey",
        pubkey,
        "--proof",
        str(tmp_path / "p.json"),
        "--json",
    )
    verdict = json.loads(as_json.stdout)
    assert verdict["valid"] is True and verdict["block_height"] == proof["block_height"]
    assert f"block {proof['block_height']}" in included.stdout  # the text says the same

    other = NodeKey.generate().public_key_hex
    wrong = run_cli("verify", str(tmp_path / "r.json"), "--pubkey", other, "--json", check=False)
    assert wrong.returncode == 1
    verdict = json.loads(wrong.stdout)
    assert verdict["valid"] is False and verdict["reasons"] and verdict["public_key"] == other

    ledger = run_cli("verify", "--data-dir", str(node.data_dir), "--json")
    verdict = json.loads(ledger.stdout)
    assert verdict["valid"] is True and verdict["problems"] == [] and verdict["blocks"] >= 1
    assert verdict["public_key"] == pubkey
    assert {"receipts", "transactions", "unsealed"} <= set(verdict)


@pytest.mark.parametrize(
    ("args", "usage", "hint"),
    [
        (["keys", "revoke", "key-x", "--jsno"], "keys revoke", "--json"),
        (
            ["keys", "create", "--role", "client", "--name", "x", "--credt", "1"],
            "keys create",
            "--credit",
        ),
        (["verify", "r.json", "--pubky", "00"], "verify", "--pubkey"),
        (["serve", "--prot", "8080"], "serve", "--port"),
    ],
)
def test_a_flag_typo_shows_the_commands_usage_and_the_closest_flag(
    args: list[str], usage: str, hint: str
) -> None:
    proc = run_cli(*args, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"usage: aitbc-node {usage} "), proc.stderr
    assert proc.stderr.splitlines()[-1].endswith(f" (did you mean {hint}?)"), proc.stderr


def test_a_taken_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = run_cli("--port", str(port), "--data-dir", str(tmp_path / "d"), check=False)
    assert proc.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr


def test_a_missing_model_file_is_a_clear_error(tmp_path: Path) -> None:
    proc = run_cli(
        "serve",
        "--model",
        str(tmp_path / "nope.gguf"),
        "--data-dir",
        str(tmp_path / "d"),
        check=False,
    )
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    proc = run_cli("serve", "--alias", "broken", "--data-dir", str(tmp_path / "d"), check=False)
    assert proc.returncode == 2 and "NAME=MODEL" in proc.stderr
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a model" * 100)
    proc = run_cli(
        "serve",
        "--model",
        str(garbage),
        "--port",
        "0",
        "--data-dir",
        str(tmp_path / "d"),
        check=False,
    )
    assert proc.returncode == 2 and "cannot load model" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_ctrl_c_stops_the_node_cleanly(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "data", "--no-miner").start()
    try:
        node.proc.send_signal(signal.SIGINT)
        assert node.proc.wait(120) == 0
    finally:
        node.stop()
    assert "stopped cleanly" in node.output()
    assert "Traceback" not in node.output()


def test_serve_is_the_default_command_and_data_dir_env(tmp_path: Path) -> None:
    env = {**os.environ, "AITBC_DATA_DIR": str(tmp_path / "from-env")}
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    number = port.getsockname()[1]
    port.close()
    proc = subprocess.Popen(
        [sys.executable, "-m", "aitbc_node", "--port", str(number), "--no-miner"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300  # a bound on the start of a loaded machine
        while not (tmp_path / "from-env" / "credentials.json").exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    assert str(tmp_path / "from-env") in out


def test_listening_socket_is_tcp_so_responses_are_not_delayed() -> None:
    # asyncio turns on TCP_NODELAY for accepted connections only when the listening socket's
    # proto is TCP; a bare socket.socket() (proto 0) made every response wait ~40 ms.
    from aitbc_node.server import bind

    sock = bind("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()
