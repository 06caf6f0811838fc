"""Benchmark: the node serving many jobs at once against llama.cpp's own `llama-server -np N`.

    .venv/bin/python tests/bench/batching_vs_llama_server.py [--runs 3] [--levels 1,4,8,16,16/8]
        [--threads 2] [--max-tokens 128] [--ttft-level 8] [--only node|llama-server]
        [--out results.json]

Both serve the same model file (the embedded SmolLM2, or --model PATH) with the same CPU
threads and 4096 tokens of context per sequence: the node as `aitbc-node serve --parallel N
--ctx-size 4096 --threads T`, llama-server as `-np N -c 4096*N --threads T` (it splits its
context across its N slots). llama-server is built from the llama.cpp sources vendored in the
installed llama-cpp-python, the first time only (see tests/bench/llama_server.py, which prints
where the build is cached).

1. Aggregate tokens/s at each level: R requests, all different short prompts, fired at once
   from R threads, each asking for --max-tokens (128) new tokens with `ignore_eos` (so both do
   the same work), temperature 0.7, seed i. A level `R` runs with N = R sequences at once; `R/N`
   sends R requests to a server of N slots (16/8: is 16 at once worse than queueing behind
   8?). The node gets jobs through its HTTP API (`POST /api/v1/jobs`, then a long poll until
   completed); llama-server gets `POST /v1/chat/completions` (the node applies the model's chat
   template too). Tokens/s = the sum of `usage.completion_tokens` / the wall time from the
   first submit to the last completion, as this client sees them.
2. Time to first token at --ttft-level (8): the same requests, streamed (the node's
   `GET /api/v1/jobs/{id}/stream`, from before the submit to its first `text` event;
   llama-server's chat endpoint with `stream: true`, to the first chunk with content), median
   over all jobs of all runs.

Interleaved: in each of --runs repetitions, each level runs on the node and then on
llama-server, the order swapped every other repetition; a fresh server is started for each
level and warmed up with one short request (start-up is not measured). Reported: the median
over the runs of each level, as a markdown table, and the TTFT line; --out also writes every
measurement as JSON. Each request is bounded (--request-timeout) and every server is stopped
whatever happens. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.bench.llama_server import cache_dir, ensure_llama_server, llama_cpp_version
from tests.conftest import SMOL, NodeProcess, free_port, stop_process

CTX_PER_SEQUENCE = 4096
SERVERS = ("node", "llama-server")


@dataclass
class Level:
    """R requests at once against a server with N sequences in parallel."""

    requests: int
    slots: int

    @property
    def label(self) -> str:
        return (
            str(self.requests) if self.requests == self.slots else f"{self.requests}/{self.slots}"
        )


@dataclass
class Round:
    """What one burst of requests measured."""

    tokens: int
    seconds: float
    ttft: list[float] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


def parse_levels(text: str) -> list[Level]:
    """'1,4,8,16,16/8' -> levels; 'R/N' is R requests to a server of N slots."""
    levels = []
    for part in text.split(","):
        requests, _, slots = part.strip().partition("/")
        levels.append(Level(int(requests), int(slots or requests)))
    return levels


def prompt(i: int) -> str:
    return f"Write a story about topic {i}."


def burst(count: int, one: Callable[[int], tuple[int, float | None]]) -> Round:
    """Run `one(i)` for i in 0..count-1 from `count` threads released at the same moment;
    `one` returns (completion tokens, seconds from its submit to its first text or None).
    Wall time runs from the first submit to the last completion."""
    barrier = threading.Barrier(count)
    starts: list[float] = [0.0] * count
    ends: list[float] = [0.0] * count
    results: list[tuple[int, float | None]] = [(0, None)] * count
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait()
            starts[i] = time.perf_counter()
            results[i] = one(i)
            ends[i] = time.perf_counter()
        except BaseException as exc:  # re-raised in the main thread below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return Round(
        tokens=sum(tokens for tokens, _ in results),
        seconds=max(ends) - min(starts),
        ttft=[first for _, first in results if first is not None],
    )


def sse_events(response: httpx.Response) -> Iterator[tuple[str, str]]:
    """(event name, data) of a server-sent event stream; the name is '' when not given."""
    event, data = "", []
    for line in response.iter_lines():
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())


# -- the node ----------------------------------------------------------------------------------


class NodeTarget:
    """The node through its HTTP API, with the built-in miner running N jobs at once."""

    name = "node"

    def __init__(self, node: NodeProcess, max_tokens: int, timeout: float) -> None:
        self.node = node
        self.max_tokens = max_tokens
        self.timeout = timeout
        self.http = httpx.Client(timeout=timeout, limits=httpx.Limits(max_connections=256))
        self.headers = {"X-Api-Key": node.client_key}

    def submit(self, i: int, max_tokens: int) -> str:
        body = {
            "prompt": prompt(i),
            "model": SMOL,
            "params": {
                "max_tokens": max_tokens,
                "ignore_eos": True,
                "temperature": 0.7,
                "seed": i,
            },
        }
        r = self.http.post(f"{self.node.url}/v1/jobs", json=body, headers=self.headers)
        if r.status_code != 201:
            raise RuntimeError(f"node refused the job: {r.status_code} {r.text}")
        return r.json()["job_id"]

    def wait(self, job_id: str) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            r = self.http.get(
                f"{self.node.url}/v1/jobs/{job_id}", params={"wait": "30"}, headers=self.headers
            )
            r.raise_for_status()
            job = r.json()
            if job["status"] == "completed":
                return job
            if job["status"] in ("failed", "cancelled"):
                raise RuntimeError(f"job {job_id} {job['status']}: {job}")
        raise TimeoutError(f"job {job_id} not completed in {self.timeout} s")

    def complete(self, i: int, max_tokens: int | None = None) -> tuple[int, None]:
        job = self.wait(self.submit(i, max_tokens or self.max_tokens))
        return job["usage"]["completion_tokens"], None

    def streamed(self, i: int) -> tuple[int, float]:
        started = time.perf_counter()
        job_id = self.submit(i, self.max_tokens)
        first: float | None = None
        with self.http.stream(
            "GET", f"{self.node.url}/v1/jobs/{job_id}/stream", headers=self.headers
        ) as response:
            response.raise_for_status()
            for event, data in sse_events(response):
                if event == "text" and first is None and json.loads(data).get("text"):
                    first = time.perf_counter() - started
                elif event == "job":
                    job = json.loads(data)
                    if job["status"] != "completed" or first is None:
                        raise RuntimeError(f"job {job_id} ended {job['status']}: {job}")
                    return job["usage"]["completion_tokens"], first
        raise RuntimeError(f"the stream of job {job_id} ended early")


@contextmanager
def node_server(level: Level, args: argparse.Namespace, tmp: Path) -> Iterator[NodeTarget]:
    data_dir = Path(tempfile.mkdtemp(prefix=f"node-{level.slots}-", dir=tmp))
    node = NodeProcess(
        data_dir,
        "--parallel",
        str(level.slots),
        "--threads",
        str(args.threads),
        "--ctx-size",
        str(CTX_PER_SEQUENCE),
        # A burst of submits and long polls must never meet the per-key rate limit.
        "--rate",
        "client=0",
        *(["--model", f"{SMOL}={args.model}"] if args.model else []),
    )
    try:
        node.start()
        target = NodeTarget(node, args.max_tokens, args.request_timeout)
        target.complete(10_000, max_tokens=8)  # loads the model; not measured
        yield target
    finally:
        node.stop()


# -- llama-server -------------------------------------------------------------------------------


class LlamaServerTarget:
    """llama-server's OpenAI-style chat endpoint."""

    name = "llama-server"

    def __init__(self, url: str, max_tokens: int, timeout: float) -> None:
        self.url = url
        self.max_tokens = max_tokens
        self.http = httpx.Client(timeout=timeout, limits=httpx.Limits(max_connections=256))

    def body(self, i: int, max_tokens: int, stream: bool) -> dict[str, Any]:
        return {
            "messages": [{"role": "user", "content": prompt(i)}],
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "temperature": 0.7,
            "seed": i,
            # The node reads every prompt afresh; so does llama-server then.
            "cache_prompt": False,
            "stream": stream,
            **({"stream_options": {"include_usage": True}} if stream else {}),
        }

    def complete(self, i: int, max_tokens: int | None = None) -> tuple[int, None]:
        r = self.http.post(
            f"{self.url}/v1/chat/completions",
            json=self.body(i, max_tokens or self.max_tokens, stream=False),
        )
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"], None

    def streamed(self, i: int) -> tuple[int, float]:
        started = time.perf_counter()
        first: float | None = None
        tokens = 0
        with self.http.stream(
            "POST",
            f"{self.url}/v1/chat/completions",
            json=self.body(i, self.max_tokens, stream=True),
        ) as response:
            response.raise_for_status()
            for _, data in sse_events(response):
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                choices = chunk.get("choices") or []
                if first is None and choices and (choices[0].get("delta") or {}).get("content"):
                    first = time.perf_counter() - started
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        if first is None:
            raise RuntimeError("llama-server streamed no content")
        return tokens, first


@contextmanager
def llama_server(
    level: Level, args: argparse.Namespace, tmp: Path, binary: Path, model: Path
) -> Iterator[LlamaServerTarget]:
    port = free_port()
    log_path = tmp / f"llama-server-{level.slots}-{port}.log"
    command = [
        str(binary),
        "-m",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-np",
        str(level.slots),
        "-c",
        str(CTX_PER_SEQUENCE * level.slots),
        "--threads",
        str(args.threads),
        "--threads-batch",
        str(args.threads),
    ]
    if "amx_int8" in Path("/proc/cpuinfo").read_text():
        # The node does not repack weights where llama.cpp would use AMX (it crashes there:
        # `engine.repacking_allowed`); neither does the baseline then.
        command.append("--no-repack")
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited at start:\n{log_path.read_text()}")
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"llama-server not healthy in 300 s:\n{log_path.read_text()}")
            time.sleep(0.1)
        target = LlamaServerTarget(url, args.max_tokens, args.request_timeout)
        target.complete(10_000, max_tokens=8)  # symmetrical with the node's warm-up
        yield target
    finally:
        stop_process(proc, timeout=30)


# -- the run -----------------------------------------------------------------------------------


def measure(
    server: str,
    level: Level,
    args: argparse.Namespace,
    tmp: Path,
    binary: Path | None,
    model: Path,
) -> dict[str, Any]:
    """Start `server` for `level`, run its burst (and the streamed one at --ttft-level)."""
    if server == "node":
        context = node_server(level, args, tmp)
    else:
        assert binary is not None
        context = llama_server(level, args, tmp, binary, model)
    with context as target:
        result = burst(level.requests, target.complete)
        out: dict[str, Any] = {
            "tokens": result.tokens,
            "seconds": round(result.seconds, 3),
            "tokens_per_second": round(result.tokens_per_second, 2),
        }
        expected = level.requests * args.max_tokens
        if result.tokens != expected:
            print(f"  note: {server} made {result.tokens} tokens, not {expected}", flush=True)
        if args.ttft_level and level.requests == level.slots == args.ttft_level:
            streamed = burst(level.requests, target.streamed)
            out["ttft_seconds"] = [round(s, 4) for s in streamed.ttft]
            out["streamed_tokens_per_second"] = round(streamed.tokens_per_second, 2)
    return out


def median_of(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [run[key] for run in runs if key in run]
    return statistics.median(values) if values else None


def report(
    levels: list[Level], servers: tuple[str, ...], results: dict, args: argparse.Namespace
) -> str:
    lines = [
        f"Aggregate tokens/s, {args.max_tokens} tokens per request with ignore_eos, "
        f"--threads {args.threads}, median of {args.runs} interleaved runs "
        f"(R/N: R requests at once, N sequences in parallel):",
        "",
        "| level | node tok/s | llama-server tok/s | ratio |",
        "|---|---|---|---|",
    ]
    for level in levels:
        node = median_of(results["node"].get(level.label, []), "tokens_per_second")
        ls = median_of(results["llama-server"].get(level.label, []), "tokens_per_second")
        ratio = f"{node / ls:.2f}" if node and ls else "-"
        lines.append(
            f"| {level.label} | {f'{node:.1f}' if node else '-'} | "
            f"{f'{ls:.1f}' if ls else '-'} | {ratio} |"
        )
    if args.ttft_level:
        parts = []
        for server in servers:
            ttft = [
                s
                for run in results[server].get(str(args.ttft_level), [])
                for s in run.get("ttft_seconds", [])
            ]
            if ttft:
                parts.append(f"{server} {statistics.median(ttft) * 1000:.0f} ms")
        if parts:
            lines += [
                "",
                f"Time to first token at {args.ttft_level} concurrent (median over all jobs and "
                f"runs, submit to first text): " + ", ".join(parts),
            ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="interleaved repetitions (3)")
    parser.add_argument(
        "--levels", default="1,4,8,16,16/8", help="R or R/N, comma-separated (1,4,8,16,16/8)"
    )
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for both (2)")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens per request (128)")
    parser.add_argument(
        "--ttft-level", type=int, default=8, help="level to time the first token at; 0: none"
    )
    parser.add_argument("--only", choices=SERVERS, help="measure one side only")
    parser.add_argument("--model", type=Path, help="a GGUF file (default: the embedded model)")
    parser.add_argument(
        "--request-timeout", type=float, default=600, help="seconds one request may take (600)"
    )
    parser.add_argument("--jobs", type=int, default=2, help="compile jobs for llama-server (2)")
    parser.add_argument("--out", type=Path, help="write every measurement here as JSON")
    args = parser.parse_args()

    from aitbc_node.models import embedded_model

    levels = parse_levels(args.levels)
    servers = (args.only,) if args.only else SERVERS
    model = args.model.resolve() if args.model else embedded_model().path
    binary = ensure_llama_server(args.jobs) if "llama-server" in servers else None
    if binary is not None:
        print(f"llama-server: {binary}", flush=True)
    results: dict[str, dict[str, list[dict[str, Any]]]] = {s: {} for s in SERVERS}
    with tempfile.TemporaryDirectory(prefix="bench-batching-") as tmp_name:
        tmp = Path(tmp_name)
        for run in range(args.runs):
            order = servers if run % 2 == 0 else tuple(reversed(servers))
            for level in levels:
                for server in order:
                    out = measure(server, level, args, tmp, binary, model)
                    results[server].setdefault(level.label, []).append(out)
                    print(
                        f"run {run + 1} level {level.label} {server}: "
                        f"{out['tokens_per_second']:.1f} tok/s"
                        + (
                            f", TTFT median {statistics.median(out['ttft_seconds']) * 1000:.0f} ms"
                            if out.get("ttft_seconds")
                            else ""
                        ),
                        flush=True,
                    )
    table = report(levels, servers, results, args)
    print()
    print(table)
    if args.out:
        version = llama_cpp_version()
        payload = {
            "config": {
                "runs": args.runs,
                "levels": [level.label for level in levels],
                "threads": args.threads,
                "max_tokens": args.max_tokens,
                "ctx_per_sequence": CTX_PER_SEQUENCE,
                "ttft_level": args.ttft_level,
                "model": str(model),
                "llama_cpp_python": version,
                "llama_server": str(binary) if binary else None,
                "llama_server_cache": str(cache_dir(version)),
                "cpu_count": os.cpu_count(),
                "machine": platform.platform(),
            },
            "results": results,
            "table": table,
        }
        args.out.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
