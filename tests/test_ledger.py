"""Receipts, the ledger and the explorer API against real nodes and the real model."""

from __future__ import annotations

import copy
import json
import sqlite3
import time
from pathlib import Path

import pytest

from aitbc_node.chain import block_problems, verify_inclusion
from aitbc_node.receipts import (
    hash_request,
    hash_result,
    receipt_body,
    sign_receipt,
    verify_receipt,
)
from aitbc_node.signing import NodeKey, address_for_identity
from tests.conftest import SMOL, NodeProcess, db_snapshot, run_cli
from tests.test_jobs_api import assert_error


def completed_job(node: NodeProcess, prompt: str = "Name a colour.", key: str | None = None):
    job = node.submit(prompt, key=key, params={"max_tokens": 12, "temperature": 0.5, "seed": 3})
    return node.wait_for(job["job_id"], ("completed",), key=key)


def sealed_proof(node: NodeProcess, receipt_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        r = node.request("GET", f"/v1/receipts/{receipt_id}/proof")
        if r.status_code == 200:
            return r.json()
        assert r.json()["error_code"] == "RECEIPT_NOT_SEALED"
        assert int(r.headers["retry-after"]) >= 1
        assert time.monotonic() < deadline, "the receipt was never sealed"
        time.sleep(0.1)


def node_public_key(node: NodeProcess) -> str:
    return node.request("GET", "/health").json()["node"]["public_key"]


def test_a_completed_job_has_a_receipt_that_verifies(node: NodeProcess) -> None:
    job = completed_job(node)
    assert job["receipt_id"].startswith("rcpt-")
    receipt = node.request("GET", f"/v1/receipts/{job['receipt_id']}").json()
    pubkey = node_public_key(node)
    assert verify_receipt(receipt, pubkey).valid
    assert receipt["job_id"] == job["job_id"]
    assert receipt["miner_id"] == "builtin"
    assert receipt["model"]["name"] == SMOL and len(receipt["model"]["sha256"]) == 64
    assert receipt["request_sha256"] == hash_request(job["prompt"], job["params"])
    assert receipt["result_sha256"] == hash_result(job["result"])
    assert receipt["prompt_tokens"] == job["usage"]["prompt_tokens"]
    assert receipt["completion_tokens"] == job["usage"]["completion_tokens"]
    assert receipt["units"] == job["usage"]["total_tokens"]
    assert receipt["amount"] == receipt["units"] * receipt["unit_price"]
    assert receipt["client_address"] == address_for_identity("client", "default")
    assert receipt["completed_at"] == job["completed_at"]
    # the node's own verify endpoint agrees, and so does the CLI
    r = node.request("POST", "/v1/receipts/verify", json={"receipt": receipt})
    assert r.json()["valid"] is True and r.json()["reasons"] == []


def test_any_change_to_a_real_receipt_fails_verification(node: NodeProcess) -> None:
    receipt = node.request("GET", f"/v1/receipts/{completed_job(node)['receipt_id']}").json()
    pubkey = node_public_key(node)
    for field in receipt_body(receipt):
        tampered = copy.deepcopy(receipt)
        value = tampered[field]
        if isinstance(value, int):
            tampered[field] = value + 1
        elif isinstance(value, dict):
            tampered[field]["name"] = value["name"] + "x"
        else:
            tampered[field] = value[:-1] + ("0" if value[-1] != "0" else "1")
        verdict = verify_receipt(tampered, pubkey)
        assert not verdict.valid and verdict.reasons, field
        r = node.request("POST", "/v1/receipts/verify", json={"receipt": tampered})
        assert r.json()["valid"] is False and r.json()["reasons"]
    bad_signature = copy.deepcopy(receipt)
    bad_signature["signature"]["value"] = "0" * 128
    assert not verify_receipt(bad_signature, pubkey).valid
    other = NodeKey.generate()
    assert not verify_receipt(receipt, other.public_key_hex).valid
    # a forger who re-signs with their own key and names it is still refused
    forged_body = receipt_body(receipt) | {"node_key_id": other.key_id, "amount": 0}
    forged = sign_receipt(forged_body, other)
    verdict = verify_receipt(forged, pubkey)
    assert not verdict.valid and any("key" in r for r in verdict.reasons)
    r = node.request("POST", "/v1/receipts/verify", json={"receipt": forged})
    assert r.json()["valid"] is False


def test_proof_verifies_against_the_block_root_and_signature(node: NodeProcess) -> None:
    job = completed_job(node)
    receipt = node.request("GET", f"/v1/receipts/{job['receipt_id']}").json()
    proof = sealed_proof(node, job["receipt_id"])
    pubkey = node_public_key(node)
    assert verify_inclusion(receipt, proof, pubkey) == []
    assert block_problems(proof["block"], pubkey) == []
    block = node.request("GET", f"/explorer/blocks/{proof['block_height']}").json()
    assert job["receipt_id"] in block["receipt_ids"]
    assert block["hash"] == proof["block"]["hash"]
    # a proof for the wrong receipt, or with a changed path, fails
    other = node.request("GET", f"/v1/receipts/{completed_job(node, 'Hi')['receipt_id']}").json()
    assert verify_inclusion(other, proof, pubkey)
    if proof["path"]:
        broken = copy.deepcopy(proof)
        broken["path"][0]["hash"] = "0" * 64
        assert verify_inclusion(receipt, broken, pubkey)
    assert verify_inclusion(receipt, proof, NodeKey.generate().public_key_hex)


def test_cli_verifies_a_receipt_and_its_proof(node: NodeProcess, tmp_path: Path) -> None:
    job = completed_job(node)
    receipt = node.request("GET", f"/v1/receipts/{job['receipt_id']}").json()
    proof = sealed_proof(node, job["receipt_id"])
    (tmp_path / "r.json").write_text(json.dumps(receipt, indent=4))
    (tmp_path / "p.json").write_text(json.dumps(proof))
    pubkey = node_public_key(node)
    ok = run_cli(
        "verify", str(tmp_path / "r.json"), "--pubkey", pubkey, "--proof", str(tmp_path / "p.json")
    )
    assert ok.stdout.startswith("VALID") and f"block {proof['block_height']}" in ok.stdout
    receipt["amount"] += 1
    (tmp_path / "bad.json").write_text(json.dumps(receipt))
    bad = run_cli("verify", str(tmp_path / "bad.json"), "--pubkey", pubkey, check=False)
    assert bad.returncode == 1 and bad.stdout.startswith("INVALID")
    shown = json.loads(run_cli("keys", "show", "--json", "--data-dir", str(node.data_dir)).stdout)
    assert shown["public_key"] == pubkey
    node_info = node.request("GET", "/v1/node").json()
    assert node_info["public_key"] == pubkey and node_info["key_id"] == shown["key_id"]


def test_receipt_lists_page_and_filter_by_client(node: NodeProcess) -> None:
    key = node.new_key("client", "receipt-lister")
    ids = [completed_job(node, f"Say {i}", key=key)["receipt_id"] for i in range(3)]
    address = address_for_identity("client", "receipt-lister")
    page = node.request("GET", "/v1/receipts", params={"client": address, "limit": 2}).json()
    assert [e["receipt"]["receipt_id"] for e in page["receipts"]] == ids[::-1][:2]
    rest = node.request(
        "GET", "/v1/receipts", params={"client": address, "cursor": page["next_cursor"]}
    ).json()
    assert [e["receipt"]["receipt_id"] for e in rest["receipts"]] == ids[:1]
    assert_error(
        node.request("GET", "/v1/receipts", params={"client": "bob"}), 400, "INVALID_ADDRESS"
    )
    assert_error(node.request("GET", "/v1/receipts/rcpt-nope"), 404, "RECEIPT_NOT_FOUND")


def test_explorer_endpoints(node: NodeProcess) -> None:
    job = completed_job(node)
    sealed_proof(node, job["receipt_id"])
    stats = node.request("GET", "/explorer/stats").json()
    assert stats["height"] >= 1 and stats["receipts"] >= 1 and stats["transactions"] >= 2
    assert stats["jobs"]["completed"] >= 1 and stats["tokens_generated"] > 0
    assert stats["total_value_moved"] > 0
    blocks = node.request("GET", "/explorer/blocks", params={"limit": 1}).json()
    assert blocks["blocks"][0]["height"] == stats["height"] and blocks["next_cursor"]
    older = node.request("GET", "/explorer/blocks", params={"cursor": blocks["next_cursor"]}).json()
    assert older["blocks"][0]["height"] == stats["height"] - 1
    genesis = node.request("GET", "/explorer/blocks/0").json()
    assert genesis["prev_hash"] == "0" * 64 and genesis["receipt_count"] == 0
    assert genesis["node_public_key"] == node_public_key(node)
    assert_error(node.request("GET", "/explorer/blocks/999999"), 404, "BLOCK_NOT_FOUND")
    txs = node.request("GET", "/explorer/transactions").json()["transactions"]
    assert {t["kind"] for t in txs} <= {"grant", "payment"}
    payment = next(t for t in txs if t["job_id"] == job["job_id"])
    assert payment["receipt_id"] == job["receipt_id"]
    receipts = node.request("GET", "/explorer/receipts", params={"limit": 5}).json()["receipts"]
    assert any(e["receipt"]["receipt_id"] == job["receipt_id"] for e in receipts)
    account = node.request("GET", f"/explorer/addresses/{payment['to']}").json()
    assert account["kind"] == "miner" and account["identity"] == "builtin"
    assert account["balance"] > 0
    assert_error(node.request("GET", "/explorer/addresses/nope"), 400, "INVALID_ADDRESS")


def test_balances_are_grants_minus_payments(start_node) -> None:
    node = start_node("--credit", "5", "--default-price", "1", "--block-interval", "0.2")
    others = [node.new_key("client", f"payer-{i}") for i in range(2)]
    keys = [node.client_key, *others]
    jobs = [
        node.submit(f"Say {i}", key=k, params={"max_tokens": 6}) for i, k in enumerate(keys * 4)
    ]
    for job, key in zip(jobs, keys * 4, strict=True):
        node.wait_for(job["job_id"], ("completed",), key=key)
    db = sqlite3.connect(node.data_dir / "node.db")
    grants = dict(
        db.execute(
            "SELECT to_address, sum(amount) FROM transactions"
            " WHERE kind = 'grant' GROUP BY to_address"
        )
    )
    paid = dict(
        db.execute(
            "SELECT from_address, sum(amount) FROM transactions"
            " WHERE kind = 'payment' GROUP BY from_address"
        )
    )
    earned = dict(
        db.execute(
            "SELECT to_address, sum(amount) FROM transactions"
            " WHERE kind = 'payment' GROUP BY to_address"
        )
    )
    receipts = [json.loads(d) for (d,) in db.execute("SELECT document FROM receipts")]
    assert len(receipts) == 12
    assert sum(paid.values()) == sum(r["amount"] for r in receipts)
    addresses = set(grants) | set(paid) | set(earned)
    assert len(addresses) == 4  # three clients and the built-in miner
    for address in addresses:
        expected = grants.get(address, 0) - paid.get(address, 0) + earned.get(address, 0)
        shown = node.request("GET", f"/explorer/addresses/{address}").json()
        assert shown["balance"] == expected
    # --credit sets the default key's grant; keys made later get the keys command's default
    assert grants[address_for_identity("client", "default")] == 5 * 10**9
    assert grants[address_for_identity("client", "payer-0")] == 1000 * 10**9


def test_require_funds_refuses_a_short_client_and_writes_nothing(start_node) -> None:
    node = start_node("--require-funds", "--default-price", "1")
    # 1 AIT per 1,000 tokens: the default grant of 1000 AIT covers max_tokens=256 easily
    funded = node.new_key("client", "funded")
    r = node.request("POST", "/v1/jobs", funded, json={"prompt": "hi", "model": SMOL})
    assert r.status_code == 201
    empty = run_cli(
        "keys",
        "create",
        "--role",
        "client",
        "--name",
        "empty",
        "--credit",
        "0",
        "--data-dir",
        str(node.data_dir),
    ).stdout.strip()
    before = db_snapshot(node.data_dir)
    r = node.request(
        "POST",
        "/v1/jobs",
        empty,
        json={"prompt": "hi", "model": SMOL, "params": {"max_tokens": 10}},
    )
    err = assert_error(r, 402, "INSUFFICIENT_FUNDS")
    assert "holds 0 AIT" in err["detail"] and "0.01 AIT" in err["detail"]
    assert db_snapshot(node.data_dir) == before


def test_sigkill_before_sealing_loses_no_receipt(start_node) -> None:
    node = start_node("--block-interval", "3600")
    jobs = [node.submit(f"Say {i}", params={"max_tokens": 4}) for i in range(5)]
    for job in jobs:
        node.wait_for(job["job_id"], ("completed",))
    db = sqlite3.connect(node.data_dir / "node.db")
    assert db.execute("SELECT count(*) FROM receipts WHERE block_height IS NULL").fetchone()[0] == 5
    db.close()
    node.kill()
    again = start_node("--block-interval", "0.2", data_dir=node.data_dir)
    for job in jobs:
        assert again.job(job["job_id"])["receipt_id"]
    deadline = time.monotonic() + 120
    while again.request("GET", "/explorer/stats").json()["unsealed_receipts"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    db = sqlite3.connect(again.data_dir / "node.db")
    rows = db.execute("SELECT job_id, block_height FROM receipts").fetchall()
    assert sorted(j for j, _ in rows) == sorted(j["job_id"] for j in jobs)
    assert all(h is not None for _, h in rows)
    again.stop()
    ok = run_cli("verify", "--data-dir", str(again.data_dir))
    assert ok.stdout.startswith("VALID")


@pytest.fixture
def stopped_chain(start_node) -> Path:
    """A node's data directory after a few jobs, every block sealed, the server stopped."""
    node = start_node("--block-interval", "0.2", "--block-max-items", "3")
    for i in range(4):
        completed_job(node, f"Say {i}")
    node.stop()
    assert run_cli("verify", "--data-dir", str(node.data_dir)).stdout.startswith("VALID")
    return node.data_dir


def tamper(data_dir: Path, sql: str, *args) -> None:
    db = sqlite3.connect(data_dir / "node.db")
    with db:
        assert db.execute(sql, args).rowcount == 1
    db.close()


def flip_one_byte(text: str, at: str) -> str:
    """Change the character after `at`, keeping the text the same length."""
    i = text.index(at) + len(at)
    return text[:i] + ("1" if text[i] != "1" else "2") + text[i + 1 :]


def verify_fails_naming(data_dir: Path, block: str) -> str:
    proc = run_cli("verify", "--data-dir", str(data_dir), check=False)
    assert proc.returncode == 1, proc.stdout
    first = proc.stdout.splitlines()[0]
    assert first.startswith("INVALID") and block in first, proc.stdout
    return proc.stdout


def test_editing_a_receipt_row_breaks_verify(stopped_chain: Path) -> None:
    db = sqlite3.connect(stopped_chain / "node.db")
    seq, doc, height = db.execute(
        "SELECT seq, document, block_height FROM receipts ORDER BY seq LIMIT 1"
    ).fetchone()
    db.close()
    tamper(
        stopped_chain,
        "UPDATE receipts SET document = ? WHERE seq = ?",
        flip_one_byte(doc, '"completion_tokens":'),
        seq,
    )
    verify_fails_naming(stopped_chain, f"block {height}")


def test_editing_a_transaction_row_breaks_verify(stopped_chain: Path) -> None:
    db = sqlite3.connect(stopped_chain / "node.db")
    seq, height = db.execute(
        "SELECT seq, block_height FROM transactions WHERE kind = 'payment' LIMIT 1"
    ).fetchone()
    db.close()
    tamper(stopped_chain, "UPDATE transactions SET amount = amount + 1 WHERE seq = ?", seq)
    verify_fails_naming(stopped_chain, f"block {height}")


def test_editing_a_block_row_breaks_verify(stopped_chain: Path) -> None:
    db = sqlite3.connect(stopped_chain / "node.db")
    header = db.execute("SELECT header FROM blocks WHERE height = 2").fetchone()[0]
    db.close()
    tamper(
        stopped_chain,
        "UPDATE blocks SET header = ? WHERE height = 2",
        flip_one_byte(header, '"timestamp":"20'),
    )
    verify_fails_naming(stopped_chain, "block 2")


def test_deleting_a_block_row_breaks_verify(stopped_chain: Path) -> None:
    tamper(stopped_chain, "DELETE FROM blocks WHERE height = 2")
    verify_fails_naming(stopped_chain, "block 2")


def test_deleting_the_last_block_breaks_verify(stopped_chain: Path) -> None:
    db = sqlite3.connect(stopped_chain / "node.db")
    (last,) = db.execute("SELECT max(height) FROM blocks").fetchone()
    db.close()
    tamper(stopped_chain, "DELETE FROM blocks WHERE height = ?", last)
    verify_fails_naming(stopped_chain, f"block {last}")
