#!/usr/bin/env bash
# build_llama_cpp.sh — builds the llama.cpp peer of bench/peer_bench.py (llama-bench, CPU only) outside
# the repository, from one of:
#   - a llama-cpp-python source distribution from PyPI (its vendor/llama.cpp tree; the llama.cpp commit is
#     read from the sdist's CHANGELOG.md "update llama.cpp to ggml-org/llama.cpp@COMMIT" line), or
#   - a checkout / export of the public llama.cpp source (a directory with CMakeLists.txt and
#     convert_hf_to_gguf.py; the commit is taken from git when it is a work tree, else from LLAMA_COMMIT).
#
# usage: bench/peers/build_llama_cpp.sh SRC [DEST]
#   SRC   llama_cpp_python-X.tar.gz | a llama.cpp source directory
#   DEST  where the tree is copied and built (default /work/peers/llama.cpp); the binaries land in
#         DEST/build/bin (llama-bench). DEST/PEER_SOURCE records where the tree came from and its commit.
#
# Getting an sdist with pip (no other download host needed):
#   python3 -m venv --system-site-packages /work/peers/venv
#   /work/peers/venv/bin/pip download --no-deps --no-binary :all: llama-cpp-python -d /work/peers/src
#   bench/peers/build_llama_cpp.sh /work/peers/src/llama_cpp_python-*.tar.gz
# On 2 cores the build takes about 10-15 minutes (-j2, only the llama-bench target).
set -euo pipefail
SRC=${1:?usage: build_llama_cpp.sh SRC [DEST]}
DEST=${2:-/work/peers/llama.cpp}
JOBS=${JOBS:-$(nproc)}
COMMIT=${LLAMA_COMMIT:-}
ORIGIN=""

if [ -f "$SRC" ]; then
  tmp=$(mktemp -d)
  tar -xzf "$SRC" -C "$tmp"
  top=""
  for d in "$tmp"/*/; do top=$d; break; done
  [ -f "$top/vendor/llama.cpp/CMakeLists.txt" ] || { echo "build_llama_cpp.sh: $SRC has no vendor/llama.cpp" >&2; exit 1; }
  if [ -z "$COMMIT" ] && [ -f "$top/CHANGELOG.md" ]; then
    # the first "update llama.cpp to ...@COMMIT" line after the first released version header
    COMMIT=$(grep -m1 -o 'llama.cpp@[0-9a-f]\{7,40\}' "$top/CHANGELOG.md" | cut -d@ -f2 || true)
  fi
  ORIGIN="$(basename "$SRC") vendor/llama.cpp"
  rm -rf "$DEST"
  mkdir -p "$(dirname "$DEST")"
  cp -a "$top/vendor/llama.cpp" "$DEST"
  rm -rf "$tmp"
  rm -f "$DEST/.git"   # a submodule pointer into the sdist's absent .git/modules
elif [ -d "$SRC" ]; then
  [ -f "$SRC/CMakeLists.txt" ] || { echo "build_llama_cpp.sh: $SRC is not a llama.cpp source tree" >&2; exit 1; }
  if [ -z "$COMMIT" ] && git -C "$SRC" rev-parse --short=9 HEAD >/dev/null 2>&1; then
    COMMIT=$(git -C "$SRC" rev-parse --short=9 HEAD)
  fi
  ORIGIN="llama.cpp source $SRC"
  if [ "$(realpath "$SRC")" != "$(realpath -m "$DEST")" ]; then
    rm -rf "$DEST"
    mkdir -p "$(dirname "$DEST")"
    cp -a "$SRC" "$DEST"
  fi
else
  echo "build_llama_cpp.sh: no such file or directory: $SRC" >&2
  exit 1
fi
COMMIT=${COMMIT:-unknown}
printf 'origin=%s\ncommit=%s\n' "$ORIGIN" "$COMMIT" > "$DEST/PEER_SOURCE"

cmake -S "$DEST" -B "$DEST/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF -DGGML_BLAS=OFF \
  -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_COMMIT="$COMMIT" -DBUILD_SHARED_LIBS=OFF
cmake --build "$DEST/build" -j "$JOBS" --target llama-bench
"$DEST/build/bin/llama-bench" --help >/dev/null
echo "built $DEST/build/bin/llama-bench (llama.cpp $COMMIT, from $ORIGIN)"
