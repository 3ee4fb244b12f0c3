#!/usr/bin/env bash
# ci_valgrind.sh — valgrind memcheck of an end-to-end `kvhost generate` with two policy plugins (sink on
# the first layers, window on the rest, a small budget so evictions happen every step), two sequences
# (the few-row matmul path) and a chunked prefill (evictions between prompt pieces). Fails on any
# invalid read/write, use of uninitialised values, or definite/indirect leak (--error-exitcode). Third-
# party noise (OpenBLAS, OpenMP, the dynamic loader) is suppressed in tests/valgrind.supp, by library.
# `make test-valgrind` runs it. Model: ../shared/models/gpt2-tiny-wt if present, else random:gpt2.
#
# Environment: BUILD (default build; built with `make build` first), VALGRIND_BUILD (used instead when
# this CPU has AVX-512, which valgrind cannot run: a -DKVH_NATIVE=OFF build, default build-valgrind).
# kvhost picks its kernels at run time from the CPU's features (host/backend/cpu_features.h), so the run is also
# capped at AVX2 with KVH_ISA=avx2 (which makes OpenBLAS run its Haswell kernels too).
set -euo pipefail
cd "$(dirname "$0")/.."
build="${BUILD:-build}"
if grep -q avx512 /proc/cpuinfo 2>/dev/null; then
  build="${VALGRIND_BUILD:-build-valgrind}"
  echo "ci_valgrind: AVX-512 CPU: using a -DKVH_NATIVE=OFF build in $build"
  cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DKVH_NATIVE=OFF -DKVH_TESTS=OFF > /dev/null
  cmake --build "$build" -j "${JOBS:-$(nproc)}" --target kvhost sink window
fi
[ -x "$build/kvhost" ] || { echo "ci_valgrind: $build/kvhost missing: run 'make build' first" >&2; exit 1; }
model="../shared/models/gpt2-tiny-wt"
[ -f "$model/model.safetensors" ] || model="random:gpt2"
log="$build/valgrind.log"
start=$(date +%s)
set +e
KVH_ISA=avx2 OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 valgrind --tool=memcheck --error-exitcode=99 --leak-check=full \
  --show-leak-kinds=definite,indirect --errors-for-leak-kinds=definite,indirect --track-origins=yes \
  --suppressions=tests/valgrind.supp --log-file="$log" \
  "$build/kvhost" generate --model "$model" --threads 1 --quiet --max-new 12 \
  --prompt "The history of the city begins with a small market by the river, where" \
  --plugin-path "$build/plugins" --plugins sink.so,window.so \
  --set sink.layers=0-1 --set window.layers=2-5 --set cache.budget=8 --set cache.slack=2 \
  --set cache.prefill_chunk=6 --batch 2 > "$build/valgrind.out"
rc=$?
set -e
grep -E "ERROR SUMMARY|definitely lost|indirectly lost" "$log" || true
if [ "$rc" -ne 0 ]; then
  echo "ci_valgrind: FAILED (exit $rc): valgrind log $log" >&2
  grep -E -A12 "^==[0-9]+== (Invalid|Conditional|Use of|Syscall|Mismatched|[0-9,]+ bytes in)" "$log" | head -120 >&2
  exit 1
fi
echo "ci_valgrind: clean ($model, sink + window plugins) in $(( $(date +%s) - start ))s"
