"""The one miner loop over the real batched engine, fed by an in-memory job source.

The source here is a stand-in for the store or the Coordinator API (those are tested end to
end in test_batching.py, test_builtin_miner.py and test_remote_miners.py); the engine is the
real llama.cpp one on the embedded model. Also: the layout the README draws, one engine driven
by one loop that both miners share.
"""

from __future__ import annotations

import ast
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from aitbc_node import engine as engine_module
from aitbc_node.engine import Engine, Generation, repacking_allowed
from aitbc_node.miner import HeldJob, MinerLoop
from aitbc_node.models import embedded_model
from tests.conftest import GENERATION_WAIT, ROOT

PARAMS = {"max_tokens": 24, "temperature": 0, "top_p": 0.95, "seed": 1, "stop": []}


class ListSource:
    """Jobs from a list; outcomes recorded in dicts."""

    def __init__(self, jobs: list[HeldJob]) -> None:
        self.queue = list(jobs)
        self.completed: dict[str, Generation] = {}
        self.failed: dict[str, str] = {}
        self.faults: dict[str, Exception] = {}
        self.handed_back: list[str] = []
        self.text: dict[str, str] = {}
        self.claim_sizes: list[int] = []
        self.broken: set[str] = set()  # jobs whose completion raises
        self.work = threading.Event()
        self.lock = threading.Lock()

    def register(self, models: list[str]) -> None:
        pass

    def wait_for_work(self, timeout: float) -> None:
        self.work.wait(min(timeout, 0.05))

    def claim(self, free: dict[str, int]) -> list[HeldJob]:
        with self.lock:
            n = min(sum(free.values()), len(self.queue))
            taken, self.queue = self.queue[:n], self.queue[n:]
        if taken:
            self.claim_sizes.append(len(taken))
        return taken

    def progress(self, job: HeldJob, text: str) -> None:
        self.text[job.job_id] = self.text.get(job.job_id, "") + text

    def flush(self) -> None:
        pass

    def complete(self, job: HeldJob, generation: Generation, model_sha256: str) -> None:
        if job.job_id in self.broken:
            raise ValueError("cannot record this one")
        self.completed[job.job_id] = generation

    def fail(self, job: HeldJob, reason: str) -> None:
        self.failed[job.job_id] = reason

    def fault(self, job: HeldJob, error: Exception) -> None:
        self.faults[job.job_id] = error

    def hand_back(self, job: HeldJob) -> None:
        self.handed_back.append(job.job_id)

    def renew(self, jobs: list[HeldJob]) -> float:
        return 60.0

    def forget(self, job: HeldJob) -> None:
        pass


def job(job_id: str, prompt: str = "Say hello.", **params: Any) -> HeldJob:
    return HeldJob(
        job_id=job_id,
        model="m",
        prompt=prompt,
        params={**PARAMS, **params},
        lease_seconds=60.0,
    )


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(embedded_model(), context=1024, parallel=3)


def run_until(loop: MinerLoop, done: Any) -> threading.Thread:
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + GENERATION_WAIT
    while not done():
        assert thread.is_alive(), "the loop ended early"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
    return thread


@pytest.mark.parametrize(
    ("system_info", "allowed"),
    [
        (b"CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 1 | AVX512_BF16 = 1 | AMX_INT8 = 1 |", False),
        (b"CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 1 | OPENMP = 1 |", True),
    ],
)
def test_weights_are_not_repacked_where_llama_cpp_uses_amx(
    monkeypatch: pytest.MonkeyPatch, system_info: bytes, allowed: bool
) -> None:
    # llama.cpp's AMX matrix multiply crashes the process on the first job (seen on a
    # Sapphire Rapids Xeon with the embedded model); the engine tests here load the real
    # model on whatever CPU runs them, so on such a CPU they show the crash without this.
    monkeypatch.setattr(engine_module.llama_cpp, "llama_print_system_info", lambda: system_info)
    assert repacking_allowed() is allowed


def test_more_jobs_than_slots_all_finish_in_batches(engine: Engine) -> None:
    jobs = [job(f"j{i}", f"Name a colour, number {i}.", ignore_eos=True) for i in range(7)]
    source = ListSource(jobs)
    loop = MinerLoop(source, {"m": engine})
    thread = run_until(loop, lambda: len(source.completed) == 7)
    loop.drain()
    thread.join(GENERATION_WAIT)
    assert not thread.is_alive()
    assert max(source.claim_sizes) == 3  # never more than the free sequences
    assert all(
        g.completion_tokens == 24 and g.finish_reason == "length" for g in source.completed.values()
    )
    assert engine.free_slots == 3 and engine.running == 0
    # Streaming saw exactly the final text of each job.
    assert all(source.text[j] == g.text for j, g in source.completed.items())


def test_a_lost_job_is_dropped_and_its_slot_reused(engine: Engine) -> None:
    long_one = job("long", "Count to a thousand.", max_tokens=2000, ignore_eos=True)
    source = ListSource([long_one, job("a"), job("b"), job("c")])
    loop = MinerLoop(source, {"m": engine})
    thread = run_until(loop, lambda: len(source.completed) >= 3)
    long_one.lost.set()  # cancelled on the node
    deadline = time.monotonic() + GENERATION_WAIT
    while "long" in loop.held_ids():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    loop.drain()
    thread.join(GENERATION_WAIT)
    assert "long" not in source.completed and "long" not in source.handed_back
    assert set(source.completed) == {"a", "b", "c"}
    assert engine.free_slots == 3


def test_recording_that_raises_is_the_jobs_fault_not_the_loops(engine: Engine) -> None:
    source = ListSource([job("bad"), job("good1"), job("good2"), job("good3")])
    source.broken.add("bad")
    loop = MinerLoop(source, {"m": engine})
    thread = run_until(loop, lambda: len(source.completed) == 3 and "bad" in source.faults)
    loop.drain()
    thread.join(GENERATION_WAIT)
    assert isinstance(source.faults["bad"], ValueError)


def test_a_prompt_too_long_fails_only_its_job(engine: Engine) -> None:
    source = ListSource([job("huge", "word " * 3000), job("fine")])
    loop = MinerLoop(source, {"m": engine})
    thread = run_until(loop, lambda: "fine" in source.completed and "huge" in source.failed)
    loop.drain()
    thread.join(GENERATION_WAIT)
    assert "context" in source.failed["huge"]


def test_stop_hands_every_held_job_back(engine: Engine) -> None:
    jobs = [job(f"s{i}", max_tokens=2000, ignore_eos=True) for i in range(3)]
    source = ListSource(jobs)
    loop = MinerLoop(source, {"m": engine})
    thread = run_until(
        loop, lambda: len(loop.held_ids()) == 3 and all(source.text.get(j.job_id) for j in jobs)
    )
    loop.stop()
    thread.join(GENERATION_WAIT)
    assert not thread.is_alive()
    assert sorted(source.handed_back) == ["s0", "s1", "s2"]
    assert not source.completed
    assert engine.free_slots == 3 and engine.running == 0


# -- the layout the README draws --------------------------------------------------------

PACKAGE = Path(ROOT) / "aitbc_node"
BATCH_CALLS = {"admit", "step", "abort"}


def imported_names(module: str) -> set[tuple[str, str]]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    return {
        (node.module or "", alias.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }


def test_both_miners_are_the_one_loop() -> None:
    for module in ("builtin_miner", "remote_miner"):
        assert ("aitbc_node.miner", "MinerLoop") in imported_names(module), module


def test_only_the_loop_drives_the_engine() -> None:
    """No module but miner.py admits, steps or aborts sequences (engine.py defines them)."""
    drivers = set()
    for path in PACKAGE.glob("*.py"):
        if path.stem == "engine":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in BATCH_CALLS:
                drivers.add(path.stem)
    assert drivers == {"miner"}
