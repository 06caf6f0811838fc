"""Where the release executable runs: any x86-64 CPU from SSE4.2 on, and glibc 2.31 on.

`dist/aitbc-node` is built in a Debian 11 root (build/release_root.sh) with llama.cpp's run-time
CPU dispatch: one CPU backend per x86-64 level, the best one for the processor loaded at start
(`selftest` and `/api/health` name it). These tests check, on the executable itself:

- every ELF file in it asks for glibc 2.31 at most (`objdump -T`);
- on this machine's CPU it picks the variant this CPU's flags call for;
- under `qemu-x86_64` with CPU models that lack AVX-512 (Haswell) and AVX (Nehalem) it loads
  the embedded model and generates, with the variant each calls for;
- inside a bare Debian 11 userland (`debootstrap --variant=minbase`, glibc 2.31, no Python) it
  serves a job through its built-in miner, and the receipt verifies.

About emulation: PyInstaller's one-file bootloader unpacks its archive and then starts itself
again as a child process; under qemu-user that child would run on the real CPU (the emulator
does not follow an exec of a native binary). So the executable runs natively once (`serve`),
its unpacked tree is copied while it runs, and then the executable itself runs under the
emulator as that child would, with the environment the bootloader gives its child
(`_PYI_APPLICATION_HOME_DIR` naming the copy, `_PYI_PARENT_PROCESS_LEVEL`, `_PYI_ARCHIVE_FILE`,
`LD_LIBRARY_PATH`...): the executable's bootloader, its bundled interpreter and libraries, all
emulated, and nothing unpacked again. These tests need root (debootstrap, chroot)
and Debian's qemu-user and debootstrap, which `build/venv.sh --test` installs; emulated
generation takes minutes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, stop_process
from tests.test_executable import WAIT, executable  # noqa: F401 (the fixture)

ROOT = Path(__file__).resolve().parent.parent
GLIBC_FLOOR = (2, 31)
RUN_ROOT = ROOT / "build" / "work" / "debian11-run"
MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
# Emulated generation: minutes, not seconds (qemu's AVX2 is slow); an upper bound, not a budget.
EMULATED_WAIT = 1500

# llama.cpp's x86-64 CPU variants (ggml/src/CMakeLists.txt, GGML_CPU_ALL_VARIANTS) with the
# features each needs, as /proc/cpuinfo spells them. ggml loads the one with the highest score,
# which among those the CPU can run is the one needing the most features.
VARIANTS = {
    "x64": set(),
    "sse42": {"sse4_2"},
    "sandybridge": {"sse4_2", "avx"},
    "ivybridge": {"sse4_2", "avx", "f16c"},
    "piledriver": {"sse4_2", "avx", "f16c", "fma"},
    "haswell": {"sse4_2", "avx", "f16c", "fma", "avx2", "bmi2"},
    "skylakex": {"sse4_2", "avx", "f16c", "fma", "avx2", "bmi2", "avx512f"},
    "cannonlake": {"sse4_2", "avx", "f16c", "fma", "avx2", "bmi2", "avx512f", "avx512vbmi"},
    "cascadelake": {"sse4_2", "avx", "f16c", "fma", "avx2", "bmi2", "avx512f", "avx512_vnni"},
    "icelake": {
        "sse4_2",
        "avx",
        "f16c",
        "fma",
        "avx2",
        "bmi2",
        "avx512f",
        "avx512vbmi",
        "avx512_vnni",
    },
    "cooperlake": {
        "sse4_2",
        "avx",
        "f16c",
        "fma",
        "avx2",
        "bmi2",
        "avx512f",
        "avx512_vnni",
        "avx512_bf16",
    },
    "zen4": {
        "sse4_2",
        "avx",
        "f16c",
        "fma",
        "avx2",
        "bmi2",
        "avx512f",
        "avx512vbmi",
        "avx512_vnni",
        "avx512_bf16",
    },
    "alderlake": {"sse4_2", "avx", "f16c", "fma", "avx2", "bmi2", "avx_vnni"},
    "sapphirerapids": {
        "sse4_2",
        "avx",
        "f16c",
        "fma",
        "avx2",
        "bmi2",
        "avx512f",
        "avx512vbmi",
        "avx512_vnni",
        "avx512_bf16",
        "amx_tile",
        "amx_int8",
    },
}
# qemu CPU models and the variant each must get.
EMULATED = [("Nehalem", "sse42"), ("Haswell", "haswell")]


def best_variant(flags: set[str]) -> str:
    runnable = [name for name, needs in VARIANTS.items() if needs <= flags]
    most = max(len(VARIANTS[name]) for name in runnable)
    best = [name for name in runnable if len(VARIANTS[name]) == most]
    assert len(best) == 1, f"this CPU's flags fit {best} equally; extend VARIANTS' tie-break"
    return best[0]


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    raise AssertionError("no flags line in /proc/cpuinfo")


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("these tests need root (debootstrap, chroot): run the test command as root")


@pytest.fixture(scope="module")
def unpacked(executable: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """The tree the executable's bootloader unpacks, copied while a native `serve` runs."""
    tmp = tmp_path_factory.mktemp("unpack")
    scratch = tmp / "tmp"
    scratch.mkdir()
    port = free_port()
    proc = subprocess.Popen(
        [
            str(executable),
            "serve",
            "--no-miner",
            "--port",
            str(port),
            "--data-dir",
            str(tmp / "data"),
        ],
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp), "TMPDIR": str(scratch)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + WAIT
        while True:
            assert proc.poll() is None, f"the executable exited with {proc.returncode}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=5).is_success:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the executable did not answer /api/health"
            time.sleep(0.2)
        (tree,) = scratch.glob("_MEI*")
        # The bootloader accepts only a home directory named as it names them (_MEIxxxxxx).
        copy = tmp / "copy" / tree.name
        shutil.copytree(tree, copy, symlinks=True)
        copy.chmod(0o700)
    finally:
        stop_process(proc)
    return copy


def elf_files(folder: Path) -> Iterator[Path]:
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as f:
                if f.read(4) == b"\x7fELF":
                    yield path


def glibc_needed(path: Path) -> tuple[int, int]:
    """The newest GLIBC_x.y symbol version an ELF file asks for ((0, 0) if none)."""
    out = subprocess.run(
        ["objdump", "-T", str(path)], capture_output=True, text=True, check=True
    ).stdout
    versions = [(int(a), int(b)) for a, b in re.findall(r"\bGLIBC_(\d+)\.(\d+)", out)]
    return max(versions, default=(0, 0))


def test_every_elf_file_in_the_executable_asks_for_glibc_2_31_at_most(
    executable: Path,  # noqa: F811
    unpacked: Path,
) -> None:
    files = [executable, *elf_files(unpacked)]
    assert len(files) > 20, files  # the interpreter, extensions, llama.cpp's libraries...
    assert any(p.name.startswith("libggml-cpu-haswell") for p in files)
    too_new = {
        str(p.relative_to(unpacked) if p != executable else p): v
        for p in files
        if (v := glibc_needed(p)) > GLIBC_FLOOR
    }
    assert not too_new, f"asks for a glibc newer than 2.31: {too_new}"


def selftest(command: list[str], env: dict[str, str], timeout: float) -> dict:
    run = subprocess.run(
        [*command, "selftest", "--tokens", "4", "--threads", "2", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert run.returncode == 0, f"exit {run.returncode}:\n{run.stdout}\n{run.stderr[-3000:]}"
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["ok"] and report["completion_tokens"] == 4 and report["text"].strip(), report
    return report


def test_on_this_cpu_the_executable_picks_its_best_variant(
    executable: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TMPDIR": str(tmp_path)}
    report = selftest([str(executable)], env, WAIT)
    assert report["backend"] == "cpu"
    assert report["cpu_variant"] == best_variant(cpu_flags()), report


@pytest.mark.parametrize(("cpu", "variant"), EMULATED)
def test_the_executable_generates_under_emulation(
    executable: Path,  # noqa: F811
    unpacked: Path,
    tmp_path: Path,
    cpu: str,
    variant: str,
) -> None:
    """`qemu-x86_64 -cpu Nehalem|Haswell` runs the executable (as its own child, see above)."""
    qemu = shutil.which("qemu-x86_64")
    assert qemu, "qemu-x86_64 is missing: Debian's qemu-user (build/venv.sh --test installs it)"
    # The environment the bootloader gives its child (seen with `strace -f -v -e execve`);
    # LD_LIBRARY_PATH through qemu's -E, for the emulated program only, not qemu itself.
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "TMPDIR": str(tmp_path),
        "_PYI_ARCHIVE_FILE": str(executable),
        "_PYI_APPLICATION_HOME_DIR": str(unpacked),
        "_PYI_PARENT_PROCESS_LEVEL": "0",
        "_PYI_LINUX_PROCESS_NAME": executable.name,
    }
    command = [qemu, "-cpu", cpu, "-E", f"LD_LIBRARY_PATH={unpacked}", str(executable)]
    report = selftest(command, env, EMULATED_WAIT)
    assert report["cpu_variant"] == variant, report
    # Nothing was unpacked again: the emulated process ran from the copied tree.
    assert not list(tmp_path.glob("_MEI*"))


@pytest.fixture(scope="module")
def debian11() -> Path:
    """A bare Debian 11 userland (debootstrap --variant=minbase), made once and kept in
    build/work/debian11-run/: glibc 2.31, no Python, no compiler."""
    need_root()
    stamp = RUN_ROOT / ".aitbc-ready"
    if not stamp.exists():
        assert shutil.which("debootstrap"), "debootstrap is missing (build/venv.sh --test)"
        shutil.rmtree(RUN_ROOT, ignore_errors=True)
        made = subprocess.run(
            ["debootstrap", "--variant=minbase", "bullseye", str(RUN_ROOT), MIRROR],
            capture_output=True,
            text=True,
            timeout=1800,
        )
        assert made.returncode == 0, made.stdout[-3000:] + made.stderr[-3000:]
        stamp.touch()
    version = subprocess.run(
        ["chroot", str(RUN_ROOT), "getconf", "GNU_LIBC_VERSION"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert version == ["glibc", "2.31"], version
    assert not (RUN_ROOT / "usr" / "bin" / "python3").exists()
    return RUN_ROOT


def test_the_executable_serves_a_job_in_debian_11(
    executable: Path,  # noqa: F811
    debian11: Path,
) -> None:
    inside = Path(tempfile.mkdtemp(prefix="aitbc-", dir=debian11 / "tmp"))
    shutil.copy2(executable, inside / "aitbc-node")
    node_exe = f"/{(inside / 'aitbc-node').relative_to(debian11)}"
    data = inside / "data"
    port = free_port()
    env = {"PATH": "/usr/bin:/bin", "HOME": "/root", "TMPDIR": "/tmp", "LANG": "C.UTF-8"}
    chroot = shutil.which("chroot") or "/usr/sbin/chroot"
    proc = subprocess.Popen(
        [
            chroot,
            str(debian11),
            node_exe,
            "serve",
            "--port",
            str(port),
            "--data-dir",
            f"/{data.relative_to(debian11)}",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}/api"
        deadline = time.monotonic() + WAIT
        while True:
            assert proc.poll() is None, f"exited with {proc.returncode}:\n{proc.stdout.read()}"
            try:
                health = httpx.get(f"{base}/health", timeout=5)
                if health.is_success and health.json()["miner"]["state"] == "idle":
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "no healthy miner in Debian 11"
            time.sleep(0.5)
        assert health.json()["miner"]["gpu_info"]["cpu_variant"] == best_variant(cpu_flags())
        key = json.loads((data / "credentials.json").read_text())["client"]
        headers = {"X-Api-Key": key}
        created = httpx.post(
            f"{base}/v1/jobs",
            headers=headers,
            json={"prompt": "Name a colour.", "params": {"max_tokens": 8}},
            timeout=30,
        )
        assert created.status_code == 201, created.text
        job_id = created.json()["job_id"]
        while True:
            job = httpx.get(
                f"{base}/v1/jobs/{job_id}", params={"wait": 30}, headers=headers, timeout=60
            ).json()
            if job["status"] in ("completed", "failed", "cancelled"):
                break
            assert time.monotonic() < deadline + WAIT, job
        assert job["status"] == "completed" and job["result"].strip(), job
        receipt = httpx.get(f"{base}/v1/receipts/{job['receipt_id']}", timeout=30).text
        (inside / "receipt.json").write_text(receipt)
        pubkey = health.json()["node"]["public_key"]
        verified = subprocess.run(
            [
                chroot,
                str(debian11),
                node_exe,
                "verify",
                f"/{inside.relative_to(debian11)}/receipt.json",
                "--pubkey",
                pubkey,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=WAIT,
        )
        assert verified.returncode == 0, verified.stdout + verified.stderr
    finally:
        stop_process(proc, WAIT)
        shutil.rmtree(inside, ignore_errors=True)
    assert proc.returncode == 0  # a clean stop on SIGTERM
