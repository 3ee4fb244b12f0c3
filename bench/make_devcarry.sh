#!/usr/bin/env bash
# make_devcarry.sh — prepares a CUDA build that can travel to a GPU machine that has the CUDA toolkit,
# PyTorch and transformers but none of our Debian libraries (OpenBLAS, inih, cJSON, PCRE2, Criterion):
# builds into .devcarry/build (git-ignored; -march=native off, since the GPU host's CPU may differ),
# copies the shared libraries kvhost and test_cuda need (except glibc and CUDA's own) into
# .devcarry/build/lib, and xz-compresses OpenBLAS to stay under the 64 MiB carry limit.
#
# usage (here):   bench/make_devcarry.sh
# then (there):   xz -dk .devcarry/build/lib/*.xz 2>/dev/null; export LD_LIBRARY_PATH=$PWD/.devcarry/build/lib
#                 [ "$PWD" = /work/main ] || { mkdir -p /work && ln -sfn "$PWD" /work/main; }  # baked paths
#                 .devcarry/build/test_cuda --verbose; bench/gpu_bench.sh .devcarry/build $OUT
set -euo pipefail
cd "$(dirname "$0")/.."
EXCL=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$EXCL")"
grep -qx '/.devcarry/' "$EXCL" 2>/dev/null || echo '/.devcarry/' >> "$EXCL"
B=.devcarry/build
cmake -S . -B "$B" -DKVH_CUDA=ON -DKVH_NATIVE=OFF -DCMAKE_BUILD_TYPE=Release >/dev/null
make -C "$B" -j"$(nproc)" kvhost test_cuda window sink h2o pyramid int8 int4 minicache tova scissorhands \
  tp_report 2>&1 | grep -E "error|warning" || true
mkdir -p "$B/lib"
for f in $(ldd "$B/kvhost" "$B/test_cuda" | awk '/=>/{print $3}' | sort -u); do
  case "$(basename "$f")" in
    libc.so*|libm.so*|libdl.so*|libpthread.so*|librt.so*|libresolv.so*|libgcc_s.so*|libstdc++.so*) continue ;;
    libcuda*|libcublas*|libcudart*) continue ;;
  esac
  if [ "$(basename "$f")" = libopenblas.so.0 ]; then
    xz -T0 -6 -c "$f" > "$B/lib/libopenblas.so.0.xz"
  else
    cp -L "$f" "$B/lib/"
  fi
done
du -sh "$B/lib" "$B"
