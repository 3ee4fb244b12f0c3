#!/usr/bin/env bash
# cpu_decode.sh — issue #2's benchmark: GPT-2 Medium-shaped decode at batch 1 (prompt 128 + 128 new
# tokens) in kvhost and in eager PyTorch with a KV cache, same weights, same script run, plus this
# machine's measured memory read bandwidth. Appends raw records to docs/results/cpu-decode.jsonl and
# writes docs/results/cpu-decode.md.
#
# usage: bench/cpu_decode.sh [BUILD_DIR]      (needs python3-torch: apt-get install python3-torch)
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:-build}
PY=/usr/bin/python3
WORK=${KVH_BENCH_DIR:-/tmp/kvh-bench}
CKPT=$WORK/gpt2-medium-seed1234
OUT=docs/results/cpu-decode.jsonl
RUN=$WORK/run-$(date +%s).jsonl
mkdir -p "$WORK" docs/results
: > "$RUN"

[ -x "$BUILD/kvhost" ] || { echo "build kvhost first (make build)"; exit 1; }
[ -f "$CKPT/model.safetensors" ] || $PY bench/torch_gpt2.py make-checkpoint "$CKPT" --preset gpt2-medium --seed 1234
gcc -O3 -march=native -ffast-math -fopenmp bench/membw.c -o "$WORK/membw"

for threads in 1 2; do
  "$BUILD/kvhost" generate --model "$CKPT" --prompt-tokens 128 --max-new 128 --threads $threads \
      --warmup 1 --repeats 3 --quiet --json "$RUN"
  $PY bench/torch_gpt2.py decode "$CKPT" --prompt-tokens 128 --max-new 128 --threads $threads \
      --warmup 1 --repeats 3 >> "$RUN"
  OMP_NUM_THREADS=$threads "$WORK/membw" >> "$RUN"
done
cat "$RUN" >> "$OUT"
$PY bench/summarize_cpu_decode.py "$RUN" > docs/results/cpu-decode.md
cat docs/results/cpu-decode.md
