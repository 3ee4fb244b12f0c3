#!/usr/bin/env bash
# gpu_bench.sh — issue #6's GPU benchmark, one script run on one GPU: kvhost --backend cuda vs Hugging Face
# transformers (eager GPT2LMHeadModel, fp16, same shapes, random init) decoding random:gpt2-medium and
# random:gpt2-large at batch 1 and 32, prompt 512 + 512 new tokens; plugin overhead at equal retained
# tokens (window.so with a budget above the sequence length vs no plugin); the CUDA graph on and off at
# batch 1; the device bandwidth (device-to-device copy) for the roofline; the quantized KV stores on the
# GPU (int8.so / int4.so against the dense fp16 cache, random:gpt2-medium, 960-token prompt + 64 new =
# 1024 tokens of context, batch 32), the score-report policies (tova.so, scissorhands.so vs h2o.so at budget
# 256, batch 1) and the largest batch that fits under a KV-cache cap
# (KVH_BENCH_KV_CAP, default 2G; `kvhost --mem-limit`, searched by bench/kvbench.py capacity) for
# fp16 / int8 / int4. Raw records go to RESULTS/gpu_bench.jsonl, the summary to RESULTS/summary.md.
#
# usage: bench/gpu_bench.sh BUILD_DIR [RESULTS_DIR]     (RESULTS_DIR default: docs/results/gpu)
#   BUILD_DIR holds kvhost and plugins/ (a CUDA-enabled build); if BUILD_DIR/lib exists it is put on
#   LD_LIBRARY_PATH (shared libraries carried to a machine without our Debian packages).
#   KVH_BENCH_QUICK=1 runs 64 + 64 tokens with one repeat (a smoke test of the script); the quantized
#   part then runs 192 + 64 tokens at batch 4 and searches the max batch under a 256M cap up to 16.
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
QP=960; QN=64; QB=32; KV_CAP=${KVH_BENCH_KV_CAP:-2G}; CAP_MAX=256
if [ "${KVH_BENCH_QUICK:-0}" = 1 ]; then P=64; N=64; REP=1; QP=192; QB=4; KV_CAP=256M; CAP_MAX=16; fi
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
# score-report policies (ABI 1.3: the report kernel + one copy per step on the layers that ask) against h2o
# (device score accumulators only) at the same evicting budget: the cost of delivering the rows
for pol in h2o tova scissorhands; do
  echo "== kvhost gpt2-medium batch 1, $pol.so budget 256"
  "$KVH" "${common[@]}" --model random:gpt2-medium --batch 1 --plugins "$BUILD/plugins/$pol.so" \
      --set cache.budget=256 --tag plugin=$pol-256
done
# launch overhead: the same decode without the CUDA graph
KVH_CUDA_GRAPH=0 "$KVH" "${common[@]}" --model random:gpt2-medium --batch 1 --tag graph=off
KVH_CUDA_GRAPH=0 "$KVH" "${common[@]}" --model random:gpt2-large --batch 1 --tag graph=off

# quantized KV stores on the GPU kernels (quant.cuh) vs the dense fp16 cache: QP + QN = 1024 tokens of
# context at batch QB, then the max batch under the KV cap (the cap counts slot bytes, so the packed
# slots fit more sequences). Plugins are passed by path so the search works wherever BUILD was carried.
for store in fp16 int8 int4; do
  plug=()
  [ "$store" = fp16 ] || plug=(--plugins "$BUILD/plugins/$store.so")
  echo "== kvhost gpt2-medium batch $QB, KV store $store, $QP + $QN tokens"
  "$KVH" generate --backend cuda --prompt-tokens $QP --max-new $QN --warmup 1 --repeats $REP --quiet --json "$RUN" \
      --model random:gpt2-medium --batch $QB ${plug[@]+"${plug[@]}"} --tag store=$store
done
for store in fp16 int8 int4; do
  plug=()
  [ "$store" = fp16 ] || plug=(--plugins "$BUILD/plugins/$store.so")
  echo "== max batch under a $KV_CAP KV cap, gpt2-medium, store $store, $QP + $QN tokens"
  $PY bench/kvbench.py capacity --kvhost "$KVH" --backend cuda --model random:gpt2-medium --prompt-tokens $QP \
      --max-new $QN --mem-limit "$KV_CAP" --max-batch $CAP_MAX ${plug[@]+"${plug[@]}"} --label "store=$store" --json "$RUN"
done

$PY bench/hf_gpu_bench.py summarize "$RUN" | tee "$RES/summary.md"
