"""Benchmark: the coordinator at wire speed, against a bare Litestar POST handler.

    .venv/bin/python tests/bench/coordinator_throughput.py [--runs 3] [--miners 1,4,16]
        [--clients 32] [--seconds 10] [--warmup 2] [--slots 4] [--protocol next|split|tutorial]
        [--pick oldest|random] [--baseline-http httptools|h11] [--in-process]
        [--node-arg=--durability=normal ...] [--out results.json]
    .venv/bin/python tests/bench/coordinator_throughput.py --growth 1000,10000,100000
        [--growth-fill api|direct] [--growth-verify] [--growth-miners 1] [--reads 100]
        [--out growth.json]

Throughput (the default mode): the node runs as a real process, `aitbc-node serve --no-miner`
with every rate limit off, on a copy of one prepared data directory (miner keys made once with
`aitbc-node keys create --role miner`), a fresh copy for every measurement. This one process
then drives it over HTTP:

- N synthetic remote miners (--miners, 1, 4 and 16) speaking the node's own protocol:
  register with the embedded model's name and an Ed25519 public key, then loop: `POST
  /v1/jobs/claim-next` for up to --slots jobs (long-polled, `wait` 30), carrying the results
  of the jobs the previous one handed out (each with a fixed short result, its usage and the
  miner's co-signature over the result's SHA-256), so a busy miner spends one request a round.
  No model runs. `--protocol split` has them hand in the results in a `POST /v1/jobs/complete`
  of their own, after each claim-next; `--protocol
  tutorial` has them take work the tutorial's way: `GET /v1/jobs/available?wait=30&limit=10`,
  claim (`POST /v1/jobs/{id}/claim`, a 409 is a lost race and is counted) up to --slots jobs
  of the offer, in the offer's order (`--pick random`: shuffled), then `POST
  /v1/jobs/{id}/complete` each.
- --clients (32) clients, each in a loop: submit a tiny job (max_tokens 4) and wait until it
  is completed: `POST /v1/jobs?wait=30` (--protocol next), or `POST /v1/jobs` then long polls
  of `GET /v1/jobs/{id}?wait=30` (split, tutorial).

After --warmup seconds, a window of --seconds is measured: full jobs/s (jobs whose long poll
answered `completed` with a `receipt_id` inside the window), p50 and p99 of submit → completed
as the client sees it, the node's CPU (utime + stime from /proc/PID/stat, all its threads)
over the window divided by the jobs completed in it, the requests the load generator sent in
it per job completed in it, and the claims answered 409 in it. Then the clients stop
submitting, every job in flight is waited for, and the whole run (warm-up and drain included)
is checked: every submitted job completed exactly once, by exactly one miner (completions
counted per job id on the miner side; a job the client did not see completed, or saw
completed by another miner than the one whose completion was accepted, is lost; one with two
accepted completions is doubled). A miner parked in a long poll that carries results when the
run stops is cancelled there and credited with them: the node records them before it waits.

The baseline is a bare Litestar app with one POST handler returning a small JSON, served by
uvicorn (httptools on uvloop, as the node; --baseline-http) in its own process (this file with
--serve-baseline), under the same load generator: --clients clients POSTing in a loop, req/s,
p50, p99 and server CPU per request over the same window.

--in-process adds a third kind of measurement: the same lifecycle without HTTP, in a process
of its own on a fresh copy of the template, through the node's own code (`Jobs.submit`,
`claim_as`, `finish` with the miner's co-signature, each its own `Store.run`, so they form the
writer thread's groups as requests' writes do), --clients coroutines at once: jobs/s and the
process's CPU per job. No HTTP, no long polls, no views in answers: the floor under the
node's figures, telling the node's own work from what serving it over HTTP adds.

Interleaved: in each of --runs repetitions the baseline and each miner count run once, the
order rotated by one every repetition. Reported: every run as it ends, then the medians over
the runs (with the range when there are several) as a markdown table with the issue's columns;
--out also writes every measurement as JSON. The load generator is one asyncio process with
its own minimal keep-alive HTTP/1.1 client (one connection per client and miner), much cheaper
per request than httpx (`--client httpx` uses httpx instead); its CPU share is printed, since it
shares the cores with the server.

Growth (--growth 1000,10000,100000, off by default; runs instead of the throughput mode): one
node is filled through the API by the same clients and --growth-miners synthetic miners up to
each size of completed jobs in turn (at the node's full-lifecycle speed: 100,000 jobs at 100
jobs/s take 17 minutes), the block sealer is let catch up, then `GET /api/v1/stats`,
`GET /api/explorer/stats` and `GET /api/v1/jobs?limit=10` are each timed --reads (100) times,
alternating, one at a time: p50 and p99 per size, and the database's size on disk (with its
WAL, which dominates at small sizes). `--growth-fill direct` fills instead with the node
stopped, in this process, through the node's own code (`Jobs.submit`, `claim_as`, `finish`
with the miner's co-signature, so each job gets its signed receipt and payment; a block
sealed every 200 jobs, as the sealer does at 100 jobs/s) on a store without fsyncs: the same
rows at in-process speed. Then a node is started on it for the reads. `--growth-verify` also
times `aitbc-node verify --data-dir` at each size, from genesis and with `--since TIP-10`
(each a fresh process, its start-up included).

Every server is stopped whatever happens; errors the load generator saw (status codes other
than expected, dropped connections) and ERROR lines in the node's log are counted and printed.
Not collected by pytest.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlencode

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from aitbc_node.receipts import hash_result
from aitbc_node.signing import NodeKey
from tests.conftest import ROOT, SMOL, NodeProcess, free_port, stop_process

HOST = "127.0.0.1"
RESULT = "ok"  # what every synthetic miner "generates"
USAGE = {"prompt_tokens": 8, "completion_tokens": 1}
MODEL_SHA256 = "0" * 64  # the synthetic miners run no model file
JOB_PARAMS = {"max_tokens": 4, "temperature": 0}
MINER_WAIT = 30  # seconds a miner's `available` long poll waits, as `aitbc-node miner`'s
JOB_WAIT = 30  # seconds a client's job long poll waits
OFFER_LIMIT = 10  # jobs a miner asks to be offered, as `aitbc-node miner` does when idle
UNLIMITED = ("--rate", "client=0", "--rate", "miner=0", "--rate", "public=0", "--rate", "admin=0")
BASELINE_BODY = {"prompt": "ping", "params": {"max_tokens": 4}}
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
TRANSPORT_ERRORS = (OSError, EOFError, asyncio.IncompleteReadError, TimeoutError, httpx.HTTPError)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) the process `pid` has used so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # After the command name in parentheses come fields 3...; utime and stime are 14 and 15.
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def percentile(values: list[float], p: float) -> float:
    """The `p`th percentile of `values` (nearest rank)."""
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


# -- HTTP ----------------------------------------------------------------------------------------


class Http(Protocol):
    """One client's connection: `request` returns (status, body bytes); `sent` counts them."""

    sent: int

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        params: dict[str, Any] | None = None,
        timeout: float = 120,
    ) -> tuple[int, bytes]: ...

    async def close(self) -> None: ...


class RawHttp:
    """A minimal keep-alive HTTP/1.1 client on one connection (asyncio streams).

    It knows what the node and the baseline answer: a status line, headers and a body of
    Content-Length bytes. A request on a reused connection that the server had closed (its
    keep-alive ran out) is sent again on a new one, once, only when no byte of an answer came:
    the server never read it.
    """

    def __init__(self, port: int, headers: dict[str, str]) -> None:
        self.port = port
        self.head = f"Host: {HOST}:{port}\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in headers.items()
        )
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.sent = 0

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        params: dict[str, Any] | None = None,
        timeout: float = 120,
    ) -> tuple[int, bytes]:
        self.sent += 1
        if params:
            path += "?" + urlencode(params)
        payload = b"" if body is None else json.dumps(body).encode()
        head = f"{method} {path} HTTP/1.1\r\n{self.head}"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
        message = (head + "\r\n").encode() + payload
        try:
            return await asyncio.wait_for(self._exchange(message), timeout)
        except BaseException:
            await self.close()  # a half-read answer would poison the next one
            raise

    async def _exchange(self, message: bytes) -> tuple[int, bytes]:
        for _ in range(2):
            fresh = self.writer is None
            if fresh:
                self.reader, self.writer = await asyncio.open_connection(HOST, self.port)
            assert self.reader is not None and self.writer is not None
            self.writer.write(message)
            status_line = await self.reader.readline()
            if status_line:
                return await self._answer(status_line)
            await self.close()
            if fresh:
                break
        raise EOFError("the server closed the connection without an answer")

    async def _answer(self, status_line: bytes) -> tuple[int, bytes]:
        assert self.reader is not None
        status = int(status_line.split(None, 2)[1])
        length, close = 0, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and value == "close":
                close = True
            elif name == "transfer-encoding":
                raise ValueError(f"unexpected transfer-encoding {value}")
        data = await self.reader.readexactly(length)
        if close:
            await self.close()
        return status, data

    async def close(self) -> None:
        writer, self.reader, self.writer = self.writer, None, None
        if writer is not None:
            writer.close()


class HttpxHttp:
    """The same, through httpx (a cross-check of RawHttp, and of the load generator's cost)."""

    def __init__(self, port: int, headers: dict[str, str]) -> None:
        self.client = httpx.AsyncClient(base_url=f"http://{HOST}:{port}", headers=headers)
        self.sent = 0

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        params: dict[str, Any] | None = None,
        timeout: float = 120,
    ) -> tuple[int, bytes]:
        self.sent += 1
        r = await self.client.request(method, path, json=body, params=params, timeout=timeout)
        return r.status_code, r.content

    async def close(self) -> None:
        await self.client.aclose()


def connect(args: argparse.Namespace, port: int, key: str | None = None) -> Http:
    """A connection of the chosen client (--client) to the server on `port`, sending `key`."""
    headers = {"X-Api-Key": key} if key else {}
    return (HttpxHttp if args.client == "httpx" else RawHttp)(port, headers)


# -- what a run saw ------------------------------------------------------------------------------


@dataclass
class Window:
    """The measured interval (perf_counter seconds); events outside it are not counted."""

    start: float = float("inf")
    end: float = float("inf")

    def holds(self, t: float) -> bool:
        return self.start <= t < self.end


@dataclass
class Tally:
    """What the clients and miners of one run saw."""

    window: Window = field(default_factory=Window)
    latencies: list[float] = field(default_factory=list)  # seconds, completed in the window
    conflicts: int = 0  # claims answered 409 in the window
    conflicts_total: int = 0
    submitted: list[str] = field(default_factory=list)
    seen: dict[str, dict[str, Any]] = field(default_factory=dict)  # job id -> final view
    completions: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    errors: Counter[str] = field(default_factory=Counter)

    def done(self, started: float, job: dict[str, Any] | None = None) -> None:
        now = time.perf_counter()
        if job is not None:
            self.seen[job["job_id"]] = job
        if self.window.holds(now):
            self.latencies.append(now - started)

    def conflict(self) -> None:
        self.conflicts_total += 1
        if self.window.holds(time.perf_counter()):
            self.conflicts += 1

    def error(self, what: str, status: int | None = None, data: bytes = b"") -> None:
        code = ""
        if data:
            try:
                code = " " + str(json.loads(data).get("error_code"))
            except (ValueError, AttributeError):
                code = ""
        self.errors[f"{what} {status if status is not None else 'transport error'}{code}"] += 1

    def check(self) -> dict[str, Any]:
        """Every submitted job completed exactly once, by exactly one miner."""
        lost, doubled, unknown = [], [], []
        for job_id in self.submitted:
            by = self.completions.get(job_id, [])
            job = self.seen.get(job_id)
            if len(by) > 1:
                doubled.append(job_id)
            elif (
                not by
                or job is None
                or job["status"] != "completed"
                or not job.get("receipt_id")
                or job.get("miner_id") != by[0]
            ):
                lost.append(job_id)
        known = set(self.submitted)
        unknown = [j for j in self.completions if j not in known]
        return {
            "submitted": len(self.submitted),
            "lost": len(lost),
            "doubled": len(doubled),
            "completed_unsubmitted": len(unknown),
            "examples": (lost + doubled + unknown)[:5],
        }


# -- the actors ----------------------------------------------------------------------------------


@dataclass
class Miner:
    """A synthetic remote miner: its name, API key and Ed25519 key."""

    name: str
    api_key: str
    key: NodeKey = field(default_factory=NodeKey.generate)
    polling: bool = False  # parked in its long poll for work (safe to cancel there)
    # The results the long poll it is parked in carries (--protocol next): the node records
    # them before it waits, so a miner cancelled there is credited with them.
    carried: list[str] = field(default_factory=list)

    def completion(self) -> dict[str, Any]:
        """The body of every completion (the result is fixed, so is its signature)."""
        return {
            "miner_id": self.name,
            "result": RESULT,
            "usage": USAGE,
            "model_sha256": MODEL_SHA256,
            "miner_signature": {
                "alg": "ed25519",
                "public_key": self.key.public_key_hex,
                "value": self.key.sign(hash_result(RESULT).encode("ascii")),
            },
        }


async def register(http: Http, miner: Miner) -> None:
    """Register `miner` for the embedded model's name, with its public key."""
    body = {
        "miner_id": miner.name,
        "capabilities": [SMOL],
        "gpu_info": {"name": "synthetic"},
        "public_key": miner.key.public_key_hex,
    }
    status, data = await http.request("POST", "/api/v1/miners/register", body)
    if status != 200:
        raise RuntimeError(f"registering {miner.name}: {status} {data[:300]!r}")


async def ask_for_work(
    http: Http, miner: Miner, tally: Tally, method: str, path: str, query: dict[str, Any]
) -> dict[str, Any] | None:
    """One long poll for work (`available` offers or `claim-next` jobs): its answer, or None
    after an error (counted, and a short pause)."""
    what = f"{method} {path.rsplit('/', 1)[-1]}"
    miner.polling = True
    miner.carried = [result["job_id"] for result in query.get("results", ())]
    try:
        status, data = await http.request(
            method,
            path,
            query if method == "POST" else None,
            params=query if method == "GET" else None,
            timeout=MINER_WAIT + 60,
        )
    except TRANSPORT_ERRORS:
        tally.error(what)
        await asyncio.sleep(0.1)
        return None
    finally:
        miner.polling = False
    if status != 200:
        tally.error(what, status, data)
        await asyncio.sleep(0.1)
        return None
    return json.loads(data)


def count_outcomes(tally: Tally, miner: Miner, outcomes: list[dict[str, Any]]) -> None:
    """Note the completions a batch's answer says were accepted (the others are errors)."""
    for outcome in outcomes:
        if "job" in outcome:
            tally.completions[outcome["job_id"]].append(miner.name)
        else:
            tally.error("completion refused: " + outcome["error_code"])


async def mine(
    http: Http, miner: Miner, tally: Tally, stop: asyncio.Event, args: argparse.Namespace
) -> None:
    """The miner loop: wait for an offer, claim up to --slots of it, complete what it got."""
    completion = miner.completion()
    claim = {"miner_id": miner.name}
    poll = {"miner_id": miner.name, "wait": MINER_WAIT, "limit": OFFER_LIMIT}
    while not stop.is_set():
        answer = await ask_for_work(http, miner, tally, "GET", "/api/v1/jobs/available", poll)
        if answer is None:
            continue
        offered = [job["job_id"] for job in answer["jobs"]]
        if args.pick == "random":
            random.shuffle(offered)
        claimed = []
        for job_id in offered:
            if len(claimed) == args.slots:
                break
            try:
                status, data = await http.request("POST", f"/api/v1/jobs/{job_id}/claim", claim)
            except TRANSPORT_ERRORS:
                tally.error("POST claim")
                continue
            if status == 200:
                claimed.append(job_id)
            elif status == 409:
                tally.conflict()
            else:
                tally.error("POST claim", status, data)
        for job_id in claimed:
            try:
                status, data = await http.request(
                    "POST", f"/api/v1/jobs/{job_id}/complete", completion
                )
            except TRANSPORT_ERRORS:
                tally.error("POST complete")
                continue
            if status == 200:
                tally.completions[job_id].append(miner.name)
            else:
                tally.error("POST complete", status, data)


async def mine_next(
    http: Http, miner: Miner, tally: Tally, stop: asyncio.Event, args: argparse.Namespace
) -> None:
    """The miner loop on the node's own way: `claim-next` up to --slots jobs (long-polled),
    then complete them. --protocol next: the results go with the next claim-next (one
    request a round); --protocol split: in a `POST /v1/jobs/complete` of their own."""
    completion = miner.completion()
    del completion["miner_id"]
    take = {"miner_id": miner.name, "max_jobs": args.slots, "wait": MINER_WAIT}
    results: list[dict[str, Any]] = []
    while not stop.is_set() or results:
        # Stopping, the last results go without a wait: nothing is left to take.
        ask = {**take, "results": results, "wait": 0 if stop.is_set() else MINER_WAIT}
        answer = await ask_for_work(http, miner, tally, "POST", "/api/v1/jobs/claim-next", ask)
        results = []
        if answer is None:
            continue
        count_outcomes(tally, miner, answer["results"])
        results = [{"job_id": job["job_id"], **completion} for job in answer["jobs"]]
        if args.protocol == "next" or not results:
            continue
        batch = {"miner_id": miner.name, "results": results}
        results = []
        try:
            status, data = await http.request("POST", "/api/v1/jobs/complete", batch)
        except TRANSPORT_ERRORS:
            tally.error("POST complete")
            continue
        if status != 200:
            tally.error("POST complete", status, data)
            continue
        count_outcomes(tally, miner, json.loads(data)["results"])


class Quota:
    """How many more jobs the clients may submit (None: until told to stop)."""

    def __init__(self, jobs: int | None) -> None:
        self.left = jobs

    def take(self) -> bool:
        if self.left is None:
            return True
        if self.left <= 0:
            return False
        self.left -= 1
        return True


async def submit_and_wait(
    http: Http, n: int, tally: Tally, stop: asyncio.Event, quota: Quota, wait_in_submit: bool
) -> None:
    """A client: submit a tiny job, long-poll it until it ends, again, until stopped. With
    `wait_in_submit` the submit itself waits (`POST /v1/jobs?wait=`), so a job that ends in
    time takes one request."""
    submit = {"wait": JOB_WAIT} if wait_in_submit else None
    while not stop.is_set() and quota.take():
        started = time.perf_counter()
        body = {"prompt": f"ping {n}", "model": SMOL, "params": JOB_PARAMS}
        try:
            status, data = await http.request(
                "POST", "/api/v1/jobs", body, params=submit, timeout=JOB_WAIT + 60
            )
        except TRANSPORT_ERRORS:
            tally.error("POST jobs")
            await asyncio.sleep(0.1)
            continue
        if status != 201:
            tally.error("POST jobs", status, data)
            await asyncio.sleep(0.1)
            continue
        job = json.loads(data)
        tally.submitted.append(job["job_id"])
        # Never given up while the run drains: the check counts what never ended as lost.
        while job["status"] not in ("completed", "failed", "cancelled"):
            try:
                status, data = await http.request(
                    "GET",
                    f"/api/v1/jobs/{job['job_id']}",
                    params={"wait": JOB_WAIT},
                    timeout=JOB_WAIT + 60,
                )
            except TRANSPORT_ERRORS:
                tally.error("GET job")
                await asyncio.sleep(0.1)
                continue
            if status != 200:
                tally.error("GET job", status, data)
                await asyncio.sleep(0.1)
                continue
            job = json.loads(data)
        if job["status"] == "completed" and job.get("receipt_id"):
            tally.done(started, job)
        else:
            tally.seen[job["job_id"]] = job
            tally.error(f"job ended {job['status']}")


async def post_loop(http: Http, tally: Tally, stop: asyncio.Event) -> None:
    """A baseline client: POST a small JSON body in a loop."""
    while not stop.is_set():
        started = time.perf_counter()
        try:
            status, data = await http.request("POST", "/bench", BASELINE_BODY)
        except TRANSPORT_ERRORS:
            tally.error("POST bench")
            await asyncio.sleep(0.1)
            continue
        if status == 200:
            tally.done(started)
        else:
            tally.error("POST bench", status, data)


async def measure_window(
    pid: int, tally: Tally, warmup: float, seconds: float, connections: list[Http]
) -> dict[str, float]:
    """Sleep through the warm-up, then open the window for `seconds`, reading the server's
    and this process's CPU time, and the requests `connections` sent, at both ends."""

    def sent() -> int:
        return sum(http.sent for http in connections)

    await asyncio.sleep(warmup)
    server0, own0, sent0 = cpu_seconds(pid), time.process_time(), sent()
    tally.window.start = time.perf_counter()
    await asyncio.sleep(seconds)
    tally.window.end = time.perf_counter()
    server1, own1, sent1 = cpu_seconds(pid), time.process_time(), sent()
    return {
        "wall_s": tally.window.end - tally.window.start,
        "server_cpu_s": server1 - server0,
        "loadgen_cpu_s": own1 - own0,
        "requests": sent1 - sent0,
    }


async def stop_miners(
    tasks: list[asyncio.Task], miners: list[Miner], tally: Tally, stop: asyncio.Event
) -> None:
    """Stop the miners: those parked in a long poll are cancelled there (credited with the
    results it carries, which the node recorded before it waited); the others finish the
    claims and completions in hand first (cancelling those could lose a completion the node
    accepted from the count)."""
    stop.set()
    for task, miner in zip(tasks, miners, strict=True):
        if miner.polling:
            task.cancel()
            for job_id in miner.carried:
                tally.completions[job_id].append(miner.name)
    await asyncio.gather(*tasks, return_exceptions=True)


async def fill_progress(
    tally: Tally, quota: Quota, jobs: int, clients: list[asyncio.Task], stall: float
) -> None:
    """Wait until the clients have submitted their `jobs`, saying how far they are every 30 s;
    a fill takes as long as it takes, and is given up only when nothing completes for
    `stall` seconds."""
    done, moved, said = -1, time.monotonic(), time.monotonic()
    while quota.left and not all(task.done() for task in clients):
        await asyncio.sleep(1)
        now = time.monotonic()
        if len(tally.latencies) != done:
            done, moved = len(tally.latencies), now
        elif now - moved > stall:
            tally.errors[f"no job completed in {stall:g} s"] += 1
            return
        if now - said >= 30:
            print(f"  {done:,} of {jobs:,} jobs", flush=True)
            said = now


async def lifecycle_load(
    port: int,
    pid: int,
    client_key: str,
    miners: list[Miner],
    args: argparse.Namespace,
    *,
    jobs: int | None = None,
) -> tuple[Tally, dict[str, float]]:
    """Run the miners and clients against the node: for the warm-up and a measured window,
    or (`jobs`) until that many jobs were submitted, counting all; then drain."""
    tally = Tally()
    connections: list[Http] = []
    try:
        miner_http = []
        for miner in miners:
            http = connect(args, port, miner.api_key)
            connections.append(http)
            miner_http.append(http)
            await register(http, miner)
        stop_miners_event, stop_clients = asyncio.Event(), asyncio.Event()
        miner_tasks = [
            asyncio.create_task(
                (mine if args.protocol == "tutorial" else mine_next)(
                    http, miner, tally, stop_miners_event, args
                )
            )
            for http, miner in zip(miner_http, miners, strict=True)
        ]
        quota = Quota(jobs)
        client_tasks = []
        for n in range(args.clients):
            http = connect(args, port, client_key)
            connections.append(http)
            client_tasks.append(
                asyncio.create_task(
                    submit_and_wait(
                        http, n, tally, stop_clients, quota, wait_in_submit=args.protocol == "next"
                    )
                )
            )
        cpu: dict[str, float] = {}
        if jobs is None:
            cpu = await measure_window(pid, tally, args.warmup, args.seconds, connections)
            stop_clients.set()
        else:
            tally.window = Window(0.0, float("inf"))
            await fill_progress(tally, quota, jobs, client_tasks, args.drain_timeout)
        try:
            await asyncio.wait_for(asyncio.gather(*client_tasks), args.drain_timeout)
        except TimeoutError:
            tally.errors["clients still waiting at the drain timeout"] += 1
            for task in client_tasks:
                task.cancel()
            await asyncio.gather(*client_tasks, return_exceptions=True)
        await stop_miners(miner_tasks, miners, tally, stop_miners_event)
        return tally, cpu
    finally:
        for http in connections:
            await http.close()


async def post_load(port: int, pid: int, args: argparse.Namespace) -> tuple[Tally, dict]:
    tally, stop = Tally(), asyncio.Event()
    connections = [connect(args, port) for _ in range(args.clients)]
    try:
        tasks = [asyncio.create_task(post_loop(http, tally, stop)) for http in connections]
        cpu = await measure_window(pid, tally, args.warmup, args.seconds, connections)
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        return tally, cpu
    finally:
        for http in connections:
            await http.close()


def summarize(tally: Tally, cpu: dict[str, float]) -> dict[str, Any]:
    """Rates, latencies and CPU per item of one measured window."""
    n = len(tally.latencies)
    ms = [s * 1000 for s in tally.latencies]
    return {
        "completed": n,
        "per_second": n / cpu["wall_s"],
        "p50_ms": statistics.median(ms) if ms else None,
        "p99_ms": percentile(ms, 99) if ms else None,
        "server_cpu_ms_per_item": cpu["server_cpu_s"] * 1000 / n if n else None,
        # requests sent in the window (answered or not) per item completed in it
        "requests_per_item": cpu["requests"] / n if n else None,
        "server_cpu_share": cpu["server_cpu_s"] / cpu["wall_s"],
        "loadgen_cpu_share": cpu["loadgen_cpu_s"] / cpu["wall_s"],
        "claims_409": tally.conflicts,
        "claims_409_total": tally.conflicts_total,
        "errors": dict(tally.errors),
        **cpu,
    }


# -- servers -------------------------------------------------------------------------------------


def prepare_template(tmp: Path, miners: int) -> tuple[Path, list[tuple[str, str]]]:
    """A data directory with the node's own keys and `miners` miner keys, made once: every
    measurement starts a node on a fresh copy of it."""
    data_dir = tmp / "template"
    node = NodeProcess(data_dir, "--no-miner")
    try:
        node.start()
        keys = [(f"m{i}", node.new_key("miner", f"m{i}")) for i in range(1, miners + 1)]
    finally:
        node.stop()
    return data_dir, keys


def log_errors(text: str) -> list[str]:
    """The ERROR and traceback lines of a server log."""
    return [line for line in text.splitlines() if " ERROR " in line or "Traceback" in line]


@contextmanager
def node_server(template: Path, tmp: Path, label: str, args: argparse.Namespace) -> Iterator:
    """A node (`serve --no-miner`, no rate limits) on a fresh copy of `template`."""
    data_dir = tmp / label
    shutil.copytree(template, data_dir)
    node = NodeProcess(data_dir, "--no-miner", *UNLIMITED, *args.node_arg)
    try:
        node.start()
        yield node
    finally:
        node.stop()
        if node.proc is not None and (errors := log_errors(node.output())):
            print(f"  node log ({label}): {len(errors)} ERROR lines, first: {errors[0]}")


@contextmanager
def baseline_server(tmp: Path, args: argparse.Namespace) -> Iterator[tuple[int, int]]:
    """The baseline server in its own process: (port, pid)."""
    port = free_port()
    log = open(tmp / "baseline.log", "a")  # noqa: SIM115 - the server process owns it
    proc = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--serve-baseline",
            str(port),
            "--baseline-http",
            args.baseline_http,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the baseline exited:\n{(tmp / 'baseline.log').read_text()}")
            try:
                if httpx.post(f"http://{HOST}:{port}/bench", json=BASELINE_BODY).status_code == 200:
                    break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield port, proc.pid
    finally:
        stop_process(proc)
        log.close()


def serve_baseline(port: int, http: str) -> None:
    """The baseline server: one Litestar POST handler under uvicorn (the node's HTTP stack,
    with nothing of the node)."""
    import uvicorn
    from litestar import Litestar, post

    @post("/bench", status_code=200)
    async def bench(data: dict[str, Any]) -> dict[str, Any]:
        return {"ok": True, "fields": len(data)}

    uvicorn.run(
        Litestar([bench]),
        host=HOST,
        port=port,
        http=http,  # type: ignore[arg-type]
        log_level="warning",
        access_log=False,
        lifespan="off",
    )


# -- the throughput mode -------------------------------------------------------------------------


def measure(
    config: str,
    template: Path,
    keys: list[tuple[str, str]],
    tmp: Path,
    run: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """One measurement: the baseline, the lifecycle in-process, or the node with `config`
    miners."""
    if config == IN_PROCESS:
        return in_process_run(template, tmp / f"run{run}-in-process", args)
    if config == "baseline":
        with baseline_server(tmp, args) as (port, pid):
            tally, cpu = asyncio.run(post_load(port, pid, args))
        return summarize(tally, cpu)
    miners = [Miner(name, key) for name, key in keys[: int(config)]]
    with node_server(template, tmp, f"run{run}-miners{config}", args) as node:
        tally, cpu = asyncio.run(
            lifecycle_load(node.port, node.proc.pid, node.client_key, miners, args)
        )
    return {**summarize(tally, cpu), **tally.check()}


def fmt_ms(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:.0f} ms"
    if value >= 1:
        return f"{value:.1f} ms"
    return f"{value:.2f} ms"


def fmt_rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}" if value >= 1000 else f"{value:.1f}"


def spread(runs: list[dict[str, Any]], key: str, fmt: Callable[[float | None], str]) -> str:
    """The median, and the range over the runs when there are several."""
    values = [run[key] for run in runs if run.get(key) is not None]
    if not values:
        return "-"
    median = fmt(statistics.median(values))
    if min(values) == max(values):
        return median
    return f"{median} ({fmt(min(values))} to {fmt(max(values))})"


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def throughput_table(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> str:
    protocol = {
        "tutorial": f"available + claim up to {args.slots} of each offer ({args.pick}) +"
        " complete each; clients submit, then long-poll the job",
        "split": f"claim-next up to {args.slots} + one batch completion; clients submit, then"
        " long-poll the job",
        "next": f"claim-next up to {args.slots}, its results carried by the next claim-next;"
        " clients submit with wait",
    }[args.protocol]
    lines = [
        f"Full job lifecycle (miners taking work by {protocol}; with co-signatures, to"
        f" completed with receipt), {args.clients} clients, {args.seconds:g} s"
        f" windows after {args.warmup:g} s warm-up, {args.client} load generator"
        + (f", node {' '.join(args.node_arg)}" if args.node_arg else "")
        + f"; median of {args.runs} interleaved runs (range):",
        "",
        "| miners | full jobs/s | p50 submit→completed | p99 | server CPU per job |"
        " requests a job | claims 409 | lost/doubled |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for config, runs in results.items():
        if config in ("baseline", IN_PROCESS):
            continue
        lost = sum(r["lost"] for r in runs)
        doubled = sum(r["doubled"] for r in runs)
        lines.append(
            f"| {config} | {spread(runs, 'per_second', fmt_rate)} |"
            f" {spread(runs, 'p50_ms', fmt_ms)} | {spread(runs, 'p99_ms', fmt_ms)} |"
            f" {spread(runs, 'server_cpu_ms_per_item', fmt_ms)} |"
            f" {spread(runs, 'requests_per_item', fmt_ratio)} |"
            f" {spread(runs, 'claims_409', lambda v: '-' if v is None else f'{v:,.0f}')} |"
            f" {lost}/{doubled} |"
        )
    if runs := results.get(IN_PROCESS):
        lines.append(
            f"| the same work in-process, no HTTP ({args.clients} at once) |"
            f" {spread(runs, 'per_second', fmt_rate)} | - | - |"
            f" {spread(runs, 'server_cpu_ms_per_item', fmt_ms)} | 0 | - | - |"
        )
    if runs := results.get("baseline"):
        lines.append(
            f"| bare Litestar POST (baseline, {args.baseline_http}) |"
            f" {spread(runs, 'per_second', fmt_rate)} req/s | {spread(runs, 'p50_ms', fmt_ms)} |"
            f" {spread(runs, 'p99_ms', fmt_ms)} |"
            f" {spread(runs, 'server_cpu_ms_per_item', fmt_ms)} per request | 1 | - | - |"
        )
    return "\n".join(lines)


def run_throughput(args: argparse.Namespace, tmp: Path) -> tuple[dict, str]:
    """The throughput mode: every run of every configuration, and the table."""
    template, keys = prepare_template(tmp, max(args.miners))
    configs = ["baseline", *(str(n) for n in args.miners)]
    if args.in_process:
        configs.append(IN_PROCESS)
    results: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    for run in range(args.runs):
        shift = run % len(configs)
        for config in configs[shift:] + configs[:shift]:
            out = measure(config, template, keys, tmp, run, args)
            results[config].append(out)
            if config == IN_PROCESS:
                print(
                    f"run {run + 1} in-process: {fmt_rate(out['per_second'])} jobs/s, CPU"
                    f" {fmt_ms(out['server_cpu_ms_per_item'])} a job"
                    f" ({out['server_cpu_share']:.0%} of a core)",
                    flush=True,
                )
                continue
            what = "baseline" if config == "baseline" else f"{config} miners"
            line = (
                f"run {run + 1} {what}: {fmt_rate(out['per_second'])}/s, p50"
                f" {fmt_ms(out['p50_ms'])}, p99 {fmt_ms(out['p99_ms'])}, server CPU"
                f" {fmt_ms(out['server_cpu_ms_per_item'])} each ({out['server_cpu_share']:.0%}"
                f" of a core), load generator {out['loadgen_cpu_share']:.0%} of a core"
            )
            if config != "baseline":
                line += (
                    f", {fmt_ratio(out['requests_per_item'])} requests a job,"
                    f" 409s {out['claims_409']} ({out['claims_409_total']} in all),"
                    f" {out['submitted']} submitted, lost {out['lost']}, doubled"
                    f" {out['doubled']}"
                )
            if out["errors"]:
                line += f", errors {out['errors']}"
            print(line, flush=True)
    return results, throughput_table(results, args)


def finish_as(jobs: Any, miner: Miner, completion: dict[str, Any], job_id: str) -> None:
    """Through the node's own code (`Jobs.finish`): complete `job_id` as `miner` with the
    fixed result, usage and co-signature of `completion` (`Miner.completion()`)."""
    jobs.finish(
        job_id,
        miner.name,
        result=completion["result"],
        prompt_tokens=USAGE["prompt_tokens"],
        completion_tokens=USAGE["completion_tokens"],
        model_sha256=completion["model_sha256"],
        miner_signature=completion["miner_signature"],
    )


# -- the in-process mode ------------------------------------------------------------------------

IN_PROCESS = "in-process"


def in_process_run(template: Path, data_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The lifecycle without HTTP (--in-process), in a process of its own on a fresh copy of
    the template: what the node's own work costs, the floor under the HTTP figures."""
    shutil.copytree(template, data_dir)
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--in-process-child",
            str(data_dir),
            f"--clients={args.clients}",
            f"--seconds={args.seconds}",
            f"--warmup={args.warmup}",
            *(f"--node-arg={arg}" for arg in args.node_arg),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=args.seconds + args.warmup + args.drain_timeout,
    )
    return json.loads(out.stdout.splitlines()[-1])


def in_process_child(data_dir: Path, args: argparse.Namespace) -> None:
    """--in-process-child: --clients coroutines, each in a loop: submit, claim, finish (with
    the miner's co-signature, so a signed receipt and a payment), each its own `Store.run`
    (so the three writes join the writer thread's groups as requests' writes do), through
    the node's own code on its event loop; counted over --seconds after --warmup. Prints one
    JSON line. No HTTP, no long polls, no answers' views: a lower bound for the node. Of the
    node's arguments only `--durability=normal` applies here."""
    from aitbc_node.keys import Principal
    from aitbc_node.node import Node, NodeSettings
    from aitbc_node.schemas import JobParams, SubmitJob

    durability = "NORMAL" if "--durability=normal" in args.node_arg else "FULL"
    node = Node(NodeSettings(data_dir=data_dir, run_miner=False, synchronous=durability))
    miner = Miner("in-process", "")
    completion = miner.completion()
    node.miners.upsert(miner.name, [SMOL], {}, builtin=False, public_key=miner.key.public_key_hex)
    client = Principal(key_id="bench", name="default", role="client", identity="default")
    request = SubmitJob(prompt="Say hi.", model=SMOL, params=JobParams(**JOB_PARAMS))
    capabilities = json.dumps([SMOL])
    store, jobs = node.store, node.jobs

    async def lifecycle() -> None:
        job_id = (await store.run(lambda: jobs.submit(client, request)))[0]["job_id"]
        await store.run(lambda: jobs.claim_as(miner.name, capabilities, job_id))
        await store.run(lambda: finish_as(jobs, miner, completion, job_id))

    async def measured() -> dict[str, Any]:
        window: list[float] = []  # [jobs, wall, cpu] once measured
        done = 0
        stop = time.monotonic() + args.warmup + args.seconds

        async def client_loop() -> None:
            nonlocal done
            while time.monotonic() < stop:
                await lifecycle()
                done += 1

        async def meter() -> None:
            await asyncio.sleep(args.warmup)
            jobs0, wall0, cpu0 = done, time.perf_counter(), time.process_time()
            await asyncio.sleep(args.seconds)
            window.extend((done - jobs0, time.perf_counter() - wall0, time.process_time() - cpu0))

        await asyncio.gather(meter(), *(client_loop() for _ in range(args.clients)))
        count, wall, cpu = window
        return {
            "per_second": count / wall,
            "server_cpu_ms_per_item": cpu / count * 1000 if count else None,
            "server_cpu_share": cpu / wall,
            "jobs": count,
        }

    try:
        print(json.dumps(asyncio.run(measured())))
    finally:
        node.store.close()


# -- the growth mode -----------------------------------------------------------------------------


async def read_times(port: int, client_key: str, args: argparse.Namespace) -> dict[str, Any]:
    """Time each read --reads times, one at a time, alternating between them."""
    reads = {
        "/api/v1/stats": None,
        "/api/explorer/stats": None,
        "/api/v1/jobs?limit=10": client_key,
    }
    connections = {path: connect(args, port, key) for path, key in reads.items()}
    times: dict[str, list[float]] = {path: [] for path in reads}
    try:
        # Let the block sealer catch up first: it would otherwise compete with the reads.
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            status, data = await connections["/api/explorer/stats"].request(
                "GET", "/api/explorer/stats"
            )
            explorer = json.loads(data)
            if status == 200 and explorer["unsealed_receipts"] == 0:
                break
            await asyncio.sleep(1)
        for _ in range(args.reads):
            for path, http in connections.items():
                started = time.perf_counter()
                status, data = await http.request("GET", path)
                times[path].append((time.perf_counter() - started) * 1000)
                if status != 200:
                    raise RuntimeError(f"GET {path}: {status} {data[:300]!r}")
        return {
            "completed_jobs": explorer["jobs"]["completed"],
            "receipts": explorer["receipts"],
            "unsealed_receipts": explorer["unsealed_receipts"],
            **{
                path: {"p50_ms": statistics.median(ms), "p99_ms": percentile(ms, 99)}
                for path, ms in times.items()
            },
        }
    finally:
        for http in connections.values():
            await http.close()


def database_bytes(data_dir: Path) -> int:
    return sum(p.stat().st_size for p in data_dir.glob("node.db*"))


# Jobs between two seals in a direct fill: what the sealer finds every 2 s at 100 jobs/s.
DIRECT_SEAL_EVERY = 200


def fill_direct(data_dir: Path, miner: Miner, jobs: int) -> None:
    """Add `jobs` completed jobs to the stopped node in `data_dir`, through its own code in
    this process (see the module's docstring), every receipt sealed at the end."""
    from aitbc_node.config import JobRules
    from aitbc_node.keys import Principal
    from aitbc_node.node import Node, NodeSettings
    from aitbc_node.schemas import JobParams, SubmitJob

    settings = NodeSettings(
        data_dir=data_dir,
        run_miner=False,
        synchronous="OFF",  # a benchmark's fill: nothing to keep through a power cut
        # the fill may outlast the miner's online window; the jobs are for its model anyway
        rules=JobRules(accept_unserved_models=True),
    )
    node = Node(settings)
    try:
        completion = miner.completion()
        node.miners.upsert(
            miner.name, [SMOL], {}, builtin=False, public_key=miner.key.public_key_hex
        )
        client = Principal(key_id="bench-fill", name="default", role="client", identity="default")
        request = SubmitJob(prompt="Say hi.", model=SMOL, params=JobParams(**JOB_PARAMS))
        capabilities = json.dumps([SMOL])
        started = time.perf_counter()
        for i in range(1, jobs + 1):
            job_id = node.jobs.submit(client, request)[0]["job_id"]
            node.jobs.claim_as(miner.name, capabilities, job_id)
            finish_as(node.jobs, miner, completion, job_id)
            if i % DIRECT_SEAL_EVERY == 0:
                node.ledger.seal(node.settings.block_max_items)
            if i % 10_000 == 0:
                rate = i / (time.perf_counter() - started)
                print(f"  {i} of {jobs} jobs written ({rate:.0f} jobs/s)", flush=True)
        while node.ledger.seal(node.settings.block_max_items) is not None:
            pass
    finally:
        node.store.close()


def verify_times(data_dir: Path) -> dict[str, Any]:
    """Wall time of `aitbc-node verify --data-dir` from genesis and with `--since TIP-10`,
    each a fresh process, as a user runs it (a node without `--since` answers exit 2)."""
    import sqlite3

    db = sqlite3.connect(data_dir / "node.db")
    try:
        (tip,) = db.execute("SELECT max(height) FROM blocks").fetchone()
    finally:
        db.close()
    out: dict[str, Any] = {"tip": tip}
    for label, extra in (("genesis", []), ("since", ["--since", str(max(tip - 10, 0))])):
        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "aitbc_node", "verify", "--data-dir", str(data_dir), *extra],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        lines = (proc.stdout + proc.stderr).splitlines()
        out[label] = {
            "seconds": time.perf_counter() - started,
            "exit": proc.returncode,
            "args": extra,
            "line": lines[0] if lines else "",
        }
        print(
            f"  verify {' '.join(extra) or '(from genesis)'}: {out[label]['seconds']:.2f} s,"
            f" exit {proc.returncode}: {out[label]['line'][:140]}",
            flush=True,
        )
    return out


def growth_step(node: NodeProcess, size: int, args: argparse.Namespace) -> dict[str, Any]:
    """The reads timed on a node holding `size` completed jobs (and verify, if asked)."""
    step = asyncio.run(read_times(node.port, node.client_key, args))
    step["size"] = size
    step["database_bytes"] = database_bytes(node.data_dir)
    print(
        f"{step['completed_jobs']} completed jobs: "
        + ", ".join(f"{p} p50 {fmt_ms(step[p]['p50_ms'])}" for p in step if "/" in p),
        flush=True,
    )
    if args.growth_verify:
        step["verify"] = verify_times(node.data_dir)
    return step


def run_growth(args: argparse.Namespace, tmp: Path) -> tuple[list[dict], str]:
    """The growth mode: fill one node step by step, time the reads at each size."""
    template, keys = prepare_template(tmp, args.growth_miners)
    miners = [Miner(name, key) for name, key in keys]
    steps: list[dict[str, Any]] = []
    if args.growth_fill == "direct":
        data_dir = tmp / "growth"
        shutil.copytree(template, data_dir)
        completed = 0
        for size in sorted(args.growth):
            if size > completed:
                started = time.perf_counter()
                fill_direct(data_dir, miners[0], size - completed)
                fill_s = time.perf_counter() - started
                print(f"wrote {size - completed} jobs in {fill_s:.1f} s (node stopped)", flush=True)
            node = NodeProcess(data_dir, "--no-miner", *UNLIMITED, *args.node_arg)
            try:
                node.start()
                steps.append(growth_step(node, size, args))
            finally:
                node.stop()
            completed = steps[-1]["completed_jobs"]
    else:
        with node_server(template, tmp, "growth", args) as node:
            completed = 0
            for size in sorted(args.growth):
                if size > completed:
                    started = time.perf_counter()
                    tally, _ = asyncio.run(
                        lifecycle_load(
                            node.port,
                            node.proc.pid,
                            node.client_key,
                            miners,
                            args,
                            jobs=size - completed,
                        )
                    )
                    fill_s = time.perf_counter() - started
                    check = tally.check()
                    print(
                        f"filled {len(tally.latencies)} jobs in {fill_s:.1f} s"
                        f" ({len(tally.latencies) / fill_s:.1f} jobs/s), lost {check['lost']},"
                        f" doubled {check['doubled']}"
                        + (f", errors {dict(tally.errors)}" if tally.errors else ""),
                        flush=True,
                    )
                steps.append(growth_step(node, size, args))
                completed = steps[-1]["completed_jobs"]
    lines = [
        f"Read latency as the store grows (p50 / p99 of {args.reads} requests each, one at a"
        " time):",
        "",
        "| completed jobs | GET /api/v1/stats | GET /api/explorer/stats |"
        " GET /api/v1/jobs?limit=10 | database and WAL |",
        "| --- | --- | --- | --- | --- |",
    ]
    for step in steps:
        cells = [
            f"{fmt_ms(step[p]['p50_ms'])} / {fmt_ms(step[p]['p99_ms'])}"
            for p in ("/api/v1/stats", "/api/explorer/stats", "/api/v1/jobs?limit=10")
        ]
        size = step["database_bytes"]
        per_job = size / max(step["completed_jobs"], 1) / 1024
        lines.append(
            f"| {step['completed_jobs']:,} | {' | '.join(cells)} |"
            f" {size / 2**20:.1f} MB ({per_job:.1f} KB a job) |"
        )
    if args.growth_verify:
        lines += [
            "",
            "`aitbc-node verify --data-dir` (a fresh process each, start-up included):",
            "",
            "| completed jobs | blocks | from genesis | --since TIP-10 |",
            "| --- | --- | --- | --- |",
        ]
        for step in steps:
            verify = step["verify"]
            cells = [
                f"{verify[k]['seconds']:.2f} s" + ("" if verify[k]["exit"] == 0 else " (failed)")
                for k in ("genesis", "since")
            ]
            lines.append(
                f"| {step['completed_jobs']:,} | {verify['tip'] + 1:,} | {' | '.join(cells)} |"
            )
    return steps, "\n".join(lines)


# -- main ----------------------------------------------------------------------------------------


def int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="interleaved repetitions (3)")
    parser.add_argument("--miners", type=int_list, default=[1, 4, 16], help="(1,4,16)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (32)")
    parser.add_argument("--seconds", type=float, default=10, help="measured window (10)")
    parser.add_argument("--warmup", type=float, default=2, help="seconds before it (2)")
    parser.add_argument(
        "--slots", type=int, default=4, help="jobs a miner takes at once at most (4)"
    )
    parser.add_argument(
        "--protocol",
        choices=["next", "split", "tutorial"],
        default="next",
        help="miners take work with claim-next and hand in their results with their next"
        " claim-next, clients submit with wait (next: about one request a job on each side);"
        " miners complete in a batch request of its own, clients submit then long-poll the"
        " job (split); or miners use available + claim + complete per job, as the tutorial's"
        " do (tutorial)",
    )
    parser.add_argument(
        "--pick",
        choices=["oldest", "random"],
        default="oldest",
        help="--protocol tutorial: claim the offer in its order (oldest), or shuffled (random)",
    )
    parser.add_argument(
        "--client",
        choices=["raw", "httpx"],
        default="raw",
        help="the load generator's HTTP client (raw: its own minimal one)",
    )
    parser.add_argument(
        "--node-arg",
        action="append",
        default=[],
        help="an extra `serve` argument, e.g. --node-arg=--durability=normal (repeatable)",
    )
    parser.add_argument(
        "--baseline-http",
        choices=["h11", "httptools", "auto"],
        default="httptools",
        help="uvicorn's HTTP implementation for the baseline (httptools, as the node)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=120,
        help="seconds the jobs in flight at the end may take to complete, and a growth"
        " fill may go without a completion (120)",
    )
    parser.add_argument(
        "--growth",
        type=int_list,
        help="measure reads at these store sizes (completed jobs) instead, e.g. 1000,10000",
    )
    parser.add_argument("--growth-miners", type=int, default=1, help="miners filling it (1)")
    parser.add_argument(
        "--growth-fill",
        choices=["api", "direct"],
        default="api",
        help="fill through the API (api), or with the node stopped, through its code (direct)",
    )
    parser.add_argument(
        "--growth-verify", action="store_true", help="also time `verify --data-dir` each size"
    )
    parser.add_argument("--reads", type=int, default=100, help="requests per read (100)")
    parser.add_argument("--out", type=Path, help="write every measurement here as JSON")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="also run the same lifecycle without HTTP, in-process (the node's own work)",
    )
    parser.add_argument("--serve-baseline", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--in-process-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.in_process_child:
        in_process_child(args.in_process_child, args)
        return
    if args.serve_baseline:
        serve_baseline(args.serve_baseline, args.baseline_http)
        return
    with tempfile.TemporaryDirectory(prefix="bench-coordinator-") as tmp_name:
        tmp = Path(tmp_name)
        if args.growth:
            results, table = run_growth(args, tmp)
        else:
            results, table = run_throughput(args, tmp)
    print()
    print(table)
    if args.out:
        config = {k: v for k, v in vars(args).items() if k not in ("out", "serve_baseline")}
        payload = {
            "config": {
                **config,
                "cpu_count": os.cpu_count(),
                "machine": platform.platform(),
                "python": platform.python_version(),
            },
            "results": results,
            "table": table,
        }
        args.out.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
