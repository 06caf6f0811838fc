"""The tutorial's JavaScript client, unchanged, against a real node: under Node.js, and in a
real browser (headless Chromium) on another origin, which needs the node's CORS headers.

`tests/js/tutorial_client.mjs` holds the tutorial's `CoordinatorClient` class byte for byte,
with only `export { CoordinatorClient };` (and a comment) after it; the first test checks it
against the spec when the spec is reachable, and against its recorded SHA-256 always.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

from tests.browser import CHROMIUM, CHROMIUM_ARGS
from tests.conftest import ROOT, SMOL, NodeProcess

JS = ROOT / "tests" / "js"
CLIENT_MODULE = JS / "tutorial_client.mjs"
DRIVER = JS / "run_tutorial_client.mjs"
SPEC = ROOT.parent / "shared" / "spec" / "coordinator-api-tutorial.md"
CLASS_SHA256 = "607a33ce6a4e4c304630a0121c3a88f2357790896bd83ced248476a6443eb8e6"
WAIT_MS = 300_000  # the shared box can be slow to generate

APP_ORIGIN = "http://app.example"


def class_text(source: str) -> str:
    """The `class CoordinatorClient { ... }` text: from its first line to the first line that
    is a lone closing brace."""
    start = source.index("class CoordinatorClient {")
    return source[start : source.index("\n}\n", start) + 3]


def spec_class() -> str:
    block = re.search(r"```javascript\n(.*?)```", SPEC.read_text(), re.S)
    assert block, "the tutorial has no ```javascript block"
    return class_text(block.group(1))


def node_js() -> str:
    path = shutil.which("node")
    if path is None:
        raise AssertionError(
            "Node.js is needed to run the tutorial's JavaScript client, and `node` is not on "
            "PATH: install Node.js 18 or newer (it needs the global fetch)"
        )
    return path


# -- the copy -----------------------------------------------------------------------------


def test_the_js_client_is_the_tutorials_class_unchanged() -> None:
    module = CLIENT_MODULE.read_text()
    copied = class_text(module)
    assert module.startswith(copied)  # nothing before the class
    after = module[len(copied) :]
    code_after = [line for line in after.splitlines() if line and not line.startswith("//")]
    assert code_after == ["export { CoordinatorClient };"]
    assert hashlib.sha256(copied.encode()).hexdigest() == CLASS_SHA256
    if SPEC.exists():
        assert copied == spec_class(), "tests/js/tutorial_client.mjs differs from the tutorial"


# -- under Node.js ------------------------------------------------------------------------


def test_the_tutorials_js_client_runs_a_job_under_node(node: NodeProcess) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AITBC_")},
        "AITBC_URL": node.url,
        "AITBC_API_KEY": node.client_key,
        "AITBC_WAIT_MS": str(WAIT_MS),
    }
    proc = subprocess.run(
        [node_js(), str(DRIVER)],
        capture_output=True,
        text=True,
        timeout=WAIT_MS / 1000 + 60,
        cwd=JS,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    submitted, job = out["submitted"], out["result"]
    assert submitted["status"] in ("pending", "running")
    assert submitted["model"] == "llama3.2"  # the tutorial's default model, through --alias
    assert job["job_id"] == submitted["job_id"]
    assert job["status"] == "completed"
    assert job["prompt"] == "Hello!"
    assert job["served_model"] == SMOL
    assert job["result"].strip()
    assert node.job(job["job_id"]) == job


# -- CORS ---------------------------------------------------------------------------------


def preflight(node: NodeProcess, origin: str) -> httpx.Response:
    return node.http.options(
        f"{node.url}/v1/jobs",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "x-api-key,content-type",
        },
    )


def header_list(response: httpx.Response, name: str) -> set[str]:
    return {h.strip().lower() for h in response.headers.get(name, "").split(",") if h.strip()}


def test_cors_lets_the_configured_origin_call_the_api(start_node) -> None:
    node = start_node("--no-miner", "--cors-origin", APP_ORIGIN)

    allowed = preflight(node, APP_ORIGIN)
    assert allowed.status_code in (200, 204), allowed.text
    assert allowed.headers["access-control-allow-origin"] == APP_ORIGIN
    assert {"x-api-key", "content-type"} <= header_list(allowed, "access-control-allow-headers")
    assert "post" in header_list(allowed, "access-control-allow-methods")

    read = node.request("GET", "/health", headers={"Origin": APP_ORIGIN})
    assert read.status_code == 200
    assert read.headers["access-control-allow-origin"] == APP_ORIGIN
    jobs = node.request("GET", "/v1/jobs", node.client_key, headers={"Origin": APP_ORIGIN})
    assert jobs.status_code == 200
    assert jobs.headers["access-control-allow-origin"] == APP_ORIGIN
    assert "retry-after" in header_list(jobs, "access-control-expose-headers")

    other = "http://evil.example"
    assert "access-control-allow-origin" not in preflight(node, other).headers
    read = node.request("GET", "/health", headers={"Origin": other})
    assert read.status_code == 200
    assert "access-control-allow-origin" not in read.headers


def test_without_cors_origin_the_node_sends_no_cors_headers(node: NodeProcess) -> None:
    assert "access-control-allow-origin" not in preflight(node, APP_ORIGIN).headers
    read = node.request("GET", "/health", headers={"Origin": APP_ORIGIN})
    assert read.status_code == 200
    assert "access-control-allow-origin" not in read.headers


PAGE = """<!doctype html>
<meta charset="utf-8">
<title>tutorial client</title>
<script type="module">
import { CoordinatorClient } from './tutorial_client.mjs';
const query = new URLSearchParams(location.search);
try {
  const client = new CoordinatorClient(query.get('api'), query.get('key'));
  const job = await client.submitJob('Hello!', 'llama3.2', { max_tokens: 16 });
  const done = await client.waitForJob(job.job_id, Number(query.get('wait')));
  window.outcome = { ok: true, job: done };
} catch (e) {
  window.outcome = { ok: false, error: String(e) };
}
</script>
"""


@contextmanager
def page_server(host: str) -> Iterator[str]:
    """Serve the page and the tutorial's client module at http://HOST:PORT (its origin)."""
    files = {
        "/": ("text/html; charset=utf-8", PAGE.encode()),
        "/tutorial_client.mjs": ("text/javascript", CLIENT_MODULE.read_bytes()),
    }

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            content_type, body = files.get(self.path.split("?")[0], ("text/plain", b""))
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer((host, 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_browser_page_on_an_allowed_origin_runs_a_job(start_node) -> None:
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), f"Chromium not found at {CHROMIUM}: apt-get install chromium"
    with page_server("127.0.0.2") as allowed, page_server("127.0.0.3") as refused:
        node = start_node("--cors-origin", allowed, "--alias", "llama3.2=" + SMOL)
        query = f"?api={node.url}&key={node.client_key}&wait={WAIT_MS}"
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.goto(allowed + "/" + query, timeout=WAIT_MS)
                page.wait_for_function("() => window.outcome !== undefined", timeout=WAIT_MS)
                outcome = page.evaluate("() => window.outcome")
                assert outcome["ok"], outcome
                job = outcome["job"]
                assert job["status"] == "completed" and job["result"].strip()
                assert job["model"] == "llama3.2"

                # The same page on an origin the node does not allow: the browser refuses it.
                page = browser.new_page()
                page.goto(refused + "/" + query, timeout=WAIT_MS)
                page.wait_for_function("() => window.outcome !== undefined", timeout=WAIT_MS)
                outcome = page.evaluate("() => window.outcome")
                assert not outcome["ok"]
                assert "Failed to fetch" in outcome["error"]
            finally:
                browser.close()
        # The refused page's request never became a job.
        jobs = node.request("GET", "/v1/jobs", node.client_key).json()["jobs"]
        assert [j["job_id"] for j in jobs] == [job["job_id"]]
