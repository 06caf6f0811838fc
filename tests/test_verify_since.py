"""`aitbc-node verify --data-dir DIR --since HEIGHT`: the chain from a height on, block
HEIGHT-1 trusted as stored, balances not re-summed."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from aitbc_node.audit import audit
from aitbc_node.cli import build_parser
from aitbc_node.config import JobRules
from aitbc_node.keys import Principal, create_key
from aitbc_node.node import NODE_KEY_FILE, Node, NodeSettings
from aitbc_node.schemas import JobParams, SubmitJob
from aitbc_node.signing import NodeKey
from aitbc_node.store import Store
from tests.conftest import run_cli
from tests.test_ledger import flip_one_byte, tamper

CLIENT = Principal(key_id="key-test", name="payer", role="client", identity="payer")


def build_ledger(data_dir: Path, jobs: int = 10) -> None:
    """A node's data directory with `jobs` completed jobs sealed three items a block (so a
    payment often lands a block after its receipt), and one receipt left unsealed. The node
    runs in this process, never started: the test drives every change, then closes it."""
    node = Node(
        NodeSettings(
            data_dir=data_dir, run_miner=False, rules=JobRules(accept_unserved_models=True)
        )
    )
    try:
        node.miners.upsert("m1", ["tiny"], {}, builtin=False)
        create_key(node.store, "client", "payer", credit=10**12)
        request = SubmitJob(prompt="pay me", model="tiny", params=JobParams(max_tokens=4))

        def complete(i: int) -> None:
            job_id = node.jobs.submit(CLIENT, request)[0]["job_id"]
            node.jobs.claim_as("m1", '["tiny"]', job_id)
            node.jobs.finish(job_id, "m1", result=f"r{i}", prompt_tokens=2, completion_tokens=i)

        for i in range(jobs):
            complete(i)
            if i % 2:
                node.ledger.seal(max_items=3)
        while node.ledger.seal(max_items=3) is not None:
            pass
        complete(jobs)  # its receipt and payment stay unsealed
    finally:
        node.store.close()


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data_dir = tmp_path_factory.mktemp("verify-since") / "data"
    build_ledger(data_dir)
    return data_dir


@pytest.fixture
def ledger(template: Path, tmp_path: Path) -> Path:
    """A fresh copy of the built ledger for one test to verify or tamper with."""
    return Path(shutil.copytree(template, tmp_path / "data"))


def query(data_dir: Path, sql: str, *args: object) -> list[tuple]:
    db = sqlite3.connect(data_dir / "node.db")
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def tip(data_dir: Path) -> int:
    return query(data_dir, "SELECT max(height) FROM blocks")[0][0]


def verify(data_dir: Path, *args: str) -> tuple[int, str]:
    proc = run_cli("verify", "--data-dir", str(data_dir), *args, check=False)
    return proc.returncode, proc.stdout + proc.stderr


def test_since_checks_from_a_height_and_names_the_range(ledger: Path) -> None:
    top = tip(ledger)
    since = top - 3
    code, out = verify(ledger, "--since", str(since))
    assert code == 0, out
    assert out.startswith(f"VALID: blocks {since}-{top} (4 blocks), "), out
    assert "balances not re-summed" in out and f"linking to block {since - 1}" in out
    code, out = verify(ledger, "--since", str(since), "--json")
    assert code == 0, out
    verdict = json.loads(out)
    assert verdict["valid"] is True and verdict["problems"] == []
    assert (verdict["since"], verdict["first_height"], verdict["tip_height"]) == (since, since, top)
    assert verdict["blocks"] == 4 and verdict["balances_checked"] is False
    assert verdict["unsealed"] == 2  # the last job's receipt and payment
    # from genesis, the VALID line names the tip too, and the balances are checked
    code, out = verify(ledger)
    assert code == 0 and out.startswith(f"VALID: blocks 0-{top} ({top + 1} blocks), "), out
    assert "link and balance checks out" in out


def test_every_starting_height_passes_on_a_sound_ledger(ledger: Path) -> None:
    """No false alarm at any boundary, a payment whose receipt sits in the block below
    included: it is looked up, and matched, there."""
    top = tip(ledger)
    split = query(
        ledger,
        "SELECT t.block_height FROM transactions AS t JOIN receipts AS r USING (job_id)"
        " WHERE t.kind = 'payment' AND r.block_height < t.block_height",
    )
    assert split, "the ledger should hold a payment sealed after its receipt's block"
    store = Store(ledger / "node.db")
    try:
        pubkey = NodeKey.load_or_create(ledger / NODE_KEY_FILE).public_key_hex
        for since in range(top + 1):
            report = audit(store.read(), pubkey, since=since)
            assert report.ok, (since, report.problems)
            assert report.blocks == top - since + 1 and report.tip_height == top
        with pytest.raises(ValueError, match="past the chain's tip"):
            audit(store.read(), pubkey, since=top + 1)
    finally:
        store.close()


def test_a_tampered_receipt_from_height_on_is_caught(ledger: Path) -> None:
    top = tip(ledger)
    seq, doc, height = query(
        ledger,
        "SELECT seq, document, block_height FROM receipts WHERE block_height IS NOT NULL"
        " ORDER BY block_height DESC LIMIT 1",
    )[0]
    tamper(
        ledger,
        "UPDATE receipts SET document = ? WHERE seq = ?",
        flip_one_byte(doc, '"completion_tokens":'),
        seq,
    )
    since = height - 1
    code, out = verify(ledger, "--since", str(since))
    assert code == 1 and out.startswith(f"INVALID: block {height}: receipt"), out
    assert f"(blocks {since}-{top} ({top - since + 1} blocks)" in out
    code, out = verify(ledger, "--since", str(height))  # from its own block, too
    assert code == 1 and out.startswith(f"INVALID: block {height}: receipt"), out


def test_a_tampered_unsealed_receipt_is_caught(ledger: Path) -> None:
    seq, doc = query(ledger, "SELECT seq, document FROM receipts WHERE block_height IS NULL")[0]
    tamper(
        ledger,
        "UPDATE receipts SET document = ? WHERE seq = ?",
        flip_one_byte(doc, '"completion_tokens":'),
        seq,
    )
    code, out = verify(ledger, "--since", str(tip(ledger)))
    assert code == 1 and out.startswith("INVALID: unsealed: receipt"), out


def test_tampering_below_height_is_not_looked_at(ledger: Path) -> None:
    """Blocks below HEIGHT are trusted: a receipt edited there passes `--since HEIGHT` (as
    the help says), and only a verify from genesis finds it."""
    seq, doc = query(ledger, "SELECT seq, document FROM receipts WHERE block_height = 1")[0]
    tamper(
        ledger,
        "UPDATE receipts SET document = ? WHERE seq = ?",
        flip_one_byte(doc, '"completion_tokens":'),
        seq,
    )
    code, out = verify(ledger, "--since", "3")
    assert code == 0 and out.startswith("VALID: blocks 3-"), out
    code, out = verify(ledger)
    assert code == 1 and out.startswith("INVALID: block 1"), out
    since_help = next(
        a.help
        for a in build_parser()._subparsers._group_actions[0].choices["verify"]._actions
        if "--since" in a.option_strings
    )
    assert "below HEIGHT are NOT looked at" in since_help and "HEIGHT-1" in since_help


def test_a_broken_link_at_height_is_caught(ledger: Path) -> None:
    top = tip(ledger)
    since = top - 2
    tamper(
        ledger,
        "UPDATE blocks SET block_hash = ? WHERE height = ?",
        "0" * 64,
        since - 1,
    )
    code, out = verify(ledger, "--since", str(since))
    assert code == 1, out
    assert out.startswith(f"INVALID: block {since}: does not link to block {since - 1}"), out
    tamper(ledger, "DELETE FROM blocks WHERE height = ?", since - 1)
    code, out = verify(ledger, "--since", str(since))
    assert code == 1 and out.startswith(f"INVALID: block {since - 1} is missing"), out


def test_since_past_the_tip_or_not_a_height_is_a_usage_error(ledger: Path) -> None:
    top = tip(ledger)
    code, out = verify(ledger, "--since", str(top + 1))
    assert code == 2 and f"--since {top + 1} is past the chain's tip (block {top})" in out, out
    code, out = verify(ledger, "--since", "-1")
    assert code == 2 and "-1 is less than 0" in out, out
    proc = run_cli("verify", "r.json", "--pubkey", "00", "--since", "1", check=False)
    assert proc.returncode == 2 and "--since HEIGHT goes with --data-dir" in proc.stderr
