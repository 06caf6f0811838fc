"""packaging/aitbc-node.service: systemd's own checker accepts it, with its hardening in place.

`systemd-analyze verify` needs the unit's ExecStart to exist, and /usr/local/bin/aitbc-node is
not installed on a test machine: the test checks a copy of the unit whose ExecStart points at a
stub executable in a temporary directory, everything else unchanged. systemd-analyze comes with
Debian's `systemd` package (build/venv.sh --test installs it).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT

UNIT = ROOT / "packaging" / "aitbc-node.service"
EXEC_START = "/usr/local/bin/aitbc-node"


def settings() -> dict[str, list[str]]:
    """Every `Key=value` of the unit, by key (a key may repeat)."""
    found: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key.strip(), []).append(value.strip())
    return found


@pytest.fixture
def unit_copy(tmp_path: Path) -> Path:
    """The unit, its ExecStart pointing at a stub executable that exists."""
    stub = tmp_path / "bin" / "aitbc-node"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    text = UNIT.read_text()
    assert f"ExecStart={EXEC_START} serve" in text
    copy = tmp_path / "aitbc-node.service"
    copy.write_text(text.replace(f"ExecStart={EXEC_START}", f"ExecStart={stub}"))
    return copy


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.fail("systemd-analyze is missing: apt-get install systemd (build/venv.sh --test)")
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=120)


def test_systemd_analyze_verify_accepts_the_unit(unit_copy: Path) -> None:
    result = analyze("verify", str(unit_copy))
    assert result.returncode == 0, result.stderr
    # verify exits 0 on an unknown key or a value it cannot parse (it ignores them, with a
    # line on stderr naming the file): any line about the unit is a mistake in it.
    problems = [line for line in result.stderr.splitlines() if unit_copy.name in line]
    assert problems == [], "\n".join(problems)


def test_verify_would_catch_a_broken_unit(tmp_path: Path, unit_copy: Path) -> None:
    """The check above is not vacuous: a missing executable fails it, a typo shows."""
    missing = tmp_path / "missing.service"
    missing.write_text(UNIT.read_text().replace(EXEC_START, str(tmp_path / "nope")))
    assert analyze("verify", str(missing)).returncode != 0
    typo = tmp_path / "typo.service"
    typo.write_text(unit_copy.read_text().replace("ProtectHome=yes", "ProtectHome=yess"))
    assert "typo.service" in analyze("verify", str(typo)).stderr


def test_the_unit_runs_the_node_hardened() -> None:
    found = settings()
    one = {key: values[-1] for key, values in found.items()}
    assert one["ExecStart"] == f"{EXEC_START} serve"
    assert one["DynamicUser"] == "yes"
    assert one["StateDirectory"] == "aitbc-node"
    assert "AITBC_DATA_DIR=%S/aitbc-node" in found["Environment"]
    assert one["EnvironmentFile"] == "-/etc/aitbc-node/env"
    assert one["ProtectSystem"] == "strict"
    assert one["ProtectHome"] == "yes"
    assert one["PrivateTmp"] == "yes"
    assert one["NoNewPrivileges"] == "yes"
    assert one["Restart"] == "on-failure"
    assert one["KillSignal"] == "SIGTERM"  # the node's clean stop
    # Long enough for uvicorn's 10 s graceful shutdown and the miner handing its jobs back.
    assert int(one["TimeoutStopSec"]) >= 30
    assert "--config /etc/aitbc-node/config.toml" in UNIT.read_text()


def test_systemd_rates_the_exposure_low(unit_copy: Path) -> None:
    """`systemd-analyze security` (offline, systemd >= 250) scores the sandbox: 0 is the
    tightest, 10 none; a unit with only the defaults scores 9.6 ("UNSAFE")."""
    result = analyze("security", "--offline=yes", str(unit_copy))
    if "--offline" in result.stderr and result.returncode != 0:
        pytest.skip(f"this systemd-analyze has no --offline: {result.stderr.strip()}")
    level = re.search(r"Overall exposure level for \S+: ([\d.]+) (\w+)", result.stdout)
    assert level, result.stdout + result.stderr
    assert float(level[1]) <= 3.0, result.stdout
