"""Claim-next and batch completion: work handed out, not raced for.

Driven by hand over real HTTP against a real node started `--no-miner` (short leases), with
the miners' keys made by the real `keys create` command.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from aitbc_node.receipts import hash_result, verify_receipt
from aitbc_node.signing import NodeKey
from tests.conftest import SMOL, NodeProcess
from tests.test_jobs_api import assert_error


def claim_next(node: NodeProcess, key: str, miner_id: str, **body: Any) -> httpx.Response:
    return node.request("POST", "/v1/jobs/claim-next", key, json={"miner_id": miner_id, **body})


def register_signing_miner(node: NodeProcess, name: str, signer: NodeKey) -> str:
    key = node.new_key("miner", name)
    r = node.request(
        "POST",
        "/v1/miners/register",
        key,
        json={"miner_id": name, "capabilities": [SMOL], "public_key": signer.public_key_hex},
    )
    assert r.status_code == 200, r.text
    return key


def signed(signer: NodeKey, job_id: str, result: str) -> dict[str, Any]:
    value = signer.sign(hash_result(result).encode("ascii"))
    return {
        "job_id": job_id,
        "result": result,
        "usage": {"prompt_tokens": 3, "completion_tokens": 2},
        "miner_signature": {"alg": "ed25519", "public_key": signer.public_key_hex, "value": value},
    }


def test_fifty_racing_miners_each_get_their_own_jobs(start_node: Any) -> None:
    node = start_node("--no-miner", "--rate", "client=0", "--rate", "miner=0")
    names = [f"racer-{i:02d}" for i in range(50)]
    with ThreadPoolExecutor(8) as pool:
        keys = dict(zip(names, pool.map(node.register_miner, names), strict=True))
    submitted = {node.submit(f"job {i}", params={"max_tokens": 4})["job_id"] for i in range(150)}
    max_jobs = 2
    taken: Counter[str] = Counter()
    sizes: list[int] = []
    statuses: Counter[int] = Counter()
    lock = threading.Lock()
    barrier = threading.Barrier(len(names))

    def mine(name: str) -> None:
        with httpx.Client(timeout=120) as http:
            barrier.wait()
            while True:
                r = http.post(
                    f"{node.url}/v1/jobs/claim-next",
                    headers={"X-Api-Key": keys[name]},
                    json={"miner_id": name, "max_jobs": max_jobs},
                )
                with lock:
                    statuses[r.status_code] += 1
                if r.status_code != 200:
                    return
                jobs = r.json()["jobs"]
                with lock:
                    sizes.append(len(jobs))
                    taken.update(j["job_id"] for j in jobs)
                    for job in jobs:
                        assert job["status"] == "running" and job["miner_id"] == name, job
                if not jobs:
                    return

    threads = [threading.Thread(target=mine, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert statuses.keys() == {200}, statuses
    assert set(taken) == submitted, "every job handed out"
    assert max(taken.values()) == 1, "no job handed to two miners"
    assert max(sizes) <= max_jobs
    # and the store agrees: each job runs for the miner it was handed to
    mine_of = {j: None for j in submitted}
    for job_id in submitted:
        job = node.job(job_id, node.admin_key)
        assert job["status"] == "running"
        mine_of[job_id] = job["miner_id"]
    assert len({m for m in mine_of.values()}) > 1, "the work was spread over the miners"


def test_a_miner_gets_at_most_what_it_asks_for_in_turn(coordinator: NodeProcess) -> None:
    key = coordinator.register_miner("taker")
    jobs = [coordinator.submit(f"job {i}")["job_id"] for i in range(5)]
    first = claim_next(coordinator, key, "taker", max_jobs=3)
    assert first.status_code == 200, first.text
    assert [j["job_id"] for j in first.json()["jobs"]] == jobs[:3]
    assert first.json()["lease_seconds"] == 1
    second = claim_next(coordinator, key, "taker", max_jobs=3).json()
    assert [j["job_id"] for j in second["jobs"]] == jobs[3:]
    assert sorted(second["renewed"]) == sorted(jobs[:3]), "the jobs it held were renewed"
    empty = claim_next(coordinator, key, "taker")
    assert empty.status_code == 200 and empty.json()["jobs"] == []


def test_claim_next_hands_out_jobs_in_turn_by_client(start_node: Any) -> None:
    node = start_node("--no-miner")
    key = node.register_miner("fair")
    b_key = node.new_key("client", "b")
    a = [node.submit(f"a{i}")["job_id"] for i in range(3)]
    b = [node.submit(f"b{i}", key=b_key)["job_id"] for i in range(2)]

    def taken(max_jobs: int) -> set[str]:
        answer = claim_next(node, key, "fair", max_jobs=max_jobs)
        assert answer.status_code == 200, answer.text
        return {j["job_id"] for j in answer.json()["jobs"]}

    # Not the oldest first (a0, a1): B's first job is as much in turn as A's.
    assert taken(2) == {a[0], b[0]}
    # Each client's running job counts towards its turns: a1 and b1 are second in turn,
    # a2 third.
    assert taken(2) == {a[1], b[1]}
    assert taken(2) == {a[2]}


def test_claim_next_renews_leases_in_place_of_heartbeats(coordinator: NodeProcess) -> None:
    """The coordinator's leases are 1 s; a miner that only calls claim-next keeps its job."""
    key = coordinator.register_miner("keeper")
    job_id = coordinator.submit("keep me")["job_id"]
    assert claim_next(coordinator, key, "keeper").json()["jobs"][0]["job_id"] == job_id
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        answer = claim_next(coordinator, key, "keeper").json()
        assert answer["renewed"] == [job_id], answer
        time.sleep(0.2)
    assert coordinator.job(job_id)["status"] == "running"
    assert coordinator.job(job_id, coordinator.admin_key)["attempts"] == 1


def test_claim_next_long_polls_until_a_job_comes(coordinator: NodeProcess) -> None:
    key = coordinator.register_miner("patient")
    answers: list[httpx.Response] = []
    waiter = threading.Thread(
        target=lambda: answers.append(claim_next(coordinator, key, "patient", max_jobs=4, wait=60))
    )
    waiter.start()
    time.sleep(1)
    assert waiter.is_alive(), "the claim waits while nothing is pending"
    job_id = coordinator.submit("wake the miner")["job_id"]
    waiter.join(timeout=120)
    assert not waiter.is_alive()
    assert answers[0].status_code == 200, answers[0].text
    assert [j["job_id"] for j in answers[0].json()["jobs"]] == [job_id]
    assert coordinator.job(job_id)["status"] == "running"
    # and one whose wait runs out answers an empty list
    r = claim_next(coordinator, key, "patient", wait=0.5)
    assert r.status_code == 200 and r.json()["jobs"] == []


def test_batch_completion_records_each_result_on_its_own(coordinator: NodeProcess) -> None:
    signer = NodeKey.generate()
    key = register_signing_miner(coordinator, "batcher", signer)
    other_key = coordinator.register_miner("bystander")
    jobs = [coordinator.submit(f"batch {i}")["job_id"] for i in range(3)]
    claimed = claim_next(coordinator, key, "batcher", max_jobs=2).json()["jobs"]
    mine = [j["job_id"] for j in claimed]
    theirs = claim_next(coordinator, other_key, "bystander").json()["jobs"][0]["job_id"]
    assert sorted([*mine, theirs]) == sorted(jobs)
    forged = signed(signer, mine[1], "an honest answer")
    forged["result"] = "another answer"
    before = coordinator.job(theirs, coordinator.admin_key)
    r = coordinator.request(
        "POST",
        "/v1/jobs/complete",
        key,
        json={
            "miner_id": "batcher",
            "results": [
                signed(signer, mine[0], "first answer"),
                forged,
                signed(signer, theirs, "not mine to give"),
                signed(signer, "job-does-not-exist", "nobody's"),
            ],
        },
    )
    assert r.status_code == 200, r.text
    outcomes = r.json()["results"]
    assert [o["job_id"] for o in outcomes] == [mine[0], mine[1], theirs, "job-does-not-exist"]
    assert outcomes[0]["job"]["status"] == "completed" and outcomes[0]["job"]["receipt_id"]
    assert [o.get("error_code") for o in outcomes[1:]] == [
        "INVALID_MINER_SIGNATURE",
        "NOT_JOB_MINER",
        "JOB_NOT_FOUND",
    ]
    assert all(o["detail"] and "job" not in o for o in outcomes[1:])
    # the refused ones changed nothing; the accepted one has a receipt that verifies
    assert coordinator.job(mine[1], coordinator.admin_key)["status"] == "running"
    assert coordinator.job(theirs, coordinator.admin_key) == before
    done = coordinator.job(mine[0])
    assert done["result"] == "first answer"
    receipt = coordinator.request("GET", f"/v1/receipts/{done['receipt_id']}").json()
    node_key = coordinator.request("GET", "/health").json()["node"]["public_key"]
    verdict = verify_receipt(receipt, node_key, expected_miner_public_key_hex=signer.public_key_hex)
    assert verdict.valid, verdict.reasons
    # a second completion of the same job is refused, item by item
    again = coordinator.request(
        "POST",
        "/v1/jobs/complete",
        key,
        json={"miner_id": "batcher", "results": [signed(signer, mine[0], "first answer")]},
    )
    assert again.json()["results"][0]["error_code"] == "JOB_ALREADY_FINISHED"


def test_claim_next_and_batch_completion_refuse_bad_requests(coordinator: NodeProcess) -> None:
    key = coordinator.register_miner("strict")
    coordinator.submit("untouched")
    for body in ({"max_jobs": 0}, {"max_jobs": 65}, {"wait": -1}, {"wait": 61}):
        assert_error(claim_next(coordinator, key, "strict", **body), 400, "INVALID_BODY")
    assert_error(claim_next(coordinator, key, "strict", k=1), 400, "UNKNOWN_FIELDS")
    assert_error(claim_next(coordinator, key, "someone-else"), 403, "MINER_ID_MISMATCH")
    assert_error(
        coordinator.request(
            "POST", "/v1/jobs/claim-next", coordinator.client_key, json={"miner_id": "strict"}
        ),
        403,
        "WRONG_ROLE",
    )
    unregistered = coordinator.new_key("miner", "stranger")
    assert_error(claim_next(coordinator, unregistered, "stranger"), 404, "MINER_NOT_REGISTERED")
    complete = "/v1/jobs/complete"
    for results in ([], [{"job_id": "job-1"}], [{"job_id": "job-1", "result": "x"}] * 65):
        r = coordinator.request(
            "POST", complete, key, json={"miner_id": "strict", "results": results}
        )
        assert r.status_code == 400, r.text
    pending = coordinator.request("GET", "/v1/stats").json()["jobs"]
    assert pending["pending"] == 1 and pending["running"] == 0, "nothing was claimed"


def test_available_offers_polling_miners_different_jobs(coordinator: NodeProcess) -> None:
    """The tutorial's available + claim: two miners polling together are offered different
    heads (no race for the same job), and each still sees every pending job."""
    keys = {name: coordinator.register_miner(name) for name in ("poll-a", "poll-b")}
    jobs = [coordinator.submit(f"offer {i}")["job_id"] for i in range(2)]
    offers = {
        name: [
            j["job_id"]
            for j in coordinator.request(
                "GET", "/v1/jobs/available", key, params={"miner_id": name}
            ).json()["jobs"]
        ]
        for name, key in keys.items()
    }
    assert offers["poll-a"] == jobs
    assert offers["poll-b"] == [jobs[1], jobs[0]]
    for name, key in keys.items():
        r = coordinator.request(
            "POST", f"/v1/jobs/{offers[name][0]}/claim", key, json={"miner_id": name}
        )
        assert r.status_code == 200, r.text


def test_claim_next_records_the_results_it_carries_before_it_waits(start_node: Any) -> None:
    """A busy miner hands in its results with its next claim-next: they are recorded (and
    seen by clients) before the long poll waits, each with its own outcome in the answer."""
    node = start_node("--no-miner", "--rate", "miner=0")
    signer = NodeKey.generate()
    key = register_signing_miner(node, "carrier", signer)
    jobs = [node.submit(f"carry {i}")["job_id"] for i in range(2)]
    held = [j["job_id"] for j in claim_next(node, key, "carrier", max_jobs=2).json()["jobs"]]
    assert sorted(held) == sorted(jobs)
    # a body that is wrong anywhere is refused whole, before anything is recorded
    bad = claim_next(node, key, "carrier", results=[{"job_id": held[0]}])
    assert_error(bad, 400, "INVALID_BODY")
    too_many = [signed(signer, held[0], "x")] * 65
    assert_error(claim_next(node, key, "carrier", results=too_many), 400, "INVALID_BODY")
    assert [node.job(j)["status"] for j in held] == ["running", "running"]

    forged = signed(signer, held[1], "an honest answer")
    forged["result"] = "another answer"
    answers: list[httpx.Response] = []
    carried = [signed(signer, held[0], "first answer"), forged]
    waiter = threading.Thread(
        target=lambda: answers.append(
            claim_next(node, key, "carrier", max_jobs=1, wait=60, results=carried)
        )
    )
    waiter.start()
    done = node.wait_for(held[0], ("completed",), timeout=60)
    assert waiter.is_alive(), "the miner still waits for work while its result is recorded"
    assert done["result"] == "first answer" and done["receipt_id"]
    assert node.job(held[1])["status"] == "running", "the forged one changed nothing"
    new = node.submit("more work")["job_id"]
    waiter.join(timeout=120)
    assert not waiter.is_alive()
    assert answers[0].status_code == 200, answers[0].text
    answer = answers[0].json()
    assert [j["job_id"] for j in answer["jobs"]] == [new]
    assert held[1] in answer["renewed"]
    outcomes = answer["results"]
    assert [o["job_id"] for o in outcomes] == held
    assert outcomes[0]["job"]["status"] == "completed"
    assert outcomes[0]["job"]["receipt_id"] == done["receipt_id"]
    assert outcomes[1]["error_code"] == "INVALID_MINER_SIGNATURE" and "job" not in outcomes[1]
    receipt = node.request("GET", f"/v1/receipts/{done['receipt_id']}").json()
    node_key = node.request("GET", "/health").json()["node"]["public_key"]
    verdict = verify_receipt(receipt, node_key, expected_miner_public_key_hex=signer.public_key_hex)
    assert verdict.valid, verdict.reasons
    # without results the answer says so; a result handed in twice is refused the second time
    plain = claim_next(node, key, "carrier").json()
    assert plain["results"] == [] and plain["jobs"] == []
    again = claim_next(node, key, "carrier", results=[signed(signer, held[0], "first answer")])
    assert again.json()["results"][0]["error_code"] == "JOB_ALREADY_FINISHED"


def test_submit_with_wait_answers_when_the_job_ends(start_node: Any) -> None:
    node = start_node("--no-miner", "--rate", "client=0")
    key = node.register_miner("finisher")
    body = {"prompt": "wait for me", "model": SMOL}
    answers: list[httpx.Response] = []
    client = threading.Thread(
        target=lambda: answers.append(
            node.request("POST", "/v1/jobs", node.client_key, json=body, params={"wait": 60})
        )
    )
    client.start()
    taken = claim_next(node, key, "finisher", wait=60).json()["jobs"]
    assert len(taken) == 1 and taken[0]["prompt"] == "wait for me"
    time.sleep(0.5)
    assert client.is_alive(), "the submit waits while the job runs"
    done = node.request(
        "POST",
        f"/v1/jobs/{taken[0]['job_id']}/complete",
        key,
        json={"miner_id": "finisher", "result": "here you are"},
    )
    assert done.status_code == 200, done.text
    client.join(timeout=120)
    assert not client.is_alive()
    assert answers[0].status_code == 201, answers[0].text
    job = answers[0].json()
    assert job["job_id"] == taken[0]["job_id"]
    assert job["status"] == "completed" and job["result"] == "here you are" and job["receipt_id"]
    # a wait that runs out answers the job as it stands; a bad wait creates nothing
    r = node.request("POST", "/v1/jobs", node.client_key, json=body, params={"wait": 0.5})
    assert r.status_code == 201 and r.json()["status"] == "pending"
    before = node.request("GET", "/v1/stats").json()["jobs"]
    for wait in ("-1", "61", "soon"):
        bad = node.request("POST", "/v1/jobs", node.client_key, json=body, params={"wait": wait})
        assert_error(bad, 400, "INVALID_WAIT")
    assert node.request("GET", "/v1/stats").json()["jobs"] == before
