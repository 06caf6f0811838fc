#!/usr/bin/env bash
# Builds the one-file Linux executable of aitbc-node with PyInstaller:
#   bash build/executable.sh              dist/aitbc-node: the node and its embedded default model
#   bash build/executable.sh --no-model   dist/aitbc-node-nomodel: bring your own GGUF (--model)
#   bash build/executable.sh --compress   zlib-compress the bundled libraries: ~70 MB smaller,
#                                         ~0.3 s slower at every start (see packaging/README.md)
#   bash build/executable.sh --host       build from .venv on this machine instead: quicker,
#                                         and needs no root, but runs only on a CPU and glibc
#                                         like this machine's (development builds)
# By default it builds inside the Debian 11 root that build/release_root.sh prepares (as root;
# the first time takes about 18 minutes on two cores, mostly llama.cpp): an executable that
# runs on glibc 2.31 and newer and on any x86-64 CPU from SSE4.2 on, with llama.cpp's best
# variant for the CPU it finds itself on. It also writes dist/SHA256SUMS, signed with the release key
# (build/sign_release.py). The spec is packaging/aitbc-node.spec.
set -euo pipefail
cd "$(dirname "$0")/.."

model=yes
compress=0
where=release
for arg in "$@"; do
  case "$arg" in
    --no-model) model=no ;;
    --compress) compress=1 ;;
    --host) where=host ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build/executable.sh: unknown option $arg (try --help)" >&2; exit 2 ;;
  esac
done

if [ ! -x .venv/bin/python ] || [ ! -x .venv/bin/pyinstaller ]; then
  echo "build/executable.sh: .venv with PyInstaller is missing; run \`bash build/venv.sh --test\` first" >&2
  exit 1
fi
if [ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]; then
  echo "build/executable.sh: builds the Linux x86_64 executable; this is $(uname -s)-$(uname -m)" >&2
  exit 1
fi
command -v objcopy >/dev/null || {
  echo "build/executable.sh: PyInstaller needs objcopy on Linux (apt-get install binutils)" >&2
  exit 1
}

if [ "$model" = yes ]; then
  name=aitbc-node
  gguf=$(.venv/bin/python - <<'PY'
import sys
from aitbc_node.models import ModelError, embedded_model
try:
    print(embedded_model().path)
except ModelError as e:
    sys.exit(f"build/executable.sh: {e}")
PY
  )
else
  name=aitbc-node-nomodel
  gguf=
fi

# Always assemble a fresh executable: the model section is added after PyInstaller is done.
rm -f "dist/$name"
mkdir -p dist
if [ "$where" = host ]; then
  AITBC_BUNDLE_MODEL="$gguf" AITBC_EXE_NAME="$name" AITBC_COMPRESS="$compress" \
    .venv/bin/pyinstaller --noconfirm --log-level WARN \
    --workpath build/work --distpath dist packaging/aitbc-node.spec
else
  bash build/release_root.sh
  # The sources PyInstaller reads, copied into the root (no bind mounts: a container may not
  # allow them); its analysis cache stays in /opt/pyinstaller-work between builds.
  src=build/work/debian11/opt/src/aitbc-node
  rm -rf "$src" && mkdir -p "$src/model"
  cp -r aitbc_node packaging pyproject.toml "$src/"
  find "$src" -name __pycache__ -prune -exec rm -rf {} +
  bundled=
  if [ -n "$gguf" ]; then
    cp "$gguf" "$src/model/" && bundled=/opt/src/aitbc-node/model/$(basename "$gguf")
  fi
  # PYTHONPATH: aitbc_node is not installed in the root's venv; the spec collects it from here.
  bash build/release_root.sh --run "cd /opt/src/aitbc-node && PYTHONPATH=/opt/src/aitbc-node \
    AITBC_BUNDLE_MODEL='$bundled' \
    AITBC_EXE_NAME='$name' AITBC_COMPRESS='$compress' pyinstaller --noconfirm --log-level WARN \
    --workpath /opt/pyinstaller-work --distpath dist packaging/aitbc-node.spec"
  cp "$src/dist/$name" "dist/$name"
fi

size=$(stat -c %s "dist/$name")
echo "built dist/$name ($((size / 1000000)) MB)"
"dist/$name" --version
# dist/SHA256SUMS, signed with the release key (see build/sign_release.py and the README's
# "Verifying a download").
.venv/bin/python build/sign_release.py dist
