"""llama.cpp's libraries load before numpy, in every command that runs a model.

On a CUDA build of llama-cpp-python, numpy loaded first (sqlite-utils imports it when it is
installed) made the first model load die with a segmentation fault (found on an H100 with
CUDA 13; the README's GPU section). This machine has no GPU, so the test checks the order
itself, in a real `serve` process, with Python's own import log.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import ROOT, free_port, stop_process

START_WAIT = 120


def imports_in_order(log: str) -> list[str]:
    """Module names from `-X importtime` output, in the order their imports finished."""
    names = []
    for line in log.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.append(line.rsplit("|", 1)[1].strip())
    return names


def test_serve_loads_llama_cpp_before_numpy(tmp_path: Path) -> None:
    port = free_port()
    log_path = tmp_path / "imports.log"
    data = str(tmp_path / "data")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "aitbc_node", "serve", "--port", str(port), "--data-dir", data],
            stdout=subprocess.DEVNULL,
            stderr=log,
            cwd=ROOT,
            env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"},
        )
    try:
        deadline = time.monotonic() + START_WAIT
        while time.monotonic() < deadline:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        else:
            raise AssertionError(f"the node did not answer in {START_WAIT} s")
    finally:
        stop_process(proc)
    names = imports_in_order(log_path.read_text())
    assert "llama_cpp.llama_cpp" in names and "numpy" in names, names[:50]
    first_numpy = next(i for i, n in enumerate(names) if n == "numpy" or n.startswith("numpy."))
    assert names.index("llama_cpp.llama_cpp") < first_numpy, (
        "numpy was imported before llama.cpp's libraries loaded"
    )
