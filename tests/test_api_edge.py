"""The API's edge against a real node: hostile input is refused with a clear 400 and leaves the
store unchanged, the OpenAPI document tells the truth, `model` may be omitted, and a submit
retried with an `Idempotency-Key` makes one job.

Each test reproduces one finding of a hostile-client run; bodies that `httpx`'s `json=` cannot
produce (a lone UTF-16 surrogate escape, a `NaN` token, a 30-digit integer) are sent as raw
JSON text.
"""

from __future__ import annotations

import base64
import http.server
import json
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import pytest
from httpx import HTTPStatusError

from aitbc_node.api import create_app
from aitbc_node.node import Node, NodeSettings
from tests.conftest import GENERATION_WAIT, SMOL, NodeProcess, db_snapshot

JSON = {"Content-Type": "application/json"}
# The 30-digit integer of the findings: past SQLite's 64-bit integers and any JSON reader's.
HUGE = "1" * 30


def raw_json(value: Any, **tokens: str) -> str:
    """`value` as JSON text, with each string `"$NAME"` in it replaced by the raw JSON text
    `tokens[NAME]` (an escape, number or token that `json.dumps` would not write)."""
    text = json.dumps(value)
    for name, token in tokens.items():
        text = text.replace(f'"${name}"', token)
    return text


def post_raw(node: NodeProcess, path: str, key: str | None, text: str) -> httpx.Response:
    """POST `text` as the JSON body, byte for byte as written."""
    return node.request("POST", path, key, content=text.encode(), headers=dict(JSON))


def assert_refused(response: httpx.Response, codes: set[str], status: int = 400) -> dict:
    """The response is `status` in the API's error shape with one of `codes`."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"detail", "error_code"}, body
    assert body["error_code"] in codes, body
    assert body["detail"] and "Traceback" not in body["detail"]
    return body


def assert_miner_live(node: NodeProcess) -> None:
    """`/api/health` reports the built-in miner as running, and a normal job completes."""
    health = node.request("GET", "/health")
    assert health.status_code == 200, health.text
    assert health.json()["miner"]["state"] in ("idle", "busy"), health.json()
    listing = node.request("GET", "/v1/jobs", node.client_key)
    assert listing.status_code == 200, listing.text
    job = node.submit("Say hello.", params={"max_tokens": 8})
    done = node.wait_for(job["job_id"], ("completed", "failed", "cancelled"))
    assert done["status"] == "completed", done
    health = node.request("GET", "/health").json()
    assert health["miner"]["state"] in ("idle", "busy"), health


def quiesce(node: NodeProcess, timeout: float = GENERATION_WAIT) -> None:
    """Wait until the block sealer has sealed every transaction and receipt, so that nothing
    but the requests a test makes writes to the store while it compares snapshots."""
    deadline = time.monotonic() + timeout
    while True:
        newest = [
            *node.request("GET", "/explorer/transactions", params={"limit": 1}).json()[
                "transactions"
            ],
            *node.request("GET", "/explorer/receipts", params={"limit": 1}).json()["receipts"],
        ]
        if all(item["block_height"] is not None for item in newest):
            return
        assert time.monotonic() < deadline, f"still unsealed after {timeout} s: {newest}"
        time.sleep(0.2)


def quiet_coordinator(start_node) -> NodeProcess:
    """A node with no built-in miner and leases that outlast a test, so that no background
    loop writes while the test compares snapshots of its store."""
    return start_node("--no-miner", "--lease-seconds", "600")


def cursor_for(number: str) -> str:
    """A cursor in the node's format (`s` and a sequence number, base64url, no padding)."""
    return base64.urlsafe_b64encode(f"s{number}".encode()).decode().rstrip("=")


# -- 1. the poison job ---------------------------------------------------------------------

# A lone surrogate (valid JSON text, not valid Unicode) and a NUL, in each text field of a
# submit; the JSON escapes are written out so they reach the node as sent.
POISON_SUBMITS = [
    (
        raw_json({"prompt": "hi", "model": SMOL, "params": {"stop": ["$s"]}}, s=r'"\ud800"'),
        "INVALID_PARAMS",
    ),
    (raw_json({"prompt": "$p", "model": SMOL}, p=r'"hi \ud800"'), "INVALID_PROMPT"),
    (raw_json({"prompt": "hi", "model": "$m"}, m=rf'"\udfff{SMOL}"'), "INVALID_MODEL"),
    (
        raw_json({"prompt": "hi", "model": SMOL, "params": {"stop": "$s"}}, s=r'"\udc00"'),
        "INVALID_PARAMS",
    ),
    (
        raw_json({"prompt": "hi", "model": SMOL, "params": {"stop": ["$s"]}}, s=r'"a\u0000"'),
        "INVALID_PARAMS",
    ),
    (raw_json({"prompt": "$p", "model": SMOL}, p=r'"hi \u0000 there"'), "INVALID_PROMPT"),
    (raw_json({"prompt": "hi", "model": "$m"}, m=rf'"{SMOL}\u0000"'), "INVALID_MODEL"),
]


def test_poison_text_is_refused_and_the_miner_lives_on(start_node) -> None:
    node = start_node()
    quiesce(node)
    before = db_snapshot(node.data_dir)
    for text, field_code in POISON_SUBMITS:
        response = post_raw(node, "/v1/jobs", node.client_key, text)
        assert_refused(response, {"INVALID_TEXT", field_code})
    assert db_snapshot(node.data_dir) == before
    assert_miner_live(node)
    # A restart finds no poisoned job to claim again.
    node.terminate()
    node.start()
    assert_miner_live(node)
    for text, field_code in POISON_SUBMITS[:3]:
        assert_refused(
            post_raw(node, "/v1/jobs", node.client_key, text), {"INVALID_TEXT", field_code}
        )
    assert_miner_live(node)


def test_a_body_with_a_byte_order_mark_or_bad_utf8_is_refused(node: NodeProcess) -> None:
    # The README's decision: a UTF-8 BOM before a body is refused (INVALID_JSON), not skipped.
    key = node.new_key("client", "bom")
    valid = json.dumps({"prompt": "hi", "model": SMOL, "params": {"max_tokens": 4}}).encode()
    for raw, codes in (
        (b"\xef\xbb\xbf" + valid, {"INVALID_JSON"}),
        (valid.replace(b"hi", b"h\xff"), {"INVALID_JSON", "INVALID_TEXT"}),
        (valid.replace(b"hi", b"h\xed\xa0\x80"), {"INVALID_JSON", "INVALID_TEXT"}),  # CESU
    ):
        response = node.request("POST", "/v1/jobs", key, content=raw, headers=dict(JSON))
        assert_refused(response, codes)
    assert node.request("GET", "/v1/jobs", key).json()["jobs"] == []


# -- 2. out-of-range integers --------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/v1/jobs", "/v1/receipts", "/explorer/blocks", "/explorer/transactions"]
)
def test_a_cursor_past_any_integer_is_400(node: NodeProcess, path: str) -> None:
    key = node.client_key if path == "/v1/jobs" else None
    for cursor in (cursor_for(HUGE), cursor_for("-" + HUGE), cursor_for(str(2**63))):
        response = node.request("GET", path, key, params={"cursor": cursor})
        assert_refused(response, {"INVALID_CURSOR"})
    assert node.request("GET", path, key).status_code == 200


def test_a_block_height_past_any_integer_is_not_a_500(node: NodeProcess) -> None:
    for height in ("999999999999999999999", str(2**63), HUGE):
        response = node.request("GET", f"/explorer/blocks/{height}")
        assert response.status_code in (400, 404), response.text
        assert set(response.json()) == {"detail", "error_code"}
    assert node.request("GET", "/explorer/blocks/0").status_code == 200


def test_huge_usage_on_complete_is_400_and_writes_nothing(start_node) -> None:
    node = quiet_coordinator(start_node)
    miner_key = node.register_miner("gpu-huge")
    job = node.submit("never generated", params={"max_tokens": 8})
    claim = node.request(
        "POST", f"/v1/jobs/{job['job_id']}/claim", miner_key, json={"miner_id": "gpu-huge"}
    )
    assert claim.status_code == 200, claim.text
    quiesce(node)
    before = db_snapshot(node.data_dir)
    for usage in (
        {"prompt_tokens": 10**30, "completion_tokens": 3},
        {"prompt_tokens": 3, "completion_tokens": 10**30},
        {"prompt_tokens": -(10**30), "completion_tokens": 3},
        {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 10**30},
    ):
        # json.dumps writes Python's big integers out in full, as a hostile miner would.
        body = json.dumps({"miner_id": "gpu-huge", "result": "Hello.", "usage": usage})
        response = post_raw(node, f"/v1/jobs/{job['job_id']}/complete", miner_key, body)
        assert_refused(response, {"INVALID_USAGE"})
    # Nothing was written, the miner's last_seen_ms included.
    assert db_snapshot(node.data_dir) == before
    ok = node.request(
        "POST",
        f"/v1/jobs/{job['job_id']}/complete",
        miner_key,
        json={
            "miner_id": "gpu-huge",
            "result": "Hello.",
            "usage": {"prompt_tokens": 3, "completion_tokens": 2},
        },
    )
    assert ok.status_code == 200, ok.text
    assert node.job(job["job_id"])["usage"]["total_tokens"] == 5


@pytest.mark.parametrize(
    "gpu_info",
    [
        {"memory": int(HUGE)},
        {"memory": -int(HUGE)},
        {"memory": float("nan")},
        {"memory": float("inf")},
        {"devices": [{"memory": int(HUGE)}]},
    ],
)
def test_out_of_range_numbers_in_gpu_info_are_400(start_node, gpu_info: dict) -> None:
    node = quiet_coordinator(start_node)
    key = node.new_key("miner", "gpu-odd")
    quiesce(node)
    before = db_snapshot(node.data_dir)
    # json.dumps writes NaN and Infinity as the bare tokens (not JSON, but Python reads them).
    body = json.dumps({"miner_id": "gpu-odd", "capabilities": [SMOL], "gpu_info": gpu_info})
    response = post_raw(node, "/v1/miners/register", key, body)
    assert_refused(response, {"INVALID_GPU_INFO", "INVALID_JSON"})
    assert db_snapshot(node.data_dir) == before
    assert node.request("GET", "/v1/miners").status_code == 200


# -- 3. deep nesting -----------------------------------------------------------------------


def nested(levels: int) -> str:
    """`levels` arrays, one inside the next."""
    return "[" * levels + "]" * levels


def test_deep_nesting_is_400_and_the_node_answers_on(start_node) -> None:
    node = quiet_coordinator(start_node)
    node.register_miner("gpu-nest")  # so that a well-formed job would be accepted
    key = node.client_key
    quiesce(node)
    before = db_snapshot(node.data_dir)
    bodies = [
        "[" * 100_000,
        nested(100_000),
        "{" + '"a":{' * 50_000,
        raw_json({"prompt": "$p", "model": SMOL}, p=nested(3000)),
        raw_json({"prompt": "hi", "model": SMOL, "params": "$p"}, p=nested(3000)),
    ]
    for body in bodies:
        response = post_raw(node, "/v1/jobs", key, body)
        assert_refused(
            response, {"INVALID_JSON", "INVALID_BODY", "INVALID_PROMPT", "INVALID_PARAMS"}
        )
        assert node.request("GET", "/health").status_code == 200
    assert db_snapshot(node.data_dir) == before
    assert node.request("GET", "/v1/jobs", key).json()["jobs"] == []


def test_deep_nesting_in_gpu_info_is_400(start_node) -> None:
    node = quiet_coordinator(start_node)
    key = node.new_key("miner", "gpu-deep")
    quiesce(node)
    before = db_snapshot(node.data_dir)
    for inner in (nested(5000), '{"a":' * 5000 + "1" + "}" * 5000):
        info = {"miner_id": "gpu-deep", "capabilities": [SMOL], "gpu_info": {"x": "$x"}}
        body = raw_json(info, x=inner)
        response = post_raw(node, "/v1/miners/register", key, body)
        assert_refused(response, {"INVALID_JSON", "INVALID_GPU_INFO"})
        assert node.request("GET", "/health").status_code == 200
    assert db_snapshot(node.data_dir) == before


# -- 4. the OpenAPI document ---------------------------------------------------------------

# The operations that act for a key (all others are public reads or the receipt check).
KEYED = {
    ("post", "/api/v1/jobs"),
    ("get", "/api/v1/jobs"),
    ("get", "/api/v1/whoami"),
    ("get", "/api/v1/jobs/available"),
    ("get", "/api/v1/jobs/{job_id}"),
    ("post", "/api/v1/jobs/{job_id}/cancel"),
    ("get", "/api/v1/jobs/{job_id}/stream"),
    ("post", "/api/v1/jobs/{job_id}/progress"),
    ("post", "/api/v1/miners/register"),
    ("post", "/api/v1/miners/{miner_id}/heartbeat"),
    ("post", "/api/v1/jobs/{job_id}/claim"),
    ("post", "/api/v1/jobs/claim-next"),
    ("post", "/api/v1/jobs/{job_id}/release"),
    ("post", "/api/v1/jobs/{job_id}/complete"),
    ("post", "/api/v1/jobs/complete"),
    ("post", "/api/v1/jobs/{job_id}/fail"),
    ("post", "/api/v1/webhooks"),
    ("get", "/api/v1/webhooks"),
    ("delete", "/api/v1/webhooks/{webhook_id}"),
    ("get", "/api/v1/webhooks/{webhook_id}/deliveries"),
}
PUBLIC = {
    ("get", "/api/health"),
    ("get", "/api/v1/stats"),
    ("get", "/api/v1/miners"),
    ("get", "/api/v1/node"),
    ("get", "/api/v1/receipts"),
    ("get", "/api/v1/receipts/{receipt_id}"),
    ("get", "/api/v1/receipts/{receipt_id}/proof"),
    ("post", "/api/v1/receipts/verify"),
    ("get", "/api/explorer/blocks"),
    ("get", "/api/explorer/blocks/{height}"),
    ("get", "/api/explorer/transactions"),
    ("get", "/api/explorer/receipts"),
    ("get", "/api/explorer/stats"),
    ("get", "/api/explorer/timeseries"),
    ("get", "/api/explorer/addresses/{address}"),
}
# POSTs that take no body: the job id or miner id in the path says it all.
NO_BODY = {
    ("post", "/api/v1/jobs/{job_id}/cancel"),
    ("post", "/api/v1/miners/{miner_id}/heartbeat"),
}
# Keyed operations any role may call (so none answers 403).
ANY_ROLE = {("get", "/api/v1/whoami")}
# Where a 409 can come from: a job's state, a reused idempotency key, too many webhooks, a
# receipt not yet sealed.
CONFLICTS = {
    ("post", "/api/v1/jobs"),
    ("post", "/api/v1/jobs/{job_id}/cancel"),
    ("post", "/api/v1/jobs/{job_id}/claim"),
    ("post", "/api/v1/jobs/{job_id}/release"),
    ("post", "/api/v1/jobs/{job_id}/complete"),
    ("post", "/api/v1/jobs/{job_id}/fail"),
    ("post", "/api/v1/jobs/{job_id}/progress"),
    ("post", "/api/v1/webhooks"),
    ("get", "/api/v1/receipts/{receipt_id}/proof"),
}
# Path parameters that name a thing that may not exist.
NAMED_THINGS = ("{job_id}", "{receipt_id}", "{webhook_id}", "{height}")


def expected_errors(method: str, path: str, operation: dict) -> set[int]:
    """The error statuses this operation can answer, so its responses must document them."""
    op = (method, path)
    statuses = {429}  # every operation, public reads too, is rate-limited
    if op in KEYED:
        statuses |= {401} | (set() if op in ANY_ROLE else {403})
    if method in ("post", "put", "patch") and op not in NO_BODY:
        statuses |= {400, 413}
    if any(p.get("in") == "query" for p in operation.get("parameters", [])):
        statuses.add(400)
    if any(thing in path for thing in NAMED_THINGS):
        statuses.add(404)
    if op in CONFLICTS:
        statuses.add(409)
    if op == ("post", "/api/v1/jobs"):
        statuses.add(402)
    return statuses


def resolve(doc: dict, node: dict) -> dict:
    """Follow `$ref`s within the document."""
    while "$ref" in node:
        target: Any = doc
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


@pytest.fixture(scope="module")
def openapi(node: NodeProcess) -> dict:
    response = node.request("GET", "/schema/openapi.json")
    assert response.status_code == 200, response.text
    return response.json()


def operations(doc: dict) -> Iterator[tuple[str, str, dict]]:
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            if method in ("get", "post", "put", "patch", "delete"):
                yield method, path, operation


def test_openapi_documents_every_request_body(openapi: dict) -> None:
    missing = []
    for method, path, operation in operations(openapi):
        if method != "post" or (method, path) in NO_BODY:
            continue
        body = resolve(openapi, operation.get("requestBody", {}))
        schema = body.get("content", {}).get("application/json", {}).get("schema")
        if not body.get("required") or not schema:
            missing.append(f"{method.upper()} {path}")
            continue
        schema = resolve(openapi, schema)
        assert schema.get("type") == "object" and schema.get("properties"), (path, schema)
    assert not missing, f"POST operations with no JSON request body documented: {missing}"


def object_schemas(doc: dict, schema: dict, where: str) -> Iterator[tuple[str, dict]]:
    """Every object schema with named properties inside `schema`, with where it is."""
    schema = resolve(doc, schema)
    for i, branch in enumerate(schema.get("oneOf", []) + schema.get("anyOf", [])):
        yield from object_schemas(doc, branch, f"{where}|{i}")
    if schema.get("properties"):
        yield where, schema
        for name, sub in schema["properties"].items():
            yield from object_schemas(doc, sub, f"{where}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from object_schemas(doc, schema["items"], f"{where}[]")


def test_openapi_request_bodies_refuse_unknown_fields_as_the_node_does(openapi: dict) -> None:
    # The node answers 400 UNKNOWN_FIELDS (UNKNOWN_PARAMS) to a field it does not know, so
    # the document must not call such a body valid: every named-field object is closed.
    open_objects = []
    for method, path, operation in operations(openapi):
        content = resolve(openapi, operation.get("requestBody", {})).get("content", {})
        schema = content.get("application/json", {}).get("schema")
        if not schema:
            if method == "post" and (method, path) not in NO_BODY:
                open_objects.append(f"{method.upper()} {path} (no body schema at all)")
            continue
        for where, obj in object_schemas(openapi, schema, f"{method.upper()} {path}"):
            if obj.get("additionalProperties") is not False:
                open_objects.append(where)
    assert not open_objects, "request objects that allow unknown fields:\n" + "\n".join(
        open_objects
    )


# Bodies the node refuses at the edge for one field's value, as (operation, body). The document
# must call each of them invalid too, or a client (or a generator) that trusts it sends them.
REFUSED_BODIES = [
    ("post /api/v1/jobs", {"prompt": "hi", "model": ""}),
    ("post /api/v1/jobs", {"prompt": "hi", "model": "x" * 200}),
    ("post /api/v1/jobs", {"prompt": "hi", "model": "a\u0001b"}),
    ("post /api/v1/jobs", {"prompt": "hi", "params": {"seed": -1}}),
    ("post /api/v1/jobs", {"prompt": "hi", "params": {"max_tokens": 0}}),
    ("post /api/v1/jobs", {"prompt": "hi", "params": {"stop": ""}}),
    ("post /api/v1/jobs", {"prompt": "hi", "params": {"stop": "x" * 65}}),
    ("post /api/v1/jobs", {"prompt": "hi", "params": {"stop": ["a", "b", "c", "d", "e"]}}),
    ("post /api/v1/jobs", {"prompt": "hi", "params": {"stop": [""]}}),
    ("post /api/v1/jobs", {"prompt": "hi", "params": {"stop": ["a\u0000"]}}),
    ("post /api/v1/miners/register", {"miner_id": "m", "capabilities": [""]}),
    ("post /api/v1/miners/register", {"miner_id": "m", "capabilities": ["a\u0001"]}),
    ("post /api/v1/miners/register", {"miner_id": "m", "capabilities": ["x" * 200]}),
    ("post /api/v1/miners/register", {"miner_id": "m", "capabilities": ["a"], "public_key": "zz"}),
    ("post /api/v1/miners/register", {"miner_id": "m", "capabilities": ["a"], "gpu_info": {"": 1}}),
    (
        "post /api/v1/miners/register",
        {"miner_id": "m", "capabilities": ["a"], "gpu_info": {"memory": 10**30}},
    ),
    (
        "post /api/v1/jobs/{job_id}/complete",
        {"miner_id": "m", "result": "r", "usage": {"total_tokens": -1}},
    ),
]


def test_openapi_request_schemas_refuse_what_the_node_refuses(openapi: dict, start_node) -> None:
    node = quiet_coordinator(start_node)
    miner = node.new_key("miner", "m")
    allowed = []
    for operation, body in REFUSED_BODIES:
        method, path = operation.split(" ", 1)
        # The node refuses it (400), before any state matters.
        key = node.client_key if path == "/api/v1/jobs" else miner
        url = path.removeprefix("/api").replace("{job_id}", "job-0000000000000000")
        assert node.request(method, url, key, json=body).status_code == 400, (operation, body)
        request_body = openapi["paths"][path][method].get("requestBody", {})
        content = resolve(openapi, request_body).get("content", {})
        documented = content.get("application/json", {}).get("schema", {})
        schema = {**documented, "components": openapi.get("components", {})}
        if jsonschema_rs.Draft202012Validator(schema).is_valid(body):
            allowed.append(f"{operation}: {json.dumps(body)[:120]}")
    assert not allowed, "the document allows bodies the node refuses:\n" + "\n".join(allowed)


def test_openapi_has_the_api_key_scheme_on_keyed_operations(openapi: dict) -> None:
    listed = {(method, path) for method, path, _ in operations(openapi)}
    assert listed == KEYED | PUBLIC  # every operation is in one of the two tables
    schemes = openapi.get("components", {}).get("securitySchemes", {})
    names = [
        name
        for name, scheme in schemes.items()
        if scheme.get("type") == "apiKey"
        and scheme.get("in") == "header"
        and scheme.get("name", "").lower() == "x-api-key"
    ]
    assert names, f"no apiKey scheme for the X-Api-Key header: {schemes}"
    default = openapi.get("security", [])
    for method, path, operation in operations(openapi):
        security = operation.get("security", default)
        named = {name for requirement in security for name in requirement}
        if (method, path) in KEYED:
            assert named & set(names), f"{method.upper()} {path} does not say it needs a key"
        else:
            assert not named, f"{method.upper()} {path} is public but asks for {named}"


def test_openapi_documents_every_error_in_the_real_shape(openapi: dict) -> None:
    undocumented = []
    for method, path, operation in operations(openapi):
        responses = operation.get("responses", {})
        listed = {int(code) for code in responses if code.isdigit()}
        gaps = expected_errors(method, path, operation) - listed
        if gaps:
            undocumented.append(f"{method.upper()} {path}: {sorted(gaps)}")
        for code, response in responses.items():
            if not code.isdigit() or int(code) < 400:
                continue
            response = resolve(openapi, response)
            schema = response.get("content", {}).get("application/json", {}).get("schema")
            assert schema, f"{method.upper()} {path} {code} has no JSON schema"
            schema = resolve(openapi, schema)
            required = set(schema.get("required", []))
            assert {"detail", "error_code"} <= required, (path, code, schema)
            assert "status_code" not in required, (path, code, schema)
            assert {"detail", "error_code"} <= set(schema.get("properties", {})), (path, code)
    assert not undocumented, "error statuses not documented:\n" + "\n".join(undocumented)


def test_openapi_documents_the_stream_as_server_sent_events(openapi: dict) -> None:
    ok = openapi["paths"]["/api/v1/jobs/{job_id}/stream"]["get"]["responses"]["200"]
    content = resolve(openapi, ok).get("content", {})
    assert "text/event-stream" in content, content
    assert "application/json" not in content, content


def test_openapi_documents_idempotency_and_an_optional_model(openapi: dict) -> None:
    submit = openapi["paths"]["/api/v1/jobs"]["post"]
    headers = [
        resolve(openapi, p)
        for p in submit.get("parameters", [])
        if resolve(openapi, p)["in"] == "header"
    ]
    assert any(h["name"].lower() == "idempotency-key" for h in headers), headers
    assert {"200", "201"} <= set(submit["responses"]), submit["responses"].keys()
    body = resolve(openapi, submit["requestBody"]["content"]["application/json"]["schema"])
    assert "model" in body["properties"] and "model" not in body.get("required", [])
    # A prompt, or messages instead: exactly one of them, as the description says (a oneOf
    # of the two would leave generated clients with an untyped body).
    assert not body.get("required") and {"prompt", "messages"} <= set(body["properties"])
    assert "one of the two" in body["description"]


# -- 5. model omitted ----------------------------------------------------------------------


def test_submit_without_a_model_runs_on_the_default_model(node: NodeProcess) -> None:
    default = node.request("GET", "/health").json()["default_model"]
    assert default == SMOL
    response = node.request(
        "POST",
        "/v1/jobs",
        node.client_key,
        json={"prompt": "Say hello.", "params": {"max_tokens": 8}},
    )
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["model"] == default and created["served_model"] == default, created
    done = node.wait_for(created["job_id"], ("completed", "failed", "cancelled"))
    assert done["status"] == "completed", done
    assert done["served_model"] == default


# -- 6. idempotent submits -----------------------------------------------------------------


def submit_with_key(
    node: NodeProcess, key: str, idempotency_key: str, body: dict
) -> httpx.Response:
    return node.request(
        "POST", "/v1/jobs", key, json=body, headers={"Idempotency-Key": idempotency_key}
    )


def test_the_same_idempotency_key_and_body_make_one_job(node: NodeProcess) -> None:
    alice = node.new_key("client", "idem-alice")
    bob = node.new_key("client", "idem-bob")
    body = {"prompt": "Name a colour.", "model": SMOL, "params": {"max_tokens": 4, "seed": 1}}
    first = submit_with_key(node, alice, "order-1", body)
    assert first.status_code == 201, first.text
    again = submit_with_key(node, alice, "order-1", body)
    assert again.status_code == 200, again.text
    assert again.json()["job_id"] == first.json()["job_id"]
    # The same body with its keys in another order is the same request.
    reordered = {"params": {"seed": 1, "max_tokens": 4}, "model": SMOL, "prompt": "Name a colour."}
    third = submit_with_key(node, alice, "order-1", reordered)
    assert third.status_code == 200 and third.json()["job_id"] == first.json()["job_id"]
    jobs = node.request("GET", "/v1/jobs", alice).json()["jobs"]
    assert [j["job_id"] for j in jobs] == [first.json()["job_id"]]

    # Another body under the same key is refused, and makes no job.
    changed = submit_with_key(node, alice, "order-1", {**body, "prompt": "Name a fruit."})
    assert_refused(changed, {"IDEMPOTENCY_KEY_REUSED"}, status=409)
    after = node.request("GET", "/v1/jobs", alice).json()["jobs"]
    assert [j["job_id"] for j in after] == [first.json()["job_id"]]
    done = node.wait_for(first.json()["job_id"], ("completed", "failed", "cancelled"), key=alice)
    assert done["status"] == "completed", done

    # Keys are per client: Bob's "order-1" is his own job.
    theirs = submit_with_key(node, bob, "order-1", body)
    assert theirs.status_code == 201, theirs.text
    assert theirs.json()["job_id"] != first.json()["job_id"]
    assert len(node.request("GET", "/v1/jobs", bob).json()["jobs"]) == 1
    assert len(node.request("GET", "/v1/jobs", alice).json()["jobs"]) == 1


def test_a_bad_idempotency_key_is_400(node: NodeProcess) -> None:
    key = node.new_key("client", "idem-bad")
    body = {"prompt": "Hi", "model": SMOL, "params": {"max_tokens": 4}}
    for bad in ("", "x" * 300, "with space"):
        response = submit_with_key(node, key, bad, body)
        assert response.status_code == 400, (bad, response.text)
        assert set(response.json()) == {"detail", "error_code"}
    assert node.request("GET", "/v1/jobs", key).json()["jobs"] == []


# The tutorial's retry loop (docs: "Retry Logic"), as published.
def with_retry(func, max_retries=3, backoff=2):
    for attempt in range(max_retries):
        try:
            return func()
        except HTTPStatusError as e:
            if e.response.status_code == 429:
                retry_after = int(e.response.headers.get("Retry-After", backoff))
                time.sleep(retry_after)
            elif e.response.status_code >= 500:
                time.sleep(backoff * (attempt + 1))
            else:
                raise
    raise Exception("Max retries exceeded")


class LossyProxy:
    """An HTTP proxy in front of a node that forwards every request, but answers the first
    one with 502 instead of the node's answer: the request was served, its response was lost
    on the way back (a load balancer timing out, a dropped connection)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.forwarded: list[int] = []  # the node's status for each forwarded request
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self._relay("POST")

            def do_GET(self) -> None:
                self._relay("GET")

            def _relay(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in ("host", "content-length", "connection")
                }
                with httpx.Client(timeout=120) as client:
                    answer = client.request(
                        method, proxy.upstream + self.path, content=body, headers=headers
                    )
                proxy.forwarded.append(answer.status_code)
                if len(proxy.forwarded) == 1:
                    payload = b'{"detail": "upstream answer lost", "error_code": "BAD_GATEWAY"}'
                    self._answer(502, payload, "application/json")
                else:
                    self._answer(
                        answer.status_code,
                        answer.content,
                        answer.headers.get("content-type", "application/json"),
                    )

            def _answer(self, status: int, payload: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> LossyProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_the_tutorial_retry_loop_with_an_idempotency_key_makes_one_job(node: NodeProcess) -> None:
    key = node.new_key("client", "idem-retry")
    body = {"prompt": "Say yes.", "model": SMOL, "params": {"max_tokens": 4}}
    with LossyProxy(f"http://127.0.0.1:{node.port}") as proxy:
        calls = 0

        def submit() -> dict:
            nonlocal calls
            calls += 1
            r = httpx.post(
                f"{proxy.url}/api/v1/jobs",
                json=body,
                headers={"X-Api-Key": key, "Idempotency-Key": "retry-me-1"},
                timeout=120,
            )
            r.raise_for_status()
            return r.json()

        job = with_retry(submit)
    assert calls == 2
    assert proxy.forwarded == [201, 200], proxy.forwarded  # the node saw both; one job made
    jobs = node.request("GET", "/v1/jobs", key).json()["jobs"]
    assert [j["job_id"] for j in jobs] == [job["job_id"]]
    done = node.wait_for(job["job_id"], ("completed", "failed", "cancelled"), key=key)
    assert done["status"] == "completed", done


def test_the_app_declares_its_parameters_as_litestar_3_will_require(tmp_path: Path) -> None:
    """Every handler's body and parameters are declared the way Litestar 3 resolves them (a
    body marker on `data`, an explicit header, query or path parameter where it is not
    inferred): building the app raises none of Litestar's deprecation warnings, each of which
    names a declaration that the next major version will refuse."""
    node = Node(NodeSettings(data_dir=tmp_path / "data", run_miner=False))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        app = create_app(node)
    deprecated = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    assert not deprecated, "\n".join(deprecated)
    # The body markers changed nothing of the contract: the submit still takes a job as JSON.
    submit = app.openapi_schema.paths["/api/v1/jobs"].post
    assert submit.request_body.content["application/json"].schema.ref.endswith("/SubmitJob")
