"""Build llama.cpp's `llama-server` from the sources vendored in llama-cpp-python, cached.

    .venv/bin/python tests/bench/llama_server.py [--jobs 2]

prints the path of a `llama-server` built from the same llama.cpp the node runs: the sdist of
the installed llama-cpp-python version (`llama_cpp.__version__`), its `vendor/llama.cpp`. The
first run downloads the sdist with pip (`pip download --no-binary :all:`, which pip's cache
answers offline once it has seen it; or set AITBC_LLAMA_SDIST to a tarball) and compiles the
`llama-server` target alone (several minutes on two cores). The result is cached in

    ~/.cache/aitbc-node/llama-server/<version>-<hash of the cmake arguments>/llama-server

(AITBC_BENCH_CACHE replaces `~/.cache/aitbc-node/llama-server`), so later runs take a
second. `-DGGML_NATIVE=ON` is what pip's own build of llama-cpp-python uses by default, so the
two run the same kernels on the same CPU; a binary built that way is for this machine only,
which is why the cache lives in the home directory and not in the repository.

The benchmark imports `ensure_llama_server()`. Not collected by pytest.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

# The options this llama.cpp version knows (its CMakeLists.txt): LLAMA_CURL is deprecated
# and ignored there, HTTPS now comes from LLAMA_OPENSSL; the server lives under tools/ and is
# switched by LLAMA_BUILD_SERVER; its web UI would be fetched from the network unless both UI
# switches are off (the benchmark needs only the HTTP API). Static libraries make the cached
# binary self-contained; the compute kernels are the same as in pip's shared build.
CMAKE_ARGS: tuple[str, ...] = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_COMMON=ON",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
)
TARGET = "llama-server"


def llama_cpp_version() -> str:
    """The version of the installed llama-cpp-python (the node's inference library)."""
    import llama_cpp

    return llama_cpp.__version__


def cache_root() -> Path:
    """Where built servers are kept: $AITBC_BENCH_CACHE or ~/.cache/aitbc-node/llama-server."""
    env = os.environ.get("AITBC_BENCH_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "aitbc-node" / "llama-server"


def cache_dir(version: str) -> Path:
    """The directory of one build: the version and a short hash of the cmake arguments."""
    digest = hashlib.sha256("\n".join(CMAKE_ARGS).encode()).hexdigest()[:10]
    return cache_root() / f"{version}-{digest}"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path`, so two benchmarks never build the same thing at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _sdist(version: str, workdir: Path) -> Path:
    """The llama-cpp-python sdist: $AITBC_LLAMA_SDIST, or one downloaded with pip."""
    given = os.environ.get("AITBC_LLAMA_SDIST")
    if given:
        return Path(given).expanduser()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--disable-pip-version-check",
            "--quiet",
            "--no-deps",
            "--no-binary",
            ":all:",
            f"llama-cpp-python=={version}",
            "-d",
            str(workdir),
        ],
        check=True,
    )
    (found,) = workdir.glob("llama_cpp_python-*.tar.gz")
    return found


def _extract_llama_cpp(sdist: Path, dest: Path) -> Path:
    """Unpack only `vendor/llama.cpp` of the sdist into `dest`; returns its directory."""
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in f"{m.name}/"]
        if not members:
            raise SystemExit(f"{sdist} holds no vendor/llama.cpp")
        # The "data" filter refuses links and paths outside `dest` (Python 3.11.4+).
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(dest, members=members, **kwargs)
    (source,) = dest.glob("*/vendor/llama.cpp")
    if not (source / "tools" / "server" / "CMakeLists.txt").exists():
        raise SystemExit(f"{sdist} has no tools/server (a slimmed sdist?): use pip's own")
    return source


def build(version: str, dest: Path, jobs: int, log=sys.stderr) -> float:
    """Configure and build the `llama-server` target into `dest`; returns the seconds taken."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="llama-server-build-", dir=dest.parent) as tmp:
        work = Path(tmp)
        print(f"building {TARGET} from llama-cpp-python {version} in {work} ...", file=log)
        source = _extract_llama_cpp(_sdist(version, work), work / "src")
        build_dir = work / "build"
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        subprocess.run(
            ["cmake", "-S", str(source), "-B", str(build_dir), *generator, *CMAKE_ARGS],
            check=True,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        subprocess.run(
            ["cmake", "--build", str(build_dir), "--target", TARGET, "-j", str(jobs)],
            check=True,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        seconds = time.monotonic() - started
        # Assembled beside the cache entry and renamed into place, so an interrupted build
        # never leaves an entry that looks finished.
        staging = work / "out"
        staging.mkdir()
        shutil.copy2(build_dir / "bin" / TARGET, staging / TARGET)
        info = {
            "llama_cpp_python": version,
            "cmake_args": list(CMAKE_ARGS),
            "build_seconds": round(seconds, 1),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (staging / "build-info.json").write_text(json.dumps(info, indent=2) + "\n")
        staging.rename(dest)
    return seconds


def ensure_llama_server(jobs: int = 2, log=sys.stderr) -> Path:
    """The path of the cached `llama-server` for the installed llama-cpp-python, built first
    if it is not there yet."""
    version = llama_cpp_version()
    dest = cache_dir(version)
    binary = dest / TARGET
    if binary.exists():
        return binary
    with _locked(cache_root() / ".build.lock"):
        if not binary.exists():  # another process may have built it while this one waited
            seconds = build(version, dest, jobs, log)
            print(f"built {TARGET} in {seconds:.0f} s", file=log)
    return binary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2, help="parallel compile jobs (default 2)")
    args = parser.parse_args()
    print(ensure_llama_server(args.jobs))


if __name__ == "__main__":
    main()
