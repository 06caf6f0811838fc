"""A client generated from the node's own OpenAPI document works: openapi-python-client turns
`/api/schema/openapi.json` into a Python package, and that package alone submits a job, waits
for it, and reads (and verifies) its receipt against a real node.

The generator runs offline on the document fetched from the node, as a subprocess, with
warnings treated as errors: a warning means part of the document could not be turned into
code (a model or a response left out), so a client would silently lose it.
"""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
import time
import typing
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from aitbc_node.receipts import verify_receipt
from tests.conftest import GENERATION_WAIT, NodeProcess

PACKAGE = "aitbc_generated_client"


def generate_client(document: dict, where: Path) -> Path:
    """Generate the client package for `document` under `where`; returns its directory."""
    spec = where / "openapi.json"
    spec.write_text(json.dumps(document))
    config = where / "generator.json"
    # No post hooks: formatting the generated code is not what is tested, and needs no tool.
    config.write_text(json.dumps({"package_name_override": PACKAGE, "post_hooks": []}))
    package = where / PACKAGE
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "openapi_python_client",
            "generate",
            "--path",
            str(spec),
            "--meta",
            "none",
            "--config",
            str(config),
            "--output-path",
            str(package),
            "--fail-on-warning",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=where,
    )
    assert proc.returncode == 0, (
        f"the generator refused the document:\n{proc.stdout}\n{proc.stderr}"
    )
    assert (package / "client.py").exists(), proc.stdout
    return package


def endpoint(package: Path, method: str, path: str) -> ModuleType:
    """The generated module for the operation `method path`, found by the request it makes
    (module names follow operation ids, which the document may choose freely)."""
    wanted_method = f'"method": "{method}"'
    wanted_url = re.compile(r'"url": "' + re.escape(path) + '"')
    found = [
        file
        for file in sorted((package / "api").rglob("*.py"))
        if wanted_method in (text := file.read_text()) and wanted_url.search(text)
    ]
    assert len(found) == 1, f"{method.upper()} {path}: {found}"
    relative = found[0].relative_to(package.parent).with_suffix("")
    return importlib.import_module(".".join(relative.parts))


def body_type(module: ModuleType) -> Any:
    """The generated model class an operation takes as its body."""
    return typing.get_type_hints(module.sync_detailed)["body"]


def text_of(value: Any) -> str:
    """An enum member's value, or the string itself."""
    return getattr(value, "value", value)


@pytest.fixture
def importable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A directory to generate the client into, importable for this test only."""
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
        del sys.modules[name]


def test_a_generated_client_submits_waits_and_reads_the_receipt(
    importable: Path, node: NodeProcess
) -> None:
    document = node.request("GET", "/schema/openapi.json")
    assert document.status_code == 200, document.text
    generated = generate_client(document.json(), importable)
    client_module = importlib.import_module(f"{PACKAGE}.client")
    base_url = f"http://127.0.0.1:{node.port}"
    timeout = httpx.Timeout(120)
    client = client_module.AuthenticatedClient(
        base_url=base_url,
        token=node.client_key,
        prefix="",
        auth_header_name="X-Api-Key",
        timeout=timeout,
        raise_on_unexpected_status=True,
    )
    public = client_module.Client(base_url=base_url, timeout=timeout)

    health = endpoint(generated, "get", "/api/health").sync_detailed(client=public)
    assert health.status_code == 200 and health.parsed is not None, health
    node_key = health.parsed.node.public_key

    # Submit, with no model: the node's default model runs it.
    submit = endpoint(generated, "post", "/api/v1/jobs")
    request = body_type(submit).from_dict(
        {"prompt": "Say hello in one word.", "params": {"max_tokens": 8, "seed": 3}}
    )
    created = submit.sync_detailed(client=client, body=request)
    assert created.status_code == 201, created.content
    job = created.parsed
    assert job is not None and text_of(job.status) == "pending", created.content
    assert job.model == health.parsed.default_model

    # Wait for it, by long-polling through the generated call.
    get_job = endpoint(generated, "get", "/api/v1/jobs/{job_id}")
    deadline = time.monotonic() + GENERATION_WAIT
    while text_of(job.status) not in ("completed", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"job still {text_of(job.status)}"
        polled = get_job.sync_detailed(job.job_id, client=client, wait=30.0)
        assert polled.status_code == 200, polled.content
        job = polled.parsed
    assert text_of(job.status) == "completed", job
    assert job.result and job.receipt_id

    # Read the receipt (a public read), and check it is the node's, byte for byte.
    get_receipt = endpoint(generated, "get", "/api/v1/receipts/{receipt_id}")
    read = get_receipt.sync_detailed(job.receipt_id, client=public)
    assert read.status_code == 200, read.content
    receipt = read.parsed
    assert receipt.receipt_id == job.receipt_id and receipt.job_id == job.job_id
    assert receipt.completion_tokens == job.usage.completion_tokens
    as_read = receipt.to_dict()
    assert as_read == json.loads(read.content), "the generated model changed the receipt"
    verdict = verify_receipt(as_read, node_key)
    assert verdict.valid, verdict.reasons

    # Errors come back as the generated error model.
    missing = get_job.sync_detailed("job-0000000000000000", client=client)
    assert missing.status_code == 404
    assert missing.parsed.error_code == "JOB_NOT_FOUND" and missing.parsed.detail
