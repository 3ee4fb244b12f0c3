#!/usr/bin/env bash
# gpu_bench.sh — issue #6's GPU benchmark, one script run on one GPU: kvhost --backend cuda vs Hugging Face
# transformers (eager GPT2LMHeadModel, fp16, same shapes, random init) decoding random:gpt2-medium and
# random:gpt2-large at batch 1 and 32, prompt 512 + 512 new tokens; plugin overhead at equal retained
# tokens (window.so with a budget above the sequence length vs no plugin); the CUDA graph on and off at
# batch 1; the device bandwidth (device-to-device copy) for the roofline. Raw records go to
# RESULTS/gpu_bench.jsonl, the summary to RESULTS/summary.md.
#
# usage: bench/gpu_bench.sh BUILD_DIR [RESULTS_DIR]     (RESULTS_DIR default: docs/results/gpu)
#   BUILD_DIR holds kvhost and plugins/ (a CUDA-enabled build); if BUILD_DIR/lib exists it is put on
#   LD_LIBRARY_PATH (shared libraries carried to a machine without our Debian packages).
#   KVH_BENCH_QUICK=1 runs 64 + 64 tokens with one repeat (a smoke test of the script).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:?usage: bench/gpu_bench.sh BUILD_DIR [RESULTS_DIR]}
RES=${2:-docs/results/gpu}
PY=${PYTHON:-python3}
mkdir -p "$RES"
[ -d "$BUILD/lib" ] && export LD_LIBRARY_PATH="$BUILD/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
KVH="$BUILD/kvhost"
[ -x "$KVH" ] || { echo "gpu_bench: $KVH not found (build with -DKVH_CUDA=ON)"; exit 1; }
P=512; N=512; REP=3
if [ "${KVH_BENCH_QUICK:-0}" = 1 ]; then P=64; N=64; REP=1; fi
RUN="$RES/gpu_bench.jsonl"
: > "$RUN"
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv | tee "$RES/device.txt"
$PY bench/hf_gpu_bench.py membw >> "$RUN"

common=(generate --backend cuda --prompt-tokens $P --max-new $N --warmup 1 --repeats $REP --quiet --json "$RUN")
for model in gpt2-medium gpt2-large; do
  for B in 1 32; do
    echo "== kvhost $model batch $B"
    "$KVH" "${common[@]}" --model random:$model --batch $B
    echo "== transformers $model batch $B"
    $PY bench/hf_gpu_bench.py decode --preset $model --batch $B --prompt-tokens $P --max-new $N --warmup 1 \
        --repeats $REP >> "$RUN"
  done
done

# plugin overhead at equal retained tokens: the window keeps everything (budget > P + N), so any difference
# is the cost of the hooks and the metadata syncs.
BUDGET=$((P + N + 64))
for B in 1 32; do
  echo "== kvhost gpt2-medium batch $B, window.so budget $BUDGET"
  "$KVH" "${common[@]}" --model random:gpt2-medium --batch $B --plugin-path "$BUILD/plugins" \
      --plugins window.so --set cache.budget=$BUDGET --tag plugin=window-nop
done
# an evicting window (budget 256) for reference: fewer KV bytes read per step
"$KVH" "${common[@]}" --model random:gpt2-medium --batch 1 --plugin-path "$BUILD/plugins" \
    --plugins window.so --set cache.budget=256 --tag plugin=window-256
# launch overhead: the same decode without the CUDA graph
KVH_CUDA_GRAPH=0 "$KVH" "${common[@]}" --model random:gpt2-medium --batch 1 --tag graph=off
KVH_CUDA_GRAPH=0 "$KVH" "${common[@]}" --model random:gpt2-large --batch 1 --tag graph=off

$PY bench/hf_gpu_bench.py summarize "$RUN" | tee "$RES/summary.md"
