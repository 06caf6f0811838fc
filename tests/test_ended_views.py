"""The views of lately ended jobs that long polls are answered from (`Jobs.ended_view`):
kept only once the finish is committed, and equal to the row read afresh; a finish is
counted in the metrics only once committed too."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from aitbc_node.keys import create_key
from aitbc_node.node import Node
from tests.test_stats_counters import CAPS, CLIENT, MODEL, open_node, submit

TOKENS = {"prompt_tokens": 3, "completion_tokens": 5}


def completion_tokens(node: Node) -> float:
    """The tokens /metrics counts as generated for MODEL."""
    for line in node.metrics.render().decode().splitlines():
        if line.startswith(f'aitbc_completion_tokens_total{{model="{MODEL}"}}'):
            return float(line.rpartition(" ")[2])
    return 0


def test_an_ended_view_is_kept_only_once_its_finish_is_committed(tmp_path: Path) -> None:
    node = open_node(tmp_path / "data")
    try:
        node.miners.upsert("m1", [MODEL], {}, builtin=False)
        create_key(node.store, "client", CLIENT.identity, credit=10**12)
        job_id = submit(node, 1)[0]
        node.jobs.claim_as("m1", CAPS, job_id)
        assert node.jobs.ended_view(job_id) is None, "a running job has not ended"

        node.store._writer.set_commit_hook(lambda: True)  # the next commit rolls back
        finish = node.jobs.finish
        with pytest.raises(RuntimeError, match="lost with its group"):
            asyncio.run(node.store.run(lambda: finish(job_id, "m1", result="lost", **TOKENS)))
        node.store._writer.set_commit_hook(None)
        assert node.jobs.ended_view(job_id) is None, "a lost finish left no view behind"
        assert completion_tokens(node) == 0, "nor counted its tokens"

        asyncio.run(node.store.run(lambda: finish(job_id, "m1", result="kept", **TOKENS)))
        view = node.jobs.ended_view(job_id)
        assert view is not None and view["status"] == "completed" and view["result"] == "kept"
        assert view == node.jobs.peek(job_id)
        assert completion_tokens(node) == 5
    finally:
        node.stop()
