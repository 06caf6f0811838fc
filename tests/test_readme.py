"""The README's promises that code can check: its commands and its verification snippet."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, NodeProcess
from tests.test_webhooks import only_delivery

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


def test_the_webhook_receiver_accepts_a_real_event_and_rejects_a_forgery(
    start_node, tmp_path: Path
) -> None:
    import os
    import socket
    import time

    snippet = README.split("<!-- webhook-receiver -->", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", snippet, re.S).group(1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "receiver.py"
    script.write_text(snippet.replace("9000", str(port)))
    node = start_node("--no-miner", "--webhook-allow", "127.0.0.1/32")
    hook = node.request(
        "POST",
        "/v1/webhooks",
        node.client_key,
        json={"url": f"http://127.0.0.1:{port}/hook", "events": ["job.cancelled"]},
    ).json()
    receiver = subprocess.Popen(
        [sys.executable, str(script)],
        env={**os.environ, "WEBHOOK_SECRET": hook["secret"]},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:  # until the receiver listens
            assert receiver.poll() is None, receiver.communicate()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=10).close()
                break
            except OSError:
                assert time.monotonic() < deadline, f"the receiver never listened on {port}"
                time.sleep(0.05)
        forged = httpx_post(port, b'{"event": "job.cancelled"}', "t=1,v1=00")
        assert forged == 400
        node.register_miner("m")
        job_id = node.submit("cancel me")["job_id"]
        node.request("POST", f"/v1/jobs/{job_id}/cancel", node.client_key)
        delivery = only_delivery(node, hook["webhook_id"], lambda d: d["state"] != "pending")
        assert delivery["attempts"][-1]["status_code"] == 204
    finally:
        receiver.terminate()
        out, _ = receiver.communicate(timeout=120)
    assert out.split() == ["job.cancelled", job_id, "None"]


def httpx_post(port: int, body: bytes, signature: str) -> int:
    import httpx

    return httpx.post(
        f"http://127.0.0.1:{port}/hook",
        content=body,
        headers={"AITBC-Signature": signature, "AITBC-Event-Id": "evt-forged"},
        timeout=120,
    ).status_code
