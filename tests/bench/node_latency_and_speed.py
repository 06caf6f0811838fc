"""Benchmark: how fast the built-in miner picks a job up, and its tokens/s against llama.cpp.

    .venv/bin/python tests/bench/node_latency_and_speed.py [--jobs 200] [--runs 3]

1. Pickup latency: with the built-in miner idle, the time from `POST /api/v1/jobs` returning
   to the job being `running`, over --jobs jobs (one at a time, max_tokens=1). Measured two
   ways: by the client, polling the job as fast as it can, and by the node's own clock
   (started_at - created_at, millisecond resolution, which includes the POST's own return).
2. Generation speed: one 256-token job through the node (completion_tokens over
   started_at..completed_at) against the same prompt and params run directly with
   llama-cpp-python's `create_chat_completion` in this process, alternating, --runs times each;
   medians and their ratio are reported.

It starts its own node on a free port with a temporary data directory. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.conftest import SMOL, NodeProcess

PROMPT = "Count from 1 to 500, one number per line."
PARAMS = {"max_tokens": 256, "temperature": 0, "top_p": 0.95, "seed": 42}


def ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def pickup_latency(node: NodeProcess, jobs: int) -> tuple[list[float], list[float]]:
    client_ms, server_ms = [], []
    for i in range(jobs):
        r = node.request(
            "POST",
            "/v1/jobs",
            node.client_key,
            json={"prompt": f"Say {i}.", "model": SMOL, "params": {"max_tokens": 1}},
        )
        returned = time.perf_counter()
        job_id = r.json()["job_id"]
        while True:
            job = node.job(job_id)
            if job["status"] != "pending":
                client_ms.append((time.perf_counter() - returned) * 1000)
                break
        job = node.wait_for(job_id, ("completed",))
        server_ms.append((ts(job["started_at"]) - ts(job["created_at"])) * 1000)
    return client_ms, server_ms


def node_speed(node: NodeProcess) -> tuple[float, int]:
    job = node.submit(PROMPT, params=PARAMS)
    # Long-polled: the node's own timestamps time the job, and a busy poll would take CPU
    # from the generation it measures.
    job = node.wait_for(job["job_id"], ("completed",), timeout=120)
    seconds = ts(job["completed_at"]) - ts(job["started_at"])
    tokens = job["usage"]["completion_tokens"]
    return tokens / seconds, tokens


def direct_speed(llm) -> tuple[float, int]:
    started = time.perf_counter()
    out = llm.create_chat_completion(
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=PARAMS["max_tokens"],
        temperature=PARAMS["temperature"],
        top_p=PARAMS["top_p"],
        seed=PARAMS["seed"],
    )
    seconds = time.perf_counter() - started
    tokens = out["usage"]["completion_tokens"]
    return tokens / seconds, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--durability", default="full", choices=["full", "normal"])
    args = parser.parse_args()

    import llama_cpp

    from aitbc_node.models import embedded_model

    with tempfile.TemporaryDirectory() as tmp:
        # No rate limit: the pickup measurement polls as fast as it can.
        node = NodeProcess(
            Path(tmp) / "data", "--rate", "client=0", "--durability", args.durability
        ).start()
        try:
            node.wait_for(
                node.submit("warm up", params={"max_tokens": 4})["job_id"], ("completed",)
            )
            client_ms, server_ms = pickup_latency(node, args.jobs)
            threads = os.cpu_count() or 1
            llm = llama_cpp.Llama(
                model_path=str(embedded_model().path),
                n_ctx=4096,
                n_threads=threads,
                n_threads_batch=threads,
                verbose=False,
            )
            direct_speed(llm)  # warm-up
            node_runs, direct_runs = [], []
            for _ in range(args.runs):
                node_runs.append(node_speed(node))
                direct_runs.append(direct_speed(llm))
        finally:
            node.stop()

    print(
        f"pickup latency over {args.jobs} jobs (POST returned -> running), built-in miner idle,"
        f" --durability {args.durability}"
    )
    print(
        f"  client-observed: p50 {statistics.median(client_ms):.2f} ms, "
        f"p99 {percentile(client_ms, 99):.2f} ms, max {max(client_ms):.2f} ms"
    )
    print(
        f"  node clock (started_at - created_at, 1 ms resolution): "
        f"p50 {statistics.median(server_ms):.0f} ms, p99 {percentile(server_ms, 99):.0f} ms"
    )
    node_tps = statistics.median(r[0] for r in node_runs)
    direct_tps = statistics.median(r[0] for r in direct_runs)
    print(f"generation speed, {PARAMS['max_tokens']}-token job, median of {args.runs} runs")
    print(f"  llama-cpp-python direct: {direct_tps:.1f} tokens/s ({direct_runs[0][1]} tokens)")
    print(f"  through the node:        {node_tps:.1f} tokens/s ({node_runs[0][1]} tokens)")
    print(f"  ratio node/direct:       {node_tps / direct_tps:.3f}")


if __name__ == "__main__":
    main()
