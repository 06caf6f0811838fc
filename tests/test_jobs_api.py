"""The client side of the job API against a real node with the built-in miner and real model."""

from __future__ import annotations

import re

import pytest

from tests.conftest import SMOL, NodeProcess, db_snapshot


def assert_error(response, status: int, error_code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"detail", "error_code"}, body
    assert body["error_code"] == error_code, body
    assert body["detail"] and "Traceback" not in body["detail"]
    return body


def test_health_is_public_and_names_models_and_miner(node: NodeProcess) -> None:
    health = node.request("GET", "/health").json()
    assert health["status"] == "ok"
    assert SMOL in health["models"] and health["default_model"] == SMOL
    assert health["miner"]["state"] in ("idle", "busy")
    assert health["miner"]["models"] == [SMOL]
    assert health["miner"]["gpu_info"]["backend"] in ("cpu", "gpu")
    assert health["aliases"] == {"llama3.2": SMOL}


def test_submit_then_get_gives_a_generated_result(node: NodeProcess) -> None:
    created = node.submit("What is the capital of France?", params={"max_tokens": 32})
    assert re.fullmatch(r"job-[0-9a-f]{16}", created["job_id"])
    assert created["status"] == "pending"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", created["created_at"])
    job = node.wait_for(created["job_id"], ("completed", "failed"))
    assert job["status"] == "completed", job
    assert job["result"].strip()
    assert job["miner_id"] == "builtin"
    assert job["model"] == SMOL and job["served_model"] == SMOL
    assert 0 < job["usage"]["completion_tokens"] <= 32
    assert job["usage"]["prompt_tokens"] > 5
    assert job["started_at"] and job["completed_at"]
    assert job["created_at"] <= job["started_at"] <= job["completed_at"]


def test_alias_shows_requested_and_served_model(node: NodeProcess) -> None:
    job = node.submit("Hi", model="llama3.2", params={"max_tokens": 8})
    assert job["model"] == "llama3.2"
    assert job["served_model"] == SMOL
    done = node.wait_for(job["job_id"], ("completed",))
    assert done["result"]


def test_seeded_greedy_jobs_give_the_same_output(node: NodeProcess) -> None:
    params = {"max_tokens": 40, "temperature": 0, "seed": 7}
    a = node.submit("Write one sentence about the sea.", params=params)
    b = node.submit("Write one sentence about the sea.", params=params)
    a = node.wait_for(a["job_id"], ("completed",))
    b = node.wait_for(b["job_id"], ("completed",))
    assert a["result"] and a["result"] == b["result"]


def test_seed_changes_sampled_output(node: NodeProcess) -> None:
    outputs = set()
    for seed in (1, 2, 3):
        job = node.submit(
            "Invent a name for a cat.",
            params={"max_tokens": 24, "temperature": 1.5, "top_p": 1.0, "seed": seed},
        )
        outputs.add(node.wait_for(job["job_id"], ("completed",))["result"])
    assert len(outputs) > 1


def test_max_tokens_and_stop_are_honoured(node: NodeProcess) -> None:
    short = node.submit(
        "Count from 1 to 50, separated by commas.", params={"max_tokens": 5, "temperature": 0}
    )
    short = node.wait_for(short["job_id"], ("completed",))
    assert short["usage"]["completion_tokens"] <= 5
    full = node.submit(
        "Count from 1 to 50, separated by commas.", params={"max_tokens": 60, "temperature": 0}
    )
    full = node.wait_for(full["job_id"], ("completed",))
    assert "5" in full["result"]
    stopped = node.submit(
        "Count from 1 to 50, separated by commas.",
        params={"max_tokens": 60, "temperature": 0, "stop": ["5"]},
    )
    stopped = node.wait_for(stopped["job_id"], ("completed",))
    assert "5" not in stopped["result"]
    assert full["result"].startswith(stopped["result"])


def test_list_is_newest_first_with_a_cursor(node: NodeProcess) -> None:
    key = node.new_key("client", "lister")
    ids = [node.submit(f"Say {i}", key=key, params={"max_tokens": 2})["job_id"] for i in range(5)]
    page1 = node.request("GET", "/v1/jobs", key, params={"limit": 2}).json()
    assert [j["job_id"] for j in page1["jobs"]] == ids[::-1][:2]
    page2 = node.request(
        "GET", "/v1/jobs", key, params={"limit": 2, "cursor": page1["next_cursor"]}
    ).json()
    assert [j["job_id"] for j in page2["jobs"]] == ids[::-1][2:4]
    page3 = node.request(
        "GET", "/v1/jobs", key, params={"limit": 2, "cursor": page2["next_cursor"]}
    ).json()
    assert [j["job_id"] for j in page3["jobs"]] == ids[:1]
    assert page3["next_cursor"] is None
    for job_id in ids:
        node.wait_for(job_id, ("completed",), key=key)
    done = node.request("GET", "/v1/jobs", key, params={"status": "completed"}).json()
    assert {j["job_id"] for j in done["jobs"]} == set(ids)
    assert node.request("GET", "/v1/jobs", key, params={"status": "pending"}).json()["jobs"] == []


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"status": "done"}, "INVALID_STATUS"),
        ({"limit": "0"}, "INVALID_LIMIT"),
        ({"limit": "1000"}, "INVALID_LIMIT"),
        ({"limit": "ten"}, "INVALID_LIMIT"),
        ({"cursor": "!!nope"}, "INVALID_CURSOR"),
    ],
)
def test_list_rejects_bad_query(node: NodeProcess, params: dict, code: str) -> None:
    assert_error(node.request("GET", "/v1/jobs", node.client_key, params=params), 400, code)


def test_clients_see_and_cancel_only_their_own_jobs(node: NodeProcess) -> None:
    alice = node.new_key("client", "alice")
    bob = node.new_key("client", "bob")
    job = node.submit("Hello from Alice", key=alice, params={"max_tokens": 4})
    assert_error(node.request("GET", f"/v1/jobs/{job['job_id']}", bob), 403, "NOT_YOUR_JOB")
    assert_error(node.request("POST", f"/v1/jobs/{job['job_id']}/cancel", bob), 403, "NOT_YOUR_JOB")
    listed = node.request("GET", "/v1/jobs", bob).json()["jobs"]
    assert job["job_id"] not in {j["job_id"] for j in listed}
    # the admin sees everyone's jobs
    assert node.request("GET", f"/v1/jobs/{job['job_id']}", node.admin_key).status_code == 200


def test_missing_wrong_and_revoked_keys(node: NodeProcess) -> None:
    assert_error(node.request("GET", "/v1/jobs"), 401, "MISSING_API_KEY")
    assert_error(node.request("GET", "/v1/jobs", "ait_client_wrong"), 401, "INVALID_API_KEY")
    key = node.new_key("client", "short-lived")
    assert node.request("GET", "/v1/jobs", key).status_code == 200
    from tests.conftest import run_cli

    listed = run_cli("keys", "list", "--json", "--data-dir", str(node.data_dir)).stdout
    import json

    key_id = next(k["key_id"] for k in json.loads(listed) if k["name"] == "short-lived")
    run_cli("keys", "revoke", key_id, "--data-dir", str(node.data_dir))
    assert_error(node.request("GET", "/v1/jobs", key), 401, "API_KEY_REVOKED")
    assert_error(
        node.request("POST", "/v1/jobs", key, json={"prompt": "x", "model": SMOL}),
        401,
        "API_KEY_REVOKED",
    )


def test_a_miner_key_cannot_submit(node: NodeProcess) -> None:
    key = node.new_key("miner", "not-a-client")
    r = node.request("POST", "/v1/jobs", key, json={"prompt": "x", "model": SMOL})
    assert_error(r, 403, "WRONG_ROLE")


def test_unknown_job_is_404(node: NodeProcess) -> None:
    assert_error(node.request("GET", "/v1/jobs/job-nope", node.client_key), 404, "JOB_NOT_FOUND")
    assert_error(
        node.request("POST", "/v1/jobs/job-nope/cancel", node.client_key), 404, "JOB_NOT_FOUND"
    )


def test_unknown_endpoint_and_method_use_the_error_shape(node: NodeProcess) -> None:
    assert_error(node.request("GET", "/v1/nothing-here"), 404, "NOT_FOUND")
    assert_error(node.request("DELETE", "/v1/jobs", node.client_key), 405, "METHOD_NOT_ALLOWED")


BAD_SUBMISSIONS = [
    ({"model": SMOL}, 400, "INVALID_PROMPT"),
    ({"prompt": "", "model": SMOL}, 400, "INVALID_PROMPT"),
    ({"prompt": 5, "model": SMOL}, 400, "INVALID_PROMPT"),
    ({"prompt": "x" * 70_000, "model": SMOL}, 400, "PROMPT_TOO_LONG"),
    ({"prompt": "hi", "model": ""}, 400, "INVALID_MODEL"),
    ({"prompt": "hi", "model": "gpt-17"}, 400, "UNKNOWN_MODEL"),
    ({"prompt": "hi", "model": SMOL, "colour": "red"}, 400, "UNKNOWN_FIELDS"),
    ({"prompt": "hi", "model": SMOL, "params": {"max_tokens": 0}}, 400, "INVALID_PARAMS"),
    ({"prompt": "hi", "model": SMOL, "params": {"max_tokens": 10**6}}, 400, "INVALID_PARAMS"),
    ({"prompt": "hi", "model": SMOL, "params": {"max_tokens": "5"}}, 400, "INVALID_PARAMS"),
    ({"prompt": "hi", "model": SMOL, "params": {"temperature": 3}}, 400, "INVALID_PARAMS"),
    ({"prompt": "hi", "model": SMOL, "params": {"top_p": 0}}, 400, "INVALID_PARAMS"),
    ({"prompt": "hi", "model": SMOL, "params": {"seed": -1}}, 400, "INVALID_PARAMS"),
    ({"prompt": "hi", "model": SMOL, "params": {"stop": [""]}}, 400, "INVALID_PARAMS"),
    ({"prompt": "hi", "model": SMOL, "params": {"stop": list("abcde")}}, 400, "INVALID_PARAMS"),
    ({"prompt": "hi", "model": SMOL, "params": {"top_k": 5, "beam": 2}}, 400, "UNKNOWN_PARAMS"),
    ({"prompt": "hi", "model": SMOL, "params": []}, 400, "INVALID_PARAMS"),
]


def test_bad_submissions_get_clear_errors_and_write_nothing(node: NodeProcess) -> None:
    key = node.new_key("client", "careless")
    before = db_snapshot(node.data_dir)
    for body, status, code in BAD_SUBMISSIONS:
        err = assert_error(node.request("POST", "/v1/jobs", key, json=body), status, code)
        if code == "UNKNOWN_PARAMS":
            assert "beam" in err["detail"] and "top_k" in err["detail"]
        if code == "UNKNOWN_MODEL":
            assert SMOL in err["detail"]
    raw_cases = [b"{not json", b"[1, 2]", '"\xff"'.encode("latin-1")]
    for raw in raw_cases:
        r = node.request(
            "POST", "/v1/jobs", key, content=raw, headers={"Content-Type": "application/json"}
        )
        assert r.status_code == 400 and r.json()["error_code"] in ("INVALID_JSON", "INVALID_BODY")
    too_big = b'{"prompt": "' + b"x" * (2 << 20) + b'", "model": "' + SMOL.encode() + b'"}'
    assert_error(
        node.request(
            "POST", "/v1/jobs", key, content=too_big, headers={"Content-Type": "application/json"}
        ),
        413,
        "BODY_TOO_LARGE",
    )
    listed = node.request("GET", "/v1/jobs", key)
    assert listed.status_code == 200, listed.text
    assert listed.json()["jobs"] == []
    assert db_snapshot(node.data_dir) == before


def test_cancel_a_pending_job_then_cancel_again_is_409(start_node) -> None:
    # With no miner the job stays pending until cancelled.
    coord = start_node("--no-miner", "--accept-unserved-models")
    job = coord.submit("never runs")
    cancelled = coord.request("POST", f"/v1/jobs/{job['job_id']}/cancel", coord.client_key)
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    again = coord.request("POST", f"/v1/jobs/{job['job_id']}/cancel", coord.client_key)
    assert_error(again, 409, "JOB_ALREADY_FINISHED")
    assert coord.job(job["job_id"])["status"] == "cancelled"


def test_stats_are_public_and_count_jobs(node: NodeProcess) -> None:
    job = node.submit("One word please.", params={"max_tokens": 4})
    node.wait_for(job["job_id"], ("completed",))
    stats = node.request("GET", "/v1/stats").json()
    assert stats["jobs"]["completed"] >= 1
    assert stats["jobs"]["total"] == sum(
        stats["jobs"][s] for s in ("pending", "running", "completed", "failed", "cancelled")
    )
    assert stats["miners_online"] >= 1
    assert stats["tokens_generated"] > 0
    assert stats["average_job_latency_ms"] > 0
    assert stats["queue_depth"] == stats["jobs"]["pending"]


def test_openapi_schema_is_served(node: NodeProcess) -> None:
    r = node.request("GET", "/schema/openapi.json")
    assert r.status_code == 200
    assert "/api/v1/jobs" in r.json()["paths"]
