"""Group commit under SIGKILL: nothing acknowledged is lost.

Many clients submit and miners complete in batches at once, so the store's writes share
commits; the node is killed (SIGKILL) in the middle of that, several times. After each restart
every job whose submit was answered 201 exists, and every job whose completion was answered
is completed with its receipt: an answer is only sent after its group's commit.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from aitbc_node.signing import NodeKey
from tests.conftest import SMOL
from tests.test_claim_next import register_signing_miner, signed

UNLIMITED = ("--rate", "client=0", "--rate", "miner=0", "--rate", "admin=0")
SUBMITTERS = 8
MINERS = 2
KILLS = 3
# Answered submits and completions each round waits for before its kill (cumulative).
JOBS_PER_ROUND = 40
COMPLETIONS_PER_ROUND = 20


def test_sigkill_mid_group_loses_no_acknowledged_job_or_completion(
    start_node: Any, tmp_path: Path
) -> None:
    data_dir = tmp_path / "crash"
    node = start_node("--no-miner", *UNLIMITED, data_dir=data_dir)
    signers = {f"crash-miner-{i}": NodeKey.generate() for i in range(MINERS)}
    miner_keys = {
        name: register_signing_miner(node, name, signer) for name, signer in signers.items()
    }
    client_key = node.client_key
    acknowledged_jobs: set[str] = set()
    acknowledged_completions: set[str] = set()
    lock = threading.Lock()

    for kill in range(KILLS):
        url = node.url
        stop = threading.Event()

        def submit(worker: int, url: str = url, stop: threading.Event = stop) -> None:
            with httpx.Client(timeout=30, headers={"X-Api-Key": client_key}) as http:
                n = 0
                while not stop.is_set():
                    n += 1
                    body = {"prompt": f"w{worker} n{n}", "model": SMOL, "params": {"max_tokens": 4}}
                    try:
                        r = http.post(f"{url}/v1/jobs", json=body)
                    except httpx.HTTPError:
                        return  # the node is gone
                    if r.status_code == 201:
                        with lock:
                            acknowledged_jobs.add(r.json()["job_id"])

        def mine(name: str, url: str = url, stop: threading.Event = stop) -> None:
            signer = signers[name]
            with httpx.Client(timeout=30, headers={"X-Api-Key": miner_keys[name]}) as http:
                while not stop.is_set():
                    try:
                        taken = http.post(
                            f"{url}/v1/jobs/claim-next",
                            json={"miner_id": name, "max_jobs": 8, "wait": 1},
                        ).json()["jobs"]
                        if not taken:
                            continue
                        results = [
                            signed(signer, j["job_id"], f"done {j['job_id']}") for j in taken
                        ]
                        r = http.post(
                            f"{url}/v1/jobs/complete", json={"miner_id": name, "results": results}
                        )
                    except (httpx.HTTPError, ValueError):
                        return  # the node is gone (or cut an answer short)
                    if r.status_code == 200:
                        with lock:
                            acknowledged_completions.update(
                                o["job_id"] for o in r.json()["results"] if "job" in o
                            )

        threads = [threading.Thread(target=submit, args=(w,)) for w in range(SUBMITTERS)]
        threads += [threading.Thread(target=mine, args=(name,)) for name in signers]
        for t in threads:
            t.start()
        # Kill once writes are flowing: a moment after this round's first submits and completions
        # are answered. Waiting for counts (not for a time) keeps the final tally independent of
        # the machine's speed.
        deadline = time.monotonic() + 300
        while (
            len(acknowledged_jobs) < JOBS_PER_ROUND * (kill + 1)
            or len(acknowledged_completions) < COMPLETIONS_PER_ROUND * (kill + 1)
        ) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(random.uniform(0.1, 0.5))
        node.kill()
        stop.set()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads)
        node = start_node("--no-miner", *UNLIMITED, data_dir=data_dir)

        lost = []
        for job_id in sorted(acknowledged_jobs):
            r = node.request("GET", f"/v1/jobs/{job_id}", node.admin_key)
            if r.status_code != 200:
                lost.append(job_id)
        assert not lost, f"{len(lost)} acknowledged submits lost after kill {kill + 1}"
        unfinished = []
        for job_id in sorted(acknowledged_completions):
            job = node.job(job_id, node.admin_key)
            if job["status"] != "completed" or not job["receipt_id"]:
                unfinished.append((job_id, job["status"]))
        assert not unfinished, f"acknowledged completions lost after kill {kill + 1}"

    assert len(acknowledged_jobs) >= JOBS_PER_ROUND * KILLS
    assert len(acknowledged_completions) >= COMPLETIONS_PER_ROUND * KILLS
    verdict = node.request("GET", "/v1/stats").json()
    assert verdict["jobs"]["total"] >= len(acknowledged_jobs)
