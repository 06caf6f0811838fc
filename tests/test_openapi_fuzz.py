"""Fuzzing the API from its own OpenAPI document against a real node with the built-in miner.

Schemathesis generates requests for every operation from `/api/schema/openapi.json`, valid
ones (positive) and invalid ones (negative), and each goes to the node as a client, as a miner
and with no key. Every response must be a documented status with a body that matches its
documented schema, and none may be a 5xx. A second pass aims generated requests at real
objects (a pending job, a job this miner holds, the miner's own id, the built-in miner's
model), so that bodies reach the domain code and the model behind the edge instead of stopping
at a 404. At the end the built-in miner must
still complete a normal job.

The run is seeded (the same requests every time for the same document) and bounded by a
number of examples per operation, not by time.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable
from typing import Any

import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import Case, GenerationMode, checks
from schemathesis.errors import FailureGroup

from tests.conftest import GENERATION_WAIT, SMOL, NodeProcess, free_port
from tests.test_api_edge import resolve

SEED = 20_261_127
# Generated cases per operation in the first pass; each is sent three times (client, miner,
# no key), so 31 operations give about 3 x 31 x 34 requests.
POSITIVE_EXAMPLES = 24
NEGATIVE_EXAMPLES = 10
# Cases per operation in the pass aimed at real objects (sent with the key that owns them).
TARGETED_POSITIVE = 15
TARGETED_NEGATIVE = 5
MIN_REQUESTS = 2000
REQUEST_TIMEOUT = 120  # a bound for one request on a loaded machine, never a budget
# A long poll the fuzzer asks for is cut to this, so waits cannot add up to minutes.
LONG_POLL_CAP = 0.2
# Only the fuzzing miner serves this model, so its jobs wait for the fuzzer's claims.
FUZZ_MODEL = "fuzz-model"
FUZZ_MINER = "fuzz-miner"
FUZZ_MINER_2 = "fuzz-miner-2"

# Short jobs; webhooks may point at loopback (the fuzzer's sink); no rate limit on the public
# reads, which all come from one address here (the limits have tests of their own); the
# fuzzing miner stays online however long the run takes on a slow machine.
MAX_TOKENS = 8
NODE_FLAGS = (
    "--max-tokens-limit",
    str(MAX_TOKENS),
    "--webhook-allow",
    "127.0.0.1",
    "--rate",
    "public=0",
    "--miner-timeout",
    "3600",
)

CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
]


class Fuzzer:
    """Sends generated cases to one node and keeps the tally and every failed check."""

    def __init__(self, node: NodeProcess, keys: dict[str, str | None]) -> None:
        self.node = node
        self.base_url = f"http://127.0.0.1:{node.port}"
        self.keys = keys  # identity name -> API key (None: no key)
        self.document = node.request("GET", "/schema/openapi.json").json()
        self.schema = schemathesis.openapi.from_dict(self.document)
        self.operations = {
            result.ok().label: result.ok() for result in self.schema.get_all_operations()
        }
        self.session = requests.Session()
        # Webhook URLs the fuzzer registers point here: a loopback port nobody listens on, so
        # the node's deliveries never leave the machine.
        self.sink = f"http://127.0.0.1:{free_port()}/hook"
        self.requests = 0
        self.seen: collections.Counter[tuple[str, str, int]] = collections.Counter()
        # Refusals of valid (positive) cases, by operation, status and error code.
        self.codes: collections.Counter[tuple[str, int, str]] = collections.Counter()
        self.first_refusal: dict[tuple[str, str], str] = {}  # (operation, code) -> detail
        self.server_errors: list[str] = []
        self.failures: list[str] = []
        self._seeds = itertools.count(SEED)

    # -- sending -------------------------------------------------------------------------

    def prepare(self, case: Case) -> None:
        """Make a generated case safe to send: the key comes from the identity, long polls
        are cut short, and webhook URLs point at the local sink."""
        for name in list(case.headers or {}):
            if name.lower() == "x-api-key":
                del case.headers[name]
        wait = (case.query or {}).get("wait")
        try:
            if wait is not None and LONG_POLL_CAP < float(wait) <= 60:
                case.query["wait"] = str(LONG_POLL_CAP)
        except (TypeError, ValueError):
            pass
        if isinstance(case.body, dict) and isinstance(case.body.get("url"), str):
            case.body["url"] = self.sink

    def send(self, case: Case, identity: str, positive: bool) -> None:
        key = self.keys[identity]
        headers = {"X-Api-Key": key} if key else None
        label = case.operation.label
        try:
            response = case.call(
                base_url=self.base_url,
                session=self.session,
                headers=headers,
                timeout=REQUEST_TIMEOUT,
            )
        except Exception as e:  # a dropped connection or a timeout is a finding too
            self.failures.append(f"{label} as {identity}: no response: {e!r}")
            return
        self.requests += 1
        self.seen[(label, identity, response.status_code)] += 1
        if positive and response.status_code >= 400:
            try:
                answer = response.json()
                code, detail = str(answer.get("error_code")), str(answer.get("detail"))
            except (ValueError, AttributeError):
                code, detail = "None", response.text
            self.codes[(label, response.status_code, code)] += 1
            self.first_refusal.setdefault((label, code), detail[:160])
        if response.status_code >= 500:
            self.server_errors.append(
                f"{label} as {identity}: {response.status_code} {response.text[:300]}\n"
                f"  {case.as_curl_command(headers=headers)}"
            )
        try:
            case.validate_response(response, checks=CHECKS, headers=headers)
        except FailureGroup as e:
            self.failures.append(f"{label} as {identity}:\n{str(e)[:3000]}")

    # -- generating ----------------------------------------------------------------------

    def run(
        self,
        label: str,
        identities: list[str],
        positive: int,
        negative: int,
        aim: Callable[[Case], None] | None = None,
    ) -> None:
        """Generate `positive` valid and `negative` invalid cases for the operation `label`,
        aim each with `aim` (if given), and send it as each of `identities`. An aimed valid
        case keeps only the body fields the document names, so that its values, not an
        unknown field, meet the domain code."""
        operation = self.operations[label]
        method, path = label.split(" ", 1)
        request_body = self.document["paths"][path][method.lower()].get("requestBody", {})
        body_schema = (
            resolve(self.document, request_body)
            .get("content", {})
            .get("application/json", {})
            .get("schema")
        )
        for mode, examples in (
            (GenerationMode.POSITIVE, positive),
            (GenerationMode.NEGATIVE, negative),
        ):

            @settings(
                max_examples=examples,
                database=None,
                deadline=None,
                derandomize=False,
                phases=[Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            @hypothesis.seed(next(self._seeds))
            @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
            def each(case: Case) -> None:
                valid = case.meta is not None and case.meta.generation.mode.is_positive
                self.prepare(case)
                if aim is not None:
                    if valid and body_schema and isinstance(case.body, dict):
                        case.body = documented_only(self.document, case.body, body_schema)
                    aim(case)
                for identity in identities:
                    self.send(case, identity, valid)

            try:
                each()
            except Unsatisfiable:
                # An operation with no inputs has no invalid request to make.
                assert mode is GenerationMode.NEGATIVE, label


def documented_only(document: dict, value: Any, schema: dict) -> Any:
    """`value` without the object keys `schema` does not name (at any depth it describes)."""
    schema = resolve(document, schema)
    for branch in schema.get("oneOf", []) + schema.get("anyOf", []):
        if isinstance(value, dict) and resolve(document, branch).get("properties"):
            schema = resolve(document, branch)
            break
    properties = schema.get("properties")
    if not isinstance(value, dict) or not properties:
        return value
    return {
        name: documented_only(document, item, properties[name])
        for name, item in value.items()
        if name in properties
    }


# -- aiming at real objects ------------------------------------------------------------------


class Targets:
    """Fresh real objects for the second pass: jobs in each state, the miners' own ids."""

    def __init__(self, node: NodeProcess, miner_key: str) -> None:
        self.node = node
        self.miner_key = miner_key

    def pending_job(self) -> str:
        job = self.node.submit("Fuzz target.", model=FUZZ_MODEL, params={"max_tokens": 8})
        return job["job_id"]

    def claimed_job(self) -> str:
        job_id = self.pending_job()
        r = self.node.request(
            "POST", f"/v1/jobs/{job_id}/claim", self.miner_key, json={"miner_id": FUZZ_MINER}
        )
        assert r.status_code == 200, r.text
        return job_id

    def ended_job(self) -> str:
        job_id = self.pending_job()
        r = self.node.request("POST", f"/v1/jobs/{job_id}/cancel", self.node.client_key)
        assert r.status_code == 200, r.text
        return job_id


def at_job(make: Callable[[], str], miner_id: str | None = None) -> Callable[[Case], None]:
    """Aim a case at a fresh job from `make`, and name `miner_id` where the body names one."""

    def aim(case: Case) -> None:
        case.path_parameters["job_id"] = make()
        if miner_id and isinstance(case.body, dict) and isinstance(case.body.get("miner_id"), str):
            case.body["miner_id"] = miner_id

    return aim


def for_the_built_in_miner(case: Case) -> None:
    """Aim a submit at the built-in miner: its model, and at most the node's max_tokens (the
    default, 256, is over this node's limit), so that the generated prompt, temperature,
    top_p, seed and stop strings reach llama.cpp."""
    if not isinstance(case.body, dict):
        return
    if isinstance(case.body.get("model"), str):
        case.body["model"] = SMOL
    if case.body.get("params") is None:
        case.body["params"] = {}
    params = case.body["params"]
    if isinstance(params, dict):
        max_tokens = params.get("max_tokens")
        if max_tokens is None:
            params["max_tokens"] = MAX_TOKENS
        elif isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens > 0:
            params["max_tokens"] = min(max_tokens, MAX_TOKENS)


def as_miner(miner_id: str) -> Callable[[Case], None]:
    """Name `miner_id` wherever the case names a miner (path, query or body)."""

    def aim(case: Case) -> None:
        if "miner_id" in case.path_parameters:
            case.path_parameters["miner_id"] = miner_id
        if isinstance(case.query, dict) and isinstance(case.query.get("miner_id"), str):
            case.query["miner_id"] = miner_id
        if isinstance(case.body, dict) and isinstance(case.body.get("miner_id"), str):
            case.body["miner_id"] = miner_id

    return aim


def cancel_leftovers(node: NodeProcess) -> None:
    """Cancel every pending or running job (admin key), so the built-in miner's next job is
    not queued behind the fuzzer's."""
    for status in ("pending", "running"):
        while True:
            page = node.request(
                "GET", "/v1/jobs", node.admin_key, params={"status": status, "limit": 100}
            )
            assert page.status_code == 200, page.text
            jobs = page.json()["jobs"]
            if not jobs:
                break
            for job in jobs:
                r = node.request("POST", f"/v1/jobs/{job['job_id']}/cancel", node.admin_key)
                assert r.status_code in (200, 409), r.text  # 409: it ended meanwhile


# -- the test --------------------------------------------------------------------------------


@pytest.fixture
def fuzzed_node(start_node) -> NodeProcess:
    """A node with the built-in miner whose jobs are short (at most 8 tokens), that lets
    webhooks point at loopback (where the fuzzer's sink is)."""
    return start_node(*NODE_FLAGS)


def test_fuzzing_from_the_openapi_document_finds_no_5xx_and_no_undocumented_answer(
    fuzzed_node: NodeProcess,
) -> None:
    node = fuzzed_node
    miner_key = node.register_miner(FUZZ_MINER, capabilities=[FUZZ_MODEL])
    miner_2_key = node.new_key("miner", FUZZ_MINER_2)
    keys = {
        "client": node.client_key,
        "miner": miner_key,
        "no key": None,
        "miner 2": miner_2_key,
    }
    fuzzer = Fuzzer(node, keys)
    assert len(fuzzer.operations) >= 30, sorted(fuzzer.operations)

    # Pass 1: every operation, every identity, generated parameters and bodies.
    for label in fuzzer.operations:
        fuzzer.run(label, ["client", "miner", "no key"], POSITIVE_EXAMPLES, NEGATIVE_EXAMPLES)

    # Pass 2: the same operations aimed at real jobs and the miners' own ids.
    targets = Targets(node, miner_key)
    aimed = [
        ("POST /api/v1/jobs", "client", for_the_built_in_miner),
        ("GET /api/v1/jobs/{job_id}", "client", at_job(targets.pending_job)),
        ("POST /api/v1/jobs/{job_id}/cancel", "client", at_job(targets.pending_job)),
        ("GET /api/v1/jobs/{job_id}/stream", "client", at_job(targets.ended_job)),
        ("POST /api/v1/jobs/{job_id}/claim", "miner", at_job(targets.pending_job, FUZZ_MINER)),
        ("POST /api/v1/jobs/{job_id}/complete", "miner", at_job(targets.claimed_job, FUZZ_MINER)),
        ("POST /api/v1/jobs/{job_id}/fail", "miner", at_job(targets.claimed_job, FUZZ_MINER)),
        ("POST /api/v1/jobs/{job_id}/progress", "miner", at_job(targets.claimed_job, FUZZ_MINER)),
        ("GET /api/v1/jobs/available", "miner", as_miner(FUZZ_MINER)),
        ("POST /api/v1/miners/{miner_id}/heartbeat", "miner", as_miner(FUZZ_MINER)),
        ("POST /api/v1/miners/register", "miner 2", as_miner(FUZZ_MINER_2)),
    ]
    for label, identity, aim in aimed:
        fuzzer.run(label, [identity], TARGETED_POSITIVE, TARGETED_NEGATIVE, aim)

    summary = summarize(fuzzer)
    print(summary)
    assert not fuzzer.server_errors, (
        f"{len(fuzzer.server_errors)} responses were 5xx:\n" + "\n".join(fuzzer.server_errors[:20])
    )
    assert not fuzzer.failures, (
        f"{len(fuzzer.failures)} requests got no answer or one the document does not allow:\n\n"
        + "\n\n".join(fuzzer.failures[:15])
    )
    assert fuzzer.requests >= MIN_REQUESTS, summary
    # The aimed pass reached the domain code: generated jobs were accepted (and run). None
    # is when every valid submit the document describes is one the node refuses.
    accepted = fuzzer.seen[("POST /api/v1/jobs", "client", 201)]
    assert accepted > 0, f"no generated job was accepted; see 'valid cases refused':\n{summary}"
    for label in fuzzer.operations:
        for identity in ("client", "miner", "no key"):
            assert any(k[:2] == (label, identity) for k in fuzzer.seen), (label, identity)

    # The built-in miner is still serving.
    cancel_leftovers(node)
    job = node.submit("Say hello.", params={"max_tokens": 8})
    done = node.wait_for(
        job["job_id"], ("completed", "failed", "cancelled"), timeout=GENERATION_WAIT
    )
    assert done["status"] == "completed", done
    assert done["miner_id"] == "builtin"
    health = node.request("GET", "/health").json()
    assert health["miner"]["state"] in ("idle", "busy"), health


def summarize(fuzzer: Fuzzer) -> str:
    """Requests by operation and status, for the test's output."""
    by_operation: dict[str, collections.Counter[int]] = collections.defaultdict(collections.Counter)
    for (label, _identity, status), count in fuzzer.seen.items():
        by_operation[label][status] += count
    lines = [f"{fuzzer.requests} requests"]
    for label in sorted(by_operation):
        statuses = ", ".join(f"{s}: {n}" for s, n in sorted(by_operation[label].items()))
        codes = ", ".join(
            f"{code} {n}"
            for (op, _, code), n in sorted(fuzzer.codes.items(), key=lambda kv: -kv[1])
            if op == label
        )
        lines.append(
            f"  {label}: {statuses}" + (f"; valid cases refused: {codes}" if codes else "")
        )
        for (op, code), detail in sorted(fuzzer.first_refusal.items()):
            if op == label and code not in ("MISSING_API_KEY", "WRONG_ROLE"):
                lines.append(f"      e.g. {code}: {detail}")
    return "\n".join(lines)
