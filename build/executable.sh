#!/usr/bin/env bash
# Builds the one-file Linux executable of aitbc-node with PyInstaller, from .venv:
#   bash build/executable.sh              dist/aitbc-node: the node and its embedded default model
#   bash build/executable.sh --no-model   dist/aitbc-node-nomodel: bring your own GGUF (--model)
#   bash build/executable.sh --compress   zlib-compress the bundled libraries: ~70 MB smaller,
#                                         ~0.3 s slower at every start (see packaging/README.md)
# It also writes dist/SHA256SUMS, signed with the release key (build/sign_release.py).
# The spec is packaging/aitbc-node.spec; work files go to build/work/. The first build takes
# about a minute on two cores; later ones reuse PyInstaller's analysis cache.
set -euo pipefail
cd "$(dirname "$0")/.."

model=yes
compress=0
for arg in "$@"; do
  case "$arg" in
    --no-model) model=no ;;
    --compress) compress=1 ;;
    -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
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
AITBC_BUNDLE_MODEL="$gguf" AITBC_EXE_NAME="$name" AITBC_COMPRESS="$compress" \
  .venv/bin/pyinstaller --noconfirm --log-level WARN \
  --workpath build/work --distpath dist packaging/aitbc-node.spec

size=$(stat -c %s "dist/$name")
echo "built dist/$name ($((size / 1000000)) MB)"
"dist/$name" --version
# dist/SHA256SUMS, signed with the release key (see build/sign_release.py and the README's
# "Verifying a download").
.venv/bin/python build/sign_release.py dist
