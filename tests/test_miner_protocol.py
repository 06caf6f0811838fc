"""The miner side of the API, driven by hand against a coordinator with no built-in miner."""

from __future__ import annotations

import threading
import time

from tests.conftest import SMOL, NodeProcess
from tests.test_jobs_api import assert_error


def claim(node: NodeProcess, key: str, miner_id: str, job_id: str):
    return node.request("POST", f"/v1/jobs/{job_id}/claim", key, json={"miner_id": miner_id})


def test_register_and_see_available_jobs_for_my_models(coordinator: NodeProcess) -> None:
    key = coordinator.register_miner("m-smol", [SMOL])
    other = coordinator.register_miner("m-other", ["other-model"])
    assert SMOL in coordinator.request("GET", "/health").json()["models"]
    smol_job = coordinator.submit("for smol")
    other_job = coordinator.submit("for other", model="other-model")
    mine = coordinator.request("GET", "/v1/jobs/available", key, params={"miner_id": "m-smol"})
    assert [j["job_id"] for j in mine.json()["jobs"]] == [smol_job["job_id"]]
    theirs = coordinator.request(
        "GET", "/v1/jobs/available", other, params={"miner_id": "m-other"}
    ).json()["jobs"]
    assert [j["job_id"] for j in theirs] == [other_job["job_id"]]
    # a miner cannot take a job for a model it did not register
    assert_error(claim(coordinator, key, "m-smol", other_job["job_id"]), 409, "MODEL_NOT_SERVED")
    miners = coordinator.request("GET", "/v1/miners").json()["miners"]
    assert {m["miner_id"] for m in miners} == {"m-smol", "m-other"}
    assert all(m["online"] for m in miners)


def test_miner_acts_only_as_its_own_miner_id(coordinator: NodeProcess) -> None:
    key = coordinator.register_miner("honest")
    r = coordinator.request(
        "POST", "/v1/miners/register", key, json={"miner_id": "impostor", "capabilities": [SMOL]}
    )
    assert_error(r, 403, "MINER_ID_MISMATCH")
    r = coordinator.request("GET", "/v1/jobs/available", key, params={"miner_id": "impostor"})
    assert_error(r, 403, "MINER_ID_MISMATCH")
    r = coordinator.request(
        "GET", "/v1/jobs/available", coordinator.client_key, params={"miner_id": "honest"}
    )
    assert_error(r, 403, "WRONG_ROLE")
    unregistered = coordinator.new_key("miner", "newcomer")
    r = coordinator.request(
        "GET", "/v1/jobs/available", unregistered, params={"miner_id": "newcomer"}
    )
    assert_error(r, 404, "MINER_NOT_REGISTERED")
    r = coordinator.request(
        "POST", "/v1/miners/register", key, json={"miner_id": "honest", "capabilities": []}
    )
    assert_error(r, 400, "INVALID_CAPABILITIES")


def test_of_two_concurrent_claims_exactly_one_wins(coordinator: NodeProcess) -> None:
    keys = {name: coordinator.register_miner(name) for name in ("racer-a", "racer-b")}
    jobs = [coordinator.submit(f"race {i}")["job_id"] for i in range(20)]
    for job_id in jobs:
        barrier = threading.Barrier(2)
        results: dict[str, int] = {}

        def race(name: str, job_id: str = job_id, barrier=barrier, results=results) -> None:
            barrier.wait()
            r = claim(coordinator, keys[name], name, job_id)
            results[name] = r.status_code
            if r.status_code == 409:
                assert r.json()["error_code"] == "JOB_ALREADY_CLAIMED"

        threads = [threading.Thread(target=race, args=(n,)) for n in keys]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results.values()) == [200, 409], results
        job = coordinator.job(job_id, coordinator.admin_key)
        assert job["status"] == "running"
        assert results[job["miner_id"]] == 200
        assert job["attempts"] == 1


def test_only_the_claiming_miner_completes_and_terminal_states_are_final(
    coordinator: NodeProcess,
) -> None:
    a = coordinator.register_miner("holder")
    b = coordinator.register_miner("bystander")
    job_id = coordinator.submit("who completes me")["job_id"]
    done = {"miner_id": "bystander", "result": "stolen"}
    r = coordinator.request("POST", f"/v1/jobs/{job_id}/complete", b, json=done)
    assert_error(r, 409, "JOB_NOT_CLAIMED")
    assert claim(coordinator, a, "holder", job_id).status_code == 200
    r = coordinator.request("POST", f"/v1/jobs/{job_id}/complete", b, json=done)
    assert_error(r, 403, "NOT_JOB_MINER")
    r = coordinator.request(
        "POST", f"/v1/jobs/{job_id}/fail", b, json={"miner_id": "bystander", "error": "nope"}
    )
    assert_error(r, 403, "NOT_JOB_MINER")
    # a miner key cannot complete in another miner's name either
    r = coordinator.request(
        "POST", f"/v1/jobs/{job_id}/complete", b, json={"miner_id": "holder", "result": "x"}
    )
    assert_error(r, 403, "MINER_ID_MISMATCH")
    ok = coordinator.request(
        "POST",
        f"/v1/jobs/{job_id}/complete",
        a,
        json={
            "miner_id": "holder",
            "result": "the answer",
            "usage": {"prompt_tokens": 3, "completion_tokens": 2},
            "completed_at": "2026-01-24T15:00:05Z",
        },
    )
    assert ok.status_code == 200, ok.text
    job = ok.json()
    assert job["status"] == "completed" and job["result"] == "the answer"
    assert job["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    for path, body in (
        ("complete", {"miner_id": "holder", "result": "again"}),
        ("fail", {"miner_id": "holder", "error": "late"}),
        ("claim", {"miner_id": "holder"}),
    ):
        r = coordinator.request("POST", f"/v1/jobs/{job_id}/{path}", a, json=body)
        assert_error(r, 409, "JOB_ALREADY_FINISHED")
    r = coordinator.request("POST", f"/v1/jobs/{job_id}/cancel", coordinator.client_key)
    assert_error(r, 409, "JOB_ALREADY_FINISHED")
    assert coordinator.job(job_id)["result"] == "the answer"


def test_failing_a_job_records_the_error(coordinator: NodeProcess) -> None:
    key = coordinator.register_miner("clumsy")
    job_id = coordinator.submit("fail me")["job_id"]
    claim(coordinator, key, "clumsy", job_id)
    r = coordinator.request(
        "POST",
        f"/v1/jobs/{job_id}/fail",
        key,
        json={"miner_id": "clumsy", "error": "GPU fell over"},
    )
    assert r.status_code == 200
    job = coordinator.job(job_id)
    assert job["status"] == "failed"
    assert job["error"] == "GPU fell over" and job["error_code"] == "MINER_ERROR"
    assert job["result"] is None


def test_cancel_while_running_makes_the_miners_complete_409(coordinator: NodeProcess) -> None:
    key = coordinator.register_miner("slowpoke")
    job_id = coordinator.submit("cancel me mid-way")["job_id"]
    claim(coordinator, key, "slowpoke", job_id)
    r = coordinator.request("POST", f"/v1/jobs/{job_id}/cancel", coordinator.client_key)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    r = coordinator.request(
        "POST",
        f"/v1/jobs/{job_id}/complete",
        key,
        json={"miner_id": "slowpoke", "result": "too late"},
    )
    assert_error(r, 409, "JOB_CANCELLED")
    assert coordinator.job(job_id)["status"] == "cancelled"
    assert coordinator.job(job_id)["result"] is None


def test_an_expired_lease_requeues_then_fails_the_job(coordinator: NodeProcess) -> None:
    # The coordinator fixture runs with --lease-seconds 1 --max-attempts 2.
    key = coordinator.register_miner("flaky")
    job_id = coordinator.submit("lease me")["job_id"]
    assert claim(coordinator, key, "flaky", job_id).status_code == 200
    job = coordinator.wait_for(job_id, ("pending",))
    assert job["attempts"] == 1 and job["miner_id"] is None
    # the dead miner's late completion is refused
    r = coordinator.request(
        "POST", f"/v1/jobs/{job_id}/complete", key, json={"miner_id": "flaky", "result": "late"}
    )
    assert_error(r, 409, "JOB_NOT_CLAIMED")
    assert claim(coordinator, key, "flaky", job_id).status_code == 200
    job = coordinator.wait_for(job_id, ("failed",))
    assert job["error_code"] == "LEASE_EXPIRED"
    assert job["attempts"] == 2
    assert "lease" in job["error"]


def test_heartbeat_keeps_a_lease_alive(start_node) -> None:
    # A lease that heartbeats every half second keep with seconds to spare on a busy machine.
    lease = 5
    coordinator = start_node("--no-miner", "--lease-seconds", str(lease), "--max-attempts", "1")
    key = coordinator.register_miner("steady")
    job_id = coordinator.submit("keep me")["job_id"]
    assert claim(coordinator, key, "steady", job_id).status_code == 200
    claimed = time.monotonic()
    while True:
        r = coordinator.request("POST", "/v1/miners/steady/heartbeat", key)
        assert r.status_code == 200 and r.json()["renewed"] == [job_id]
        if time.monotonic() > claimed + 1.5 * lease:  # well past the first lease
            break
        time.sleep(0.5)  # the miner's pace, not a wait for anything
    assert coordinator.job(job_id)["status"] == "running"
    r = coordinator.request(
        "POST", f"/v1/jobs/{job_id}/complete", key, json={"miner_id": "steady", "result": "made it"}
    )
    assert r.status_code == 200
    other = coordinator.register_miner("other-steady")
    r = coordinator.request("POST", "/v1/miners/steady/heartbeat", other)
    assert_error(r, 403, "MINER_ID_MISMATCH")


def test_unknown_model_names_the_served_ones_until_a_miner_serves_it(
    coordinator: NodeProcess,
) -> None:
    r = coordinator.request(
        "POST", "/v1/jobs", coordinator.client_key, json={"prompt": "x", "model": "tiny"}
    )
    err = assert_error(r, 400, "UNKNOWN_MODEL")
    assert "none" in err["detail"]
    coordinator.register_miner("tiny-miner", ["tiny"])
    r = coordinator.request(
        "POST", "/v1/jobs", coordinator.client_key, json={"prompt": "x", "model": "tiny"}
    )
    assert r.status_code == 201
    r = coordinator.request(
        "POST", "/v1/jobs", coordinator.client_key, json={"prompt": "x", "model": "huge"}
    )
    assert "tiny" in assert_error(r, 400, "UNKNOWN_MODEL")["detail"]


def test_bad_miner_requests_leave_the_store_unchanged(start_node) -> None:
    from tests.conftest import db_snapshot

    coordinator = start_node("--no-miner")
    key = coordinator.register_miner("sloppy")
    job_id = coordinator.submit("sloppy work")["job_id"]
    claim(coordinator, key, "sloppy", job_id)
    before = db_snapshot(coordinator.data_dir)
    bad = [
        ("complete", {"miner_id": "sloppy"}, 400, "INVALID_RESULT"),
        ("complete", {"miner_id": "sloppy", "result": 5}, 400, "INVALID_RESULT"),
        (
            "complete",
            {"miner_id": "sloppy", "result": "x", "usage": {"prompt_tokens": -1}},
            400,
            "INVALID_USAGE",
        ),
        ("complete", {"miner_id": "sloppy", "result": "x", "bonus": 1}, 400, "UNKNOWN_FIELDS"),
        ("complete", {"result": "x"}, 400, "INVALID_MINER_ID"),
        ("fail", {"miner_id": "sloppy"}, 400, "INVALID_ERROR"),
        ("claim", {}, 400, "INVALID_MINER_ID"),
        ("claim", {"miner_id": "sloppy", "extra": True}, 400, "UNKNOWN_FIELDS"),
    ]
    for path, body, status, code in bad:
        r = coordinator.request("POST", f"/v1/jobs/{job_id}/{path}", key, json=body)
        assert_error(r, status, code)
    r = coordinator.request(
        "POST",
        f"/v1/jobs/{job_id}/complete",
        key,
        content=b"[]",
        headers={"Content-Type": "application/json"},
    )
    assert_error(r, 400, "INVALID_BODY")
    r = coordinator.request(
        "POST",
        f"/v1/jobs/{job_id}/complete",
        "ait_miner_forged",
        json={"miner_id": "sloppy", "result": "x"},
    )
    assert_error(r, 401, "INVALID_API_KEY")
    assert db_snapshot(coordinator.data_dir) == before
