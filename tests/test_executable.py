"""The one-file executable: `bash build/executable.sh` builds `dist/aitbc-node`, which must run
on a machine with no Python, serve prompts with its embedded model offline, run every CLI
command, stop cleanly on SIGTERM, and need nothing from the system beyond glibc.

The build (build/executable.sh, in the Debian 11 root of build/release_root.sh: 30-60 minutes on
two cores the first time, mostly llama.cpp, then a minute or two) runs once per session, as root,
and is skipped while `dist/aitbc-node` is newer than every file it is built from (set
AITBC_REBUILD=1 to force it).
The executable then runs with `env -i`: a PATH without any Python, a temporary HOME, TMPDIR and
working directory, a fresh data directory and a free port.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
EXE = ROOT / "dist" / "aitbc-node"
BUILT_FROM = [
    ROOT / "aitbc_node",
    ROOT / "packaging",
    ROOT / "build" / "executable.sh",
    ROOT / "build" / "release_root.sh",
]
MODEL = "smollm2-135m-instruct"
# Upper bounds on events (a start, a job, an exit) for a slow or busy machine, never budgets.
WAIT = 300

# Libraries the executable may take from the system: glibc's own (the loader, libc, libm...,
# and the NSS modules it loads itself) and, for the bootloader alone, zlib (PyInstaller's Linux
# bootloader links it to unpack the archive). Everything else, libstdc++, libgomp and libgcc_s
# included (not there on a machine with no compiler), must come from the bundle.
GLIBC = re.compile(
    r"(linux-vdso\.so\.1|ld-linux-x86-64\.so\.2|libc\.so\.6|libm\.so\.6|libmvec\.so\.1"
    r"|libpthread\.so\.0|libdl\.so\.2|librt\.so\.1|libutil\.so\.1|libresolv\.so\.2"
    r"|libanl\.so\.1|libnss_\w+\.so\.2|libthread_db\.so\.1"
    r"|libcuda\.so\.1)$"  # the NVIDIA driver's, in a CUDA build: never bundled
)
BOOTLOADER_EXTRA = re.compile(r"libz\.so\.1$")
MUST_BE_BUNDLED = ["libstdc++.so.6", "libgcc_s.so.1"]
# llama.cpp's OpenMP runtime: GCC's in a build with gcc (--host), LLVM's with clang (release).
OPENMP = ("libgomp.so.1", "libomp.so")
SHARED_LIBRARY = re.compile(r"\.so(\.\d+)*$")

# Every CLI call checked against the executable while the node runs: (arguments, text its
# stdout must contain; "" means any output). In the arguments, "{data}" stands for the node's
# data directory, "{url}" for its API base URL and "{key}" for its client key. Add a command
# here to check it too; the calls run in this order.
CLI_CALLS = [
    (["--version"], "aitbc-node "),
    (["--help"], "serve"),
    (["serve", "--help"], "--model"),
    (["miner", "--help"], "--coordinator"),
    (["selftest", "--tokens", "2"], "\nok"),
    (["keys", "create", "--role", "client", "--name", "exe-test", "--data-dir", "{data}"], "ait_"),
    (["keys", "list", "--data-dir", "{data}"], "exe-test"),
    (["keys", "revoke", "exe-test", "--data-dir", "{data}"], "revoked"),
    (["keys", "show", "--data-dir", "{data}"], "public_key"),
    (["stats", "--url", "{url}"], "miners"),
    (
        [
            "submit",
            "Say hi.",
            "--wait",
            "--max-tokens",
            "8",
            "--url",
            "{url}",
            "--api-key",
            "{key}",
        ],
        "",
    ),
    (["jobs", "--url", "{url}", "--api-key", "{key}"], "completed"),
    (["verify", "--data-dir", "{data}"], "VALID"),
]


def newest_source_mtime() -> float:
    newest = 0.0
    for root in BUILT_FROM:
        files = [root] if root.is_file() else root.rglob("*")
        for path in files:
            if path.is_file() and "__pycache__" not in path.parts:
                newest = max(newest, path.stat().st_mtime)
    return newest


@pytest.fixture(scope="module")
def executable() -> Iterator[Path]:
    """dist/aitbc-node, rebuilt when any file it is built from is newer. Test sessions that
    run at the same time take turns: one builds while holding the lock exclusively, and each
    holds it shared while it runs the executable, so nobody replaces it under a running node."""
    lock_path = ROOT / "build" / "work" / "executable.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stale = not EXE.exists() or EXE.stat().st_mtime <= newest_source_mtime()
        if stale or os.environ.get("AITBC_REBUILD") == "1":
            build = subprocess.run(
                ["bash", "build/executable.sh"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=7200,  # the first release build compiles CPython and llama.cpp
            )
            if build.returncode != 0:
                pytest.fail(f"build/executable.sh failed:\n{build.stdout[-3000:]}{build.stderr}")
        fcntl.flock(lock, fcntl.LOCK_SH)
        assert os.access(EXE, os.X_OK)
        yield EXE


@dataclass
class Box:
    """A clean machine, as far as the executable can tell: no Python on PATH, nothing from
    the test's environment."""

    root: Path
    env: dict[str, str]
    tmpdir: Path

    def run(self, *args: str, timeout: float = WAIT) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(EXE), *args],
            env=self.env,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Box:
    root = tmp_path_factory.mktemp("box")
    path = "/usr/bin:/bin"
    if shutil.which("python3", path=path) or shutil.which("python", path=path):
        # This machine has a system Python there: offer a PATH of a few basic tools instead.
        bin_dir = root / "bin"
        bin_dir.mkdir()
        for tool in ("sh", "ls", "cat", "env"):
            found = shutil.which(tool, path=path)
            if found:
                (bin_dir / tool).symlink_to(found)
        path = str(bin_dir)
    for name in ("home", "tmp", "work"):
        (root / name).mkdir()
    env = {"PATH": path, "HOME": str(root / "home"), "TMPDIR": str(root / "tmp")}
    return Box(root=root / "work", env=env, tmpdir=root / "tmp")


@dataclass
class Node:
    proc: subprocess.Popen[bytes]
    url: str
    data_dir: Path
    stdout_path: Path
    bundle_dir: Path  # where the bootloader unpacked the bundle (sys._MEIPASS)
    http: httpx.Client

    def client_key(self) -> str:
        return json.loads((self.data_dir / "credentials.json").read_text())["client"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def node(executable: Path, box: Box) -> Iterator[Node]:
    port = free_port()
    data_dir = box.root.parent / "data"
    stdout_path = box.root.parent / "node.out"
    with open(stdout_path, "wb") as out:
        proc = subprocess.Popen(
            [str(executable), "--port", str(port), "--data-dir", str(data_dir)],
            env=box.env,
            cwd=box.root,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    http = httpx.Client(timeout=120)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + WAIT
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"the executable exited with {proc.returncode}:\n{stdout_path.read_text()}"
                )
            try:
                if http.get(f"{url}/api/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"no /api/health within {WAIT} s"
            time.sleep(0.05)
        bundles = list(box.tmpdir.glob("_MEI*"))
        assert len(bundles) == 1, bundles
        yield Node(proc, url, data_dir, stdout_path, bundles[0], http)
    finally:
        stop(proc)
        http.close()


def stop(proc: subprocess.Popen[bytes]) -> None:
    """End the node however the tests went. SIGTERM first: the bootloader passes it on to
    the node (its child) and cleans up after it; a SIGKILL to the bootloader alone would
    leave the child running, so any child left after that is killed too."""
    if proc.poll() is not None:
        return
    children = [int(p.name) for p in Path("/proc").iterdir() if _parent_pid(p) == proc.pid]
    proc.terminate()
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.wait()


def finished(node: Node, job_id: str, headers: dict[str, str]) -> dict:
    """The job once it has ended, by long polls, or as it is after WAIT seconds."""
    deadline = time.monotonic() + WAIT
    while True:
        job = node.http.get(
            f"{node.url}/api/v1/jobs/{job_id}", params={"wait": 30}, headers=headers
        ).json()
        if job["status"] in ("completed", "failed", "cancelled") or time.monotonic() > deadline:
            return job


def test_no_python_on_the_path(box: Box) -> None:
    assert shutil.which("python3", path=box.env["PATH"]) is None
    assert shutil.which("python", path=box.env["PATH"]) is None


def test_health_names_the_embedded_model(node: Node) -> None:
    health = node.http.get(f"{node.url}/api/health").json()
    assert health["status"] == "ok"
    assert MODEL in health["models"]
    assert health["miner"]["gpu_info"]["backend"] in ("cpu", "gpu")
    # The model was unpacked from its own section of the executable into the bundle directory.
    assert (node.bundle_dir / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf").stat().st_size > 0


def test_a_job_runs_on_the_embedded_model(node: Node) -> None:
    headers = {"X-Api-Key": node.client_key()}
    body = {"prompt": "Say hello.", "model": MODEL, "params": {"max_tokens": 16}}
    created = node.http.post(f"{node.url}/api/v1/jobs", json=body, headers=headers)
    assert created.status_code == 201, created.text
    job = finished(node, created.json()["job_id"], headers)
    assert job["status"] == "completed", job
    assert job["result"].strip()
    assert job["served_model"] == MODEL


def test_a_receipt_verifies_offline_with_the_executable(node: Node, box: Box) -> None:
    headers = {"X-Api-Key": node.client_key()}
    body = {"prompt": "Name a colour.", "model": MODEL, "params": {"max_tokens": 8}}
    job_id = node.http.post(f"{node.url}/api/v1/jobs", json=body, headers=headers).json()["job_id"]
    job = finished(node, job_id, headers)
    assert job["status"] == "completed", job
    receipt = node.http.get(f"{node.url}/api/v1/receipts/{job['receipt_id']}").text
    (box.root / "receipt.json").write_text(receipt)
    pubkey = node.http.get(f"{node.url}/api/health").json()["node"]["public_key"]
    done = box.run("verify", "receipt.json", "--pubkey", pubkey)
    assert done.returncode == 0 and done.stdout.startswith("VALID"), done.stdout + done.stderr
    (box.root / "forged.json").write_text(receipt.replace('"units":', '"units":1'))
    forged = box.run("verify", "forged.json", "--pubkey", pubkey)
    assert forged.returncode == 1 and forged.stdout.startswith("INVALID")


def test_the_executable_runs_as_a_remote_miner(node: Node, box: Box) -> None:
    """`aitbc-node miner` from the executable serves the node under another model name, so
    only it can take the job."""
    key = box.run(
        "keys", "create", "--role", "miner", "--name", "exe-miner", "--data-dir", str(node.data_dir)
    ).stdout.strip()
    model = node.bundle_dir / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    miner = subprocess.Popen(
        [
            str(EXE),
            "miner",
            "--coordinator",
            f"{node.url}/api",
            "--api-key",
            key,
            "--model",
            f"exe-remote={model}",
            "--data-dir",
            str(box.root / "miner"),
        ],
        env=box.env,
        cwd=box.root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + WAIT
        while "exe-remote" not in node.http.get(f"{node.url}/api/health").json()["models"]:
            assert miner.poll() is None, miner.stdout.read().decode() if miner.stdout else ""
            assert time.monotonic() < deadline, "the miner never registered"
            time.sleep(0.1)
        headers = {"X-Api-Key": node.client_key()}
        body = {"prompt": "Say yes.", "model": "exe-remote", "params": {"max_tokens": 8}}
        job_id = node.http.post(f"{node.url}/api/v1/jobs", json=body, headers=headers).json()[
            "job_id"
        ]
        job = finished(node, job_id, headers)
        assert job["status"] == "completed" and job["miner_id"] == "exe-miner", job
    finally:
        stop(miner)
    assert miner.returncode == 0


def test_lazily_loaded_parts_are_bundled(node: Node) -> None:
    """Litestar builds the OpenAPI document on first request; the explorer page is a data file
    of the aitbc_node package."""
    schema = node.http.get(f"{node.url}/api/schema/openapi.json")
    assert schema.status_code == 200
    assert "/api/v1/jobs" in schema.text
    page = node.http.get(f"{node.url}/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")


@pytest.mark.parametrize(("args", "expected"), CLI_CALLS, ids=[" ".join(a) for a, _ in CLI_CALLS])
def test_cli_command(node: Node, box: Box, args: list[str], expected: str) -> None:
    values = {"{data}": str(node.data_dir), "{url}": f"{node.url}/api", "{key}": node.client_key()}
    args = [values.get(a, a) for a in args]
    done = box.run(*args)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert expected in done.stdout
    assert done.stdout.strip()


def ldd(path: Path, library_path: Path | None) -> dict[str, str]:
    """{library: where it resolves} for one ELF file, as the bootloader's child would load it
    (it runs with LD_LIBRARY_PATH set to the bundle directory)."""
    env = {"PATH": "/usr/bin:/bin"}
    if library_path:
        env["LD_LIBRARY_PATH"] = str(library_path)
    done = subprocess.run(["ldd", str(path)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"ldd {path}: {done.stdout}{done.stderr}"
    resolved = {}
    for line in done.stdout.splitlines():
        line = line.strip()
        if "=>" in line:
            name, _, where = line.partition("=>")
            resolved[name.strip()] = where.split("(")[0].strip()
        elif line and line != "statically linked":  # an extension module that needs no library
            name = line.split()[0]
            resolved[Path(name).name] = name
    return resolved


def test_needs_only_glibc_from_the_system(node: Node) -> None:
    bundle = node.bundle_dir
    problems = []
    for name, where in ldd(EXE, None).items():
        if where == "not found" or not (GLIBC.match(name) or BOOTLOADER_EXTRA.match(name)):
            problems.append(f"{EXE.name}: {name} => {where}")
    libraries = [
        p for p in bundle.rglob("*") if SHARED_LIBRARY.search(p.name) and not p.is_symlink()
    ]
    assert len(libraries) > 20
    from_bundle = set()
    for library in libraries:
        for name, where in ldd(library, bundle).items():
            if where == "not found":
                problems.append(f"{library.relative_to(bundle)}: {name} not found")
            elif Path(where).resolve().is_relative_to(bundle.resolve()):
                from_bundle.add(name)
            elif not GLIBC.match(name):
                problems.append(f"{library.relative_to(bundle)}: {name} => {where} (system)")
    assert not problems, "\n".join(problems)
    for name in MUST_BE_BUNDLED:
        assert any(b.startswith(name) for b in from_bundle), f"{name} is not taken from the bundle"
    assert any(b.startswith(OPENMP) for b in from_bundle), "no OpenMP runtime from the bundle"


def test_the_running_node_maps_only_glibc_from_the_system(node: Node) -> None:
    """What the node process really loaded (the bootloader's child), from /proc/PID/maps."""
    children = [int(p.name) for p in Path("/proc").iterdir() if _parent_pid(p) == node.proc.pid]
    assert len(children) == 1, children
    mapped = set()
    for line in Path(f"/proc/{children[0]}/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and SHARED_LIBRARY.search(fields[5]):
            mapped.add(fields[5])
    bundle = str(node.bundle_dir.resolve()) + "/"
    system = [m for m in mapped if not m.startswith(bundle)]
    # glibc's character set converters (gconv modules) are glibc too.
    assert [m for m in system if not (GLIBC.match(Path(m).name) or "/gconv/" in m)] == []
    inside = [m.removeprefix(bundle) for m in mapped if m.startswith(bundle)]
    assert any(name in i for name in OPENMP for i in inside), f"no OpenMP runtime: {inside}"
    for name in [
        *MUST_BE_BUNDLED,
        "libpython3",
        "libllama.so",
        "libggml-cpu",  # libggml-cpu.so, or the variant picked (libggml-cpu-haswell.so...)
        "nacl/_sodium",
        "apsw/",
    ]:
        assert any(name in i for i in inside), f"{name} is not loaded from the bundle: {inside}"


def _parent_pid(proc_dir: Path) -> int | None:
    if not proc_dir.name.isdigit():
        return None
    try:
        stat = (proc_dir / "stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[1])


def test_sigterm_stops_the_node_cleanly(node: Node) -> None:
    # Keep this test last in the file: it ends the module's node.
    node.proc.send_signal(signal.SIGTERM)
    assert node.proc.wait(timeout=120) == 0
    assert "stopped cleanly" in node.stdout_path.read_text()
    assert not node.bundle_dir.exists(), "the bootloader left its unpacked bundle behind"


def test_the_release_is_signed_and_verifies_with_standard_tools(
    executable: Path, tmp_path: Path
) -> None:
    """build/executable.sh writes SHA256SUMS and signs it with the release key; a user checks a
    download with sha256sum and openssl alone, and a changed file or sum is caught."""
    dist = executable.parent
    sums, signature, public_key = (
        dist / "SHA256SUMS",
        dist / "SHA256SUMS.sig",
        dist / "aitbc-node-release.pem",
    )
    assert f"  {executable.name}\n" in sums.read_text()
    assert len(signature.read_bytes()) == 64

    def check(*args: str, cwd: Path = dist) -> subprocess.CompletedProcess[str]:
        return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=WAIT)

    def openssl_verify(signed: Path) -> subprocess.CompletedProcess[str]:
        return check(
            "openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(public_key), "-rawin",
            "-in", str(signed), "-sigfile", str(signature),
        )  # fmt: skip

    assert check("sha256sum", "--check", "--ignore-missing", "SHA256SUMS").returncode == 0
    verified = openssl_verify(sums)
    assert verified.returncode == 0 and "Signature Verified Successfully" in verified.stdout

    # Another executable under the same name fails the sums; altered sums fail the signature.
    (tmp_path / executable.name).write_bytes(b"#!/bin/sh\necho not the node\n")
    (tmp_path / "SHA256SUMS").write_bytes(sums.read_bytes())
    assert check("sha256sum", "--check", "SHA256SUMS", cwd=tmp_path).returncode != 0
    text = sums.read_text()
    (tmp_path / "SHA256SUMS").write_text(("1" if text[0] == "0" else "0") + text[1:])
    assert openssl_verify(tmp_path / "SHA256SUMS").returncode != 0
