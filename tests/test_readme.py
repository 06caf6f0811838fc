"""The README's promises that code can check: its commands and its verification snippet."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, NodeProcess

README = (ROOT / "README.md").read_text()


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


def test_readme_begins_with_the_run_and_test_commands_and_ci_runs_the_test_one() -> None:
    run_command, test_command = (block.strip() for block in code_blocks("bash")[:2])
    assert "aitbc-node" in run_command and "build/venv.sh" in run_command
    assert "pytest" in test_command
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci.splitlines()


def test_the_ten_line_pynacl_snippet_verifies_a_real_receipt(
    node: NodeProcess, tmp_path: Path
) -> None:
    snippet = README.split("<!-- verify-snippet -->", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", snippet, re.S).group(1)
    assert len(snippet.strip().splitlines()) <= 10
    script = tmp_path / "verify.py"
    script.write_text(snippet)
    job = node.submit("Say yes.", params={"max_tokens": 4})
    job = node.wait_for(job["job_id"], ("completed",))
    receipt = node.request("GET", f"/v1/receipts/{job['receipt_id']}").json()
    pubkey = node.request("GET", "/health").json()["node"]["public_key"]

    def run(doc: dict) -> subprocess.CompletedProcess[str]:
        path = tmp_path / "receipt.json"
        path.write_text(json.dumps(doc, indent=2))
        return subprocess.run(
            [sys.executable, str(script), str(path), pubkey], capture_output=True, text=True
        )

    ok = run(receipt)
    assert ok.returncode == 0 and ok.stdout.strip() == f"valid: {receipt['receipt_id']}"
    forged = run(receipt | {"amount": 0})
    assert forged.returncode != 0 and "BadSignatureError" in forged.stderr
