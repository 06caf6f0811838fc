#!/usr/bin/env bash
# The GPU check in one command, for a CUDA machine (an H100) with no network: report the
# toolchain, install the wheels that tests/bench/gpu_prepare_offline.sh put in .gpu/ for this
# Python, build llama-cpp-python from .gpu's sdist with CUDA for sm_90, then run
# tests/bench/gpu_node_check.sh and tests/bench/gpu_engine_check.py on .gpu/model.gguf.
#
#   OUT=/some/folder bash tests/bench/gpu_check_offline.sh     (in the repository root)
#
# $OUT receives build.log, engine.log and the node check's node.log, health.json and
# job1-3.json. About 4 minutes on 16 cores, 3 of them the build; every step has a time
# limit, under 9 minutes in all. A second run on the same machine reuses /tmp/site and skips
# the build. Not collected by pytest.
set -uo pipefail
cd "$(dirname "$0")/../.."
GPU_DIR=${GPU_DIR:-.gpu}
OUT=${OUT:-$(mktemp -d)}
SITE=/tmp/site # where gpu_node_check.sh looks for its installed packages
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16}
export CMAKE_ARGS=${CMAKE_ARGS:-"-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_NATIVE=off \
-DLLAMA_BUILD_TESTS=off -DLLAMA_BUILD_EXAMPLES=off -DLLAMA_BUILD_TOOLS=off"}
mkdir -p "$OUT"

python3 --version
nvidia-smi -L
nvcc --version || ls -d /usr/local/cuda*/bin
command -v nvcc >/dev/null || PATH=$PATH:$(ls -d /usr/local/cuda*/bin 2>/dev/null | head -1)
echo "cmake: $(cmake --version 2>/dev/null | head -1)" "ninja: $(ninja --version 2>/dev/null)"
py=$(python3 -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
wheels=$GPU_DIR/whl-$py
[ -d "$wheels" ] || { echo "no wheels for Python $py: $GPU_DIR has $(ls -d "$GPU_DIR"/whl-*)"; exit 1; }
if ! command -v curl >/dev/null; then # gpu_node_check.sh polls /api/health with curl
  mkdir -p /tmp/shim && export PATH=/tmp/shim:$PATH
  printf '#!/bin/sh\nexec python3 -c "import sys, urllib.request as u; %s" "$@" 2>/dev/null\n' \
    'sys.stdout.buffer.write(u.urlopen(sys.argv[-1], timeout=5).read())' > /tmp/shim/curl
  chmod +x /tmp/shim/curl
fi

if [ ! -d "$SITE/litestar" ]; then
  timeout 60 python3 -m pip install -q --no-deps --target "$SITE" "$GPU_DIR"/whl/*.whl \
    "$wheels"/*.whl || exit 1
fi
if [ ! -d "$SITE/llama_cpp" ]; then
  # --no-build-isolation: the build backend (scikit-build-core) is the one just installed.
  started=$SECONDS
  PYTHONPATH=$SITE timeout 300 python3 -m pip install -v --no-deps --no-build-isolation \
    --target "$SITE" "$GPU_DIR"/llama_cpp_python-*.tar.gz > /tmp/build.log 2>&1
  status=$?
  tail -c 8000000 /tmp/build.log > "$OUT/build.log"
  echo "llama-cpp-python build: exit status $status after $((SECONDS - started)) s"
  [ $status = 0 ] || { tail -40 /tmp/build.log; exit 1; }
fi

# The node's Python packages only: a venv without the image's site-packages (its pandas and
# pyarrow, which sqlite-utils would import, abort a process that loaded CUDA's libraries).
[ -x /tmp/gpu-venv/bin/python3 ] || python3 -m venv --without-pip /tmp/gpu-venv
export PATH=/tmp/gpu-venv/bin:$PATH

echo "== node check"
GPU_DIR=$GPU_DIR MODEL=$GPU_DIR/model.gguf OUT=$OUT timeout -k 10 100 \
  bash tests/bench/gpu_node_check.sh
echo "node check exit status: $?"

echo "== engine check"
PYTHONPATH=$SITE:$PWD timeout -k 10 50 python3 -X faulthandler tests/bench/gpu_engine_check.py \
  "$GPU_DIR/model.gguf" > "$OUT/engine.log" 2>&1
status=$?
grep -E '^gpu' "$OUT/engine.log"
[ $status = 0 ] || tail -30 "$OUT/engine.log"
echo "engine check exit status: $status"
