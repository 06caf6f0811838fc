#!/usr/bin/env bash
# The whole node on a CUDA machine: build llama-cpp-python with CUDA (from an sdist in
# $GPU_DIR, offline), serve a few jobs through the built-in miner on $MODEL, print what
# /api/health reports and the tokens/s, stop with SIGTERM, verify the ledger.
#
#   GPU_DIR=.gpu MODEL=.gpu/model.gguf bash tests/bench/gpu_node_check.sh
#
# $GPU_DIR holds llama_cpp_python-*.tar.gz and, under whl/, wheels of whatever Python
# packages the machine lacks. Not collected by pytest. Runs the node under faulthandler, so
# a crash in native code still prints the Python stack.
set -uo pipefail
GPU_DIR=${GPU_DIR:-.gpu}
MODEL=${MODEL:?set MODEL to a GGUF file}
OUT=${OUT:-$(mktemp -d)}
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16}
export CMAKE_ARGS=${CMAKE_ARGS:-"-DGGML_CUDA=on -DGGML_NATIVE=off -DLLAMA_BUILD_TESTS=off -DLLAMA_BUILD_EXAMPLES=off -DLLAMA_BUILD_TOOLS=off"}
if [ ! -d /tmp/site/llama_cpp ]; then
  python3 -m pip install -q --no-index --no-build-isolation --no-deps --target /tmp/site \
    "$GPU_DIR"/llama_cpp_python-*.tar.gz "$GPU_DIR"/whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
data=$(mktemp -d)
python3 -X faulthandler -m aitbc_node serve --port 8080 --data-dir "$data" \
  --model "gpu-model=$MODEL" > "$OUT/node.log" 2>&1 &
node=$!
for _ in $(seq 1 120); do
  curl -sf http://127.0.0.1:8080/api/health > "$OUT/health.json" && break
  kill -0 $node 2>/dev/null || { echo "the node died:"; cat "$OUT/node.log"; exit 1; }
  sleep 0.5
done
python3 - "$OUT/health.json" <<'PY'
import json, sys
miner = json.load(open(sys.argv[1]))["miner"]
info = miner["gpu_info"]
print("health:", miner["state"], miner["models"], info["backend"], info["name"],
      info.get("memory"), "gpu_layers", info["gpu_layers"])
PY
key=$(python3 -c "import json; print(json.load(open('$data/credentials.json'))['client'])")
for i in 1 2 3; do
  python3 -m aitbc_node submit "List the numbers from 1 to 1000 separated by commas: 1, 2, 3," \
    --max-tokens 512 --temperature 0 --wait --json --url http://127.0.0.1:8080/api \
    --api-key "$key" > "$OUT/job$i.json"
  python3 - "$OUT/job$i.json" <<'PY'
import json, sys
from datetime import datetime
job = json.load(open(sys.argv[1]))
t = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00"))
seconds = (t(job["completed_at"]) - t(job["started_at"])).total_seconds()
tokens = job["usage"]["completion_tokens"]
print("job", job["status"], tokens, "tokens,", round(tokens / seconds), "tokens/s through the node")
PY
done
kill -TERM $node; wait $node; echo "node exit status: $?"
python3 -m aitbc_node verify --data-dir "$data"
