"""The OpenAI-compatible API, driven by the official `openai` package (sync and async) against a
real node on the embedded model: every completion is a job with a receipt, errors raise the
package's typed exceptions, and a client that goes away cancels its job."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from aitbc_node.jobs import plain_transcript
from aitbc_node.receipts import hash_request
from tests.conftest import GENERATION_WAIT, SMOL, NodeProcess, db_snapshot, run_cli
from tests.test_api_edge import quiesce

CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant. Answer in one short sentence."},
    {"role": "user", "content": "What colour is the sky on a clear day?"},
]


def client(node: NodeProcess, key: str | None = None, **options: Any) -> OpenAI:
    return OpenAI(
        base_url=f"http://127.0.0.1:{node.port}/v1",
        api_key=key or node.client_key,
        timeout=GENERATION_WAIT,
        **options,
    )


def async_client(node: NodeProcess) -> AsyncOpenAI:
    return AsyncOpenAI(
        base_url=f"http://127.0.0.1:{node.port}/v1",
        api_key=node.client_key,
        timeout=GENERATION_WAIT,
    )


def test_models_list_names_the_model_and_its_aliases(node: NodeProcess) -> None:
    models = {m.id: m for m in client(node).models.list()}
    assert {SMOL, "llama3.2"} <= set(models)
    assert models[SMOL].owned_by == "aitbc-node"  # the built-in miner serves it
    assert client(node).models.retrieve("llama3.2").id == "llama3.2"
    with pytest.raises(openai.NotFoundError):
        client(node).models.retrieve("no-such-model")
    # The same routes under /api/v1, with the key as a Bearer token.
    listed = node.request(
        "GET", "/v1/models", headers={"Authorization": f"Bearer {node.client_key}"}
    ).json()
    assert {m["id"] for m in listed["data"]} == set(models)


def test_a_chat_completion_is_a_job_with_a_receipt_that_verifies(
    node: NodeProcess, tmp_path: Path
) -> None:
    raw = client(node).chat.completions.with_raw_response.create(
        model="llama3.2", messages=CONVERSATION, max_tokens=24, temperature=0
    )
    completion = raw.parse()
    text = completion.choices[0].message.content
    assert text and text.strip()
    assert completion.model == "llama3.2" and completion.object == "chat.completion"
    assert completion.choices[0].finish_reason in ("stop", "length")
    usage = completion.usage
    assert usage is not None and usage.completion_tokens >= 1
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    job_id, receipt_id = raw.headers["x-aitbc-job-id"], raw.headers["x-aitbc-receipt-id"]
    assert completion.model_extra == {"aitbc": {"job_id": job_id, "receipt_id": receipt_id}}

    # The job behind it, in the client's own job list, asked as a conversation.
    listed = node.request("GET", "/v1/jobs", node.client_key, params={"limit": 100}).json()
    job = next(j for j in listed["jobs"] if j["job_id"] == job_id)
    assert job["status"] == "completed" and job["result"] == text
    assert job["messages"] == CONVERSATION
    assert job["prompt"] == plain_transcript(CONVERSATION)
    assert job["usage"]["prompt_tokens"] == usage.prompt_tokens
    assert job["receipt_id"] == receipt_id

    # The system turn reaches the model through its chat template: a longer one is more
    # prompt tokens.
    longer = [
        {"role": "system", "content": CONVERSATION[0]["content"] + " Never use jargon." * 8},
        CONVERSATION[1],
    ]
    more = client(node).chat.completions.create(model=SMOL, messages=longer, max_tokens=1)
    assert more.usage is not None and more.usage.prompt_tokens >= usage.prompt_tokens + 24

    # Its receipt hashes the messages that were sent, and `aitbc-node verify` accepts it.
    receipt = node.request("GET", f"/v1/receipts/{receipt_id}").json()
    assert receipt["request_sha256"] == hash_request(job["prompt"], job["params"], CONVERSATION)
    assert receipt["request_sha256"] != hash_request(job["prompt"], job["params"])
    (tmp_path / "receipt.json").write_text(json.dumps(receipt))
    pubkey = node.request("GET", "/health").json()["node"]["public_key"]
    verified = run_cli("verify", str(tmp_path / "receipt.json"), "--pubkey", pubkey)
    assert verified.stdout.startswith("VALID"), verified.stdout


def test_a_streamed_chat_adds_up_to_the_job_result_with_usage_at_the_end(
    node: NodeProcess,
) -> None:
    raw = client(node).chat.completions.with_raw_response.create(
        model=SMOL,
        messages=[{"role": "user", "content": "Count from one to ten in words."}],
        max_tokens=40,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    assert raw.headers["content-type"].startswith("text/event-stream")
    chunks = list(raw.parse())
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish in (["stop"], ["length"])
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None  # usage comes last, when asked

    job = node.job(raw.headers["x-aitbc-job-id"])
    assert job["status"] == "completed" and text == job["result"] and text.strip()
    assert last.usage.completion_tokens == job["usage"]["completion_tokens"]
    assert last.usage.prompt_tokens == job["usage"]["prompt_tokens"]

    # Without stream_options no chunk carries usage.
    plain = client(node).chat.completions.create(
        model=SMOL, messages=CONVERSATION, max_tokens=8, stream=True
    )
    assert all(c.usage is None for c in plain)


def test_text_completions_plain_and_streamed(node: NodeProcess) -> None:
    raw = client(node).completions.with_raw_response.create(
        model="llama3.2", prompt="Name three colours.", max_tokens=16, temperature=0
    )
    completion = raw.parse()
    assert completion.object == "text_completion"
    job = node.job(raw.headers["x-aitbc-job-id"])
    assert completion.choices[0].text == job["result"] and job["result"].strip()
    assert completion.usage is not None
    assert completion.usage.completion_tokens == job["usage"]["completion_tokens"]

    streamed = client(node).completions.with_raw_response.create(
        model=SMOL, prompt="Name three animals.", max_tokens=16, stream=True
    )
    text = "".join(c.choices[0].text for c in streamed.parse() if c.choices)
    assert text == node.job(streamed.headers["x-aitbc-job-id"])["result"]


def test_the_async_client(node: NodeProcess) -> None:
    async def main() -> None:
        async with async_client(node) as ai:
            models = [m.id async for m in ai.models.list()]
            assert SMOL in models
            completion = await ai.chat.completions.create(
                model=SMOL, messages=CONVERSATION, max_tokens=16
            )
            assert completion.choices[0].message.content
            job = node.job(completion.model_extra["aitbc"]["job_id"])
            assert job["result"] == completion.choices[0].message.content
            stream = await ai.chat.completions.create(
                model=SMOL,
                messages=CONVERSATION,
                max_tokens=16,
                stream=True,
                stream_options={"include_usage": True},
            )
            pieces, job_id = [], None
            async for chunk in stream:
                job_id = chunk.model_extra.get("aitbc", {}).get("job_id", job_id)
                if chunk.choices:
                    pieces.append(chunk.choices[0].delta.content or "")
            assert job_id is not None and "".join(pieces) == node.job(job_id)["result"]

    asyncio.run(main())


def test_errors_raise_the_packages_typed_exceptions_and_store_nothing(
    node: NodeProcess,
) -> None:
    ai = client(node, max_retries=0)
    user = [{"role": "user", "content": "Hi"}]
    quiesce(node)
    before = db_snapshot(node.data_dir)
    with pytest.raises(openai.AuthenticationError):
        client(node, key="ait_client_not-a-key").chat.completions.create(model=SMOL, messages=user)
    with pytest.raises(openai.NotFoundError) as unknown:
        ai.chat.completions.create(model="no-such-model", messages=user)
    assert unknown.value.body["code"] == "model_not_found"
    refused: list[tuple[dict[str, Any], str]] = [
        ({"n": 2}, "n"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"logprobs": True}, "logprobs"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"temperature": 3}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content[0]",
        ),
        ({"messages": [{"role": "user", "content": "a\x00b"}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "   "}]}, "messages"),
        ({"frequency_penalty": 0.5, "presence_penalty": 1}, "frequency_penalty"),
    ]
    for extra, param in refused:
        body = {"model": SMOL, "messages": user, **extra}
        with pytest.raises(openai.BadRequestError) as bad:
            ai.chat.completions.create(**body)
        error = bad.value.body
        assert error["type"] == "invalid_request_error", (extra, error)
        assert param in (error["param"] or "") or param in error["message"], (extra, error)
    with pytest.raises(openai.BadRequestError):
        ai.completions.create(model=SMOL, prompt="x", echo=True)

    # Raw requests: bad JSON, a wrong method and an unknown path answer OpenAI's shape too.
    base = f"http://127.0.0.1:{node.port}"
    auth = {"Authorization": f"Bearer {node.client_key}"}
    for method, path, content, status in [
        ("POST", "/v1/chat/completions", b"{not json", 400),
        ("POST", "/v1/chat/completions", b"[]", 400),
        ("POST", "/v1/chat/completions", b"", 400),
        ("GET", "/v1/chat/completions", None, 405),
        ("GET", "/v1/embeddings", None, 404),
        ("POST", "/api/v1/completions", b'{"prompt": 7}', 400),
    ]:
        r = httpx.request(method, base + path, content=content, headers=auth)
        assert r.status_code == status, (path, r.text)
        assert set(r.json()) == {"error"} and r.json()["error"]["message"], r.text
    assert db_snapshot(node.data_dir) == before


def test_a_burst_past_the_rate_limit_raises_RateLimitError_after_retries(
    start_node: Any,
) -> None:
    node = start_node("--no-miner", "--rate", "client=0.2/1")
    retries: list[int] = []

    def count(request: httpx.Request) -> None:
        retries.append(int(request.headers.get("x-stainless-retry-count", 0)))

    # A new connection per request: a retry after Retry-After's 5 s must not race the node's
    # 5 s keep-alive timeout on an idle pooled connection (a reset, not the 429 under test).
    fresh = httpx.Limits(max_keepalive_connections=0)
    ai = client(
        node,
        max_retries=2,
        http_client=httpx.Client(event_hooks={"request": [count]}, limits=fresh),
    )

    def call() -> str:
        try:
            ai.models.list()
            return "ok"
        except openai.RateLimitError as e:
            assert e.response.headers["retry-after"] and e.body["code"] == "rate_limited"
            return "limited"

    # A burst of 12: the bucket holds one request and refills one every 5 s (the Retry-After
    # the package waits before each of its two retries), so most run out of retries.
    with ThreadPoolExecutor(12) as pool:
        outcomes = list(pool.map(lambda _: call(), range(12)))
    assert "ok" in outcomes and "limited" in outcomes, outcomes
    assert max(retries) == 2  # the package's own retries came first
    assert len(retries) > len(outcomes)


def test_bearer_keys_work_on_the_coordinator_api(node: NodeProcess) -> None:
    def whoami(headers: dict[str, str]) -> httpx.Response:
        return node.request("GET", "/v1/whoami", headers=headers)

    assert whoami({"Authorization": f"Bearer {node.client_key}"}).json()["role"] == "client"
    assert whoami({"Authorization": f"bearer  {node.client_key}"}).status_code == 200
    for headers, code in [
        ({"Authorization": "Bearer"}, "MISSING_API_KEY"),
        ({"Authorization": f"Basic {node.client_key}"}, "MISSING_API_KEY"),
        ({"Authorization": "Bearer ait_client_wrong"}, "INVALID_API_KEY"),
    ]:
        r = whoami(headers)
        assert r.status_code == 401 and r.json()["error_code"] == code, r.text
    job = node.request(
        "POST",
        "/v1/jobs",
        headers={"Authorization": f"Bearer {node.client_key}"},
        json={"prompt": "Hi", "model": SMOL, "params": {"max_tokens": 2}},
    )
    assert job.status_code == 201, job.text
    node.wait_for(job.json()["job_id"], ("completed",))


def test_coordinator_jobs_take_messages_instead_of_a_prompt(node: NodeProcess) -> None:
    params = {"max_tokens": 12, "temperature": 0}
    r = node.request(
        "POST", "/v1/jobs", node.client_key, json={"messages": CONVERSATION, "params": params}
    )
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["messages"] == CONVERSATION
    assert created["prompt"] == plain_transcript(CONVERSATION)
    job = node.wait_for(created["job_id"], ("completed", "failed"))
    assert job["status"] == "completed" and job["result"].strip()
    receipt = node.request("GET", f"/v1/receipts/{job['receipt_id']}").json()
    assert receipt["request_sha256"] == hash_request(job["prompt"], job["params"], CONVERSATION)
    # A plain-prompt job still shows no messages.
    plain = node.submit("Hi", params={"max_tokens": 1})
    assert plain["messages"] is None
    node.wait_for(plain["job_id"], ("completed",))

    quiesce(node)
    before = db_snapshot(node.data_dir)
    for body, code in [
        ({"prompt": "Hi", "messages": CONVERSATION}, "INVALID_PROMPT"),
        ({"model": SMOL}, "INVALID_PROMPT"),
        ({"messages": []}, "INVALID_MESSAGES"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "INVALID_MESSAGES"),
        ({"messages": [{"role": "user", "content": "x", "name": "y"}]}, "UNKNOWN_FIELDS"),
        ({"messages": [{"role": "user", "content": "\x07"}]}, "INVALID_MESSAGES"),
        (
            {"messages": [{"role": "user", "content": " "}, {"role": "system", "content": ""}]},
            "INVALID_MESSAGES",
        ),
        ({"messages": [{"role": "user", "content": "x" * 40_000}] * 2}, "PROMPT_TOO_LONG"),
        ({"messages": [{"role": "user", "content": "x"}] * 257}, "INVALID_MESSAGES"),
    ]:
        r = node.request("POST", "/v1/jobs", node.client_key, json=body)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error_code"] == code, (str(body)[:80], r.text)
    assert db_snapshot(node.data_dir) == before


def _long_chat(node: NodeProcess, stream: bool) -> dict[str, Any]:
    return {
        "model": SMOL,
        "messages": [{"role": "user", "content": "Write a very long story."}],
        # Long by its token count: the end-of-text token cannot end it early.
        "max_tokens": 3000,
        "ignore_eos": True,
        "stream": stream,
    }


def test_a_client_that_goes_away_cancels_its_job(node: NodeProcess) -> None:
    base = f"http://127.0.0.1:{node.port}/v1/chat/completions"
    auth = {"Authorization": f"Bearer {node.client_key}"}
    # A stream closed after its first text.
    with (
        httpx.Client(timeout=GENERATION_WAIT) as http,
        http.stream("POST", base, json=_long_chat(node, True), headers=auth) as response,
    ):
        assert response.status_code == 200
        job_id = response.headers["x-aitbc-job-id"]
        for line in response.iter_lines():
            if '"content"' in line:
                break
    job = node.wait_for(job_id, ("cancelled", "completed", "failed"), timeout=GENERATION_WAIT)
    assert job["status"] == "cancelled", job

    # A whole answer the client stopped waiting for (it timed out and closed the connection).
    with (
        httpx.Client(timeout=httpx.Timeout(GENERATION_WAIT, read=2)) as http,
        pytest.raises(httpx.ReadTimeout),
    ):
        http.post(base, json=_long_chat(node, False), headers=auth)
    listed = node.request("GET", "/v1/jobs", node.client_key, params={"limit": 1}).json()
    job = listed["jobs"][0]
    assert job["messages"] == _long_chat(node, False)["messages"]
    job = node.wait_for(job["job_id"], ("cancelled", "completed", "failed"))
    assert job["status"] == "cancelled", job


def test_a_chat_answer_from_a_remote_miner_is_co_signed(
    node: NodeProcess, coordinator: NodeProcess, start_miner: Any
) -> None:
    start_miner(coordinator, "remote-box", "--threads", "1")
    completion = client(coordinator).chat.completions.create(
        model=SMOL, messages=CONVERSATION, max_tokens=8, temperature=0
    )
    assert completion.choices[0].message.content
    ids = completion.model_extra["aitbc"]
    job = coordinator.job(ids["job_id"])
    assert job["miner_id"] == "remote-box" and job["messages"] == CONVERSATION
    receipt = coordinator.request("GET", f"/v1/receipts/{ids['receipt_id']}").json()
    assert receipt["miner_signature"]["value"]
    assert receipt["request_sha256"] == hash_request(job["prompt"], job["params"], CONVERSATION)
    # The remote miner rendered the messages through the model's chat template, exactly as the
    # built-in miner does (not the plain transcript that older miners fall back to).
    local = client(node).chat.completions.create(model=SMOL, messages=CONVERSATION, max_tokens=1)
    assert completion.usage is not None and local.usage is not None
    assert completion.usage.prompt_tokens == local.usage.prompt_tokens


def test_the_readme_example_runs(node: NodeProcess, tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## OpenAI-compatible API", 1)[1]
    example = section.split("```python\n", 1)[1].split("```", 1)[0]
    script = tmp_path / "example.py"
    script.write_text(
        example.replace("http://127.0.0.1:8080/v1", f"http://127.0.0.1:{node.port}/v1").replace(
            "ait_client_...", node.client_key
        )
    )
    run = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=GENERATION_WAIT
    )
    assert run.returncode == 0, run.stderr
    assert "llama3.2" in run.stdout and "receipt_id" in run.stdout
