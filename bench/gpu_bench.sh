#!/usr/bin/env bash
# gpu_bench.sh — issue #18's GPU figures in one script run: kvhost --backend cuda beside Hugging Face
# transformers (eager GPT2LMHeadModel, fp16, random init, same shapes and prompts) on random:gpt2-medium and
# random:gpt2-large. Stages, most important first, each skipped (with a "skipped" record) when the deadline
# would not leave it time, so a run cut short still has the headline figures:
#
#   membw      device-to-device copy bandwidth (the roofline's denominator)
#   decode     batch 1 at context T = 128 / 512 / 1024 (prompt T - 32, 32 new tokens), both models, kvhost
#              and transformers: ms per token, prefill ms, tokens/s, % of the bandwidth roofline
#   policies   gpt2-large batch 1, prompt 992 + 32: full cache vs window / sink / h2o / pyramid at budget
#              256, int8 / int4 stores, h2o + int8; and the full cache at T = 256 (the same retained
#              tokens as a 256 budget, for the "within 5% at equal retained tokens" goal)
#   batch      batch 8 and 32 at T = 512, both models, kvhost and transformers
#   stores     gpt2-medium batch 32, 960 + 64 tokens, fp16 / int8 / int4 KV
#   overhead   hooks at equal retained tokens (window.so keeping everything vs no plugin, batch 1 / 32),
#              score-report policies (tova, scissorhands vs h2o at 256), the CUDA graph off
#   capacity   max batch at 960 + 64 under a 2G KV cap (fp16 / int8 / int4) and under the GPU's free
#              memory (fp16), by kvbench.py capacity --predict (batch 1, the predicted max and the one
#              above: three probes when the prediction holds)
#
# Raw records go to RESULTS/gpu_bench.jsonl (kvhost generate records tagged stage=..., hf_generate,
# membw, capacity, skipped), the report to RESULTS/summary.md (bench/hf_gpu_bench.py summarize).
#
# usage: bench/gpu_bench.sh BUILD_DIR [RESULTS_DIR]     (RESULTS_DIR default: docs/results/gpu)
#   BUILD_DIR holds kvhost and plugins/ (a CUDA-enabled build); if BUILD_DIR/lib exists it is put on
#   LD_LIBRARY_PATH (shared libraries carried to a machine without our Debian packages).
#   KVH_BENCH_DEADLINE=EPOCH_SECONDS   stop starting stages that would end after it (default: none)
#   KVH_BENCH_KV_CAP=2G                the KV cap of the capacity stage
#   KVH_BENCH_QUICK=1                  small shapes, one repeat (a smoke test of the script)
#   KVH_BENCH_BACKEND=cpu KVH_BENCH_MODELS=gpt2   with QUICK: the whole script on a CPU, the peer on
#                                      torch's CPU (bench/gpu_check.sh --dry-run does this). A model is a
#                                      preset (random: weights; the peer runs it too) or a checkpoint
#                                      directory (kvhost only).
set -uo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:?usage: bench/gpu_bench.sh BUILD_DIR [RESULTS_DIR]}
RES=${2:-docs/results/gpu}
PY=${PYTHON:-python3}
mkdir -p "$RES"
[ -d "$BUILD/lib" ] && export LD_LIBRARY_PATH="$BUILD/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
KVH="$BUILD/kvhost"
PLUG="$BUILD/plugins"
[ -x "$KVH" ] || { echo "gpu_bench: $KVH not found (build with -DKVH_CUDA=ON)"; exit 1; }
BACKEND=${KVH_BENCH_BACKEND:-cuda}
MODELS=${KVH_BENCH_MODELS:-"gpt2-medium gpt2-large"}
read -r -a MODEL_LIST <<< "$MODELS"
BIG=${MODEL_LIST[${#MODEL_LIST[@]}-1]}   # policies on the largest model (gpt2-large)
SMALL=${MODEL_LIST[0]}                   # stores, capacity on gpt2-medium
DEADLINE=${KVH_BENCH_DEADLINE:-0}
KV_CAP=${KVH_BENCH_KV_CAP:-2G}
TS=(128 512 1024); NEW=32; BATCHES=(8 32); BT=512; BUDGET=256; REP=3
QP=960; QN=64; QB=32; CAP_MAX=2048
if [ "${KVH_BENCH_QUICK:-0}" = 1 ]; then
  TS=(64 128); NEW=8; BATCHES=(2 4); BT=64; BUDGET=32; REP=1; QP=96; QN=16; QB=4; KV_CAP=${KVH_BENCH_KV_CAP:-64M}
  CAP_MAX=64
fi
HF_DEVICE=cuda; [ "$BACKEND" = cuda ] || HF_DEVICE=cpu
RUN="$RES/gpu_bench.jsonl"
: > "$RUN"
export PYTHONUNBUFFERED=1
failed=0
START=$(date +%s)

now() { date +%s; }
spec() { case $1 in */*) echo "$1" ;; *) echo "random:$1" ;; esac; }   # preset name or checkpoint dir
skipped() { # stage reason
  echo "== skipped: $1 ($2)"
  printf '{"record":"skipped","stage":"%s","reason":"%s"}\n' "$1" "$2" >> "$RUN"
}
# stage NAME SECONDS: 0 when the deadline leaves SECONDS for it, else a skip record. The estimates are
# guesses for an H100 (model creation a few seconds per kvhost run, a Python start per peer run); the
# log prints when each stage starts, so the first GPU run's log tells the real figures.
stage() {
  if [ "$DEADLINE" != 0 ] && [ $(( $(now) + $2 )) -gt "$DEADLINE" ]; then
    skipped "$1" "deadline: about $2 s needed, $(( DEADLINE - $(now) )) s left"
    return 1
  fi
  echo "== stage $1 (estimate $2 s) at +$(( $(now) - START )) s"
}
# bounded COMMAND...: runs it under the time the deadline leaves; a failure is logged, counted, not fatal
bounded() {
  local left=600
  [ "$DEADLINE" != 0 ] && left=$(( DEADLINE - $(now) ))
  [ "$left" -gt 5 ] || { echo "gpu_bench: no time left for: $*"; failed=$((failed + 1)); return 1; }
  timeout --kill-after=5 "$left" "$@"
  local rc=$?
  [ $rc -eq 0 ] || { echo "gpu_bench: FAILED (exit $rc): $*"; failed=$((failed + 1)); }
  return $rc
}
kv() { # kvhost generate with the common options; the rest of the arguments follow
  bounded "$KVH" generate --backend "$BACKEND" --warmup 1 --repeats $REP --quiet --json "$RUN" "$@"
}
hf() { # the transformers peer (skipped where torch + transformers cannot run, and for checkpoint dirs)
  [ "$HF_OK" = 1 ] || return 0
  case $2 in */*) return 0 ;; esac
  bounded "$PY" bench/hf_gpu_bench.py decode --device "$HF_DEVICE" --warmup 1 --repeats $REP "$@" >> "$RUN"
}
csv() { local IFS=,; echo "$*"; }

if [ "$BACKEND" = cuda ]; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.free,clocks.max.sm,clocks.max.mem \
    --format=csv | tee "$RES/device.txt"
fi
HF_OK=0
if [ "$BACKEND" = cuda ]; then
  "$PY" bench/hf_gpu_bench.py check && HF_OK=1
else
  "$PY" -c "import torch, transformers" 2>/dev/null && HF_OK=1
fi
[ "$HF_OK" = 1 ] || skipped peer "torch + transformers not usable with $PY: kvhost figures only"

if [ "$BACKEND" = cuda ] && stage membw 15; then
  bounded "$PY" bench/hf_gpu_bench.py membw >> "$RUN"
fi

prompts=(); for T in "${TS[@]}"; do prompts+=($((T - NEW))); done
if stage decode $((${#MODEL_LIST[@]} * 60)); then
  for model in "${MODEL_LIST[@]}"; do
    for T in "${TS[@]}"; do
      kv --model $(spec $model) --batch 1 --prompt-tokens $((T - NEW)) --max-new $NEW --tag stage=decode --tag ctx=$T
    done
    hf --preset $model --batch 1 --prompt-tokens "$(csv "${prompts[@]}")" --max-new $NEW --tag stage=decode
  done
fi

if stage policies 90; then
  P=$((TS[${#TS[@]}-1] - NEW))
  base=(--model $(spec $BIG) --batch 1 --max-new $NEW --tag stage=policies)
  kv "${base[@]}" --prompt-tokens $P --tag config=full
  kv "${base[@]}" --prompt-tokens $((BUDGET - NEW)) --tag config=full-at-budget
  for pol in window sink h2o pyramid; do
    kv "${base[@]}" --prompt-tokens $P --plugins "$PLUG/$pol.so" --set cache.budget=$BUDGET --tag config=$pol
  done
  for store in int8 int4; do
    kv "${base[@]}" --prompt-tokens $P --plugins "$PLUG/$store.so" --tag config=$store
  done
  kv "${base[@]}" --prompt-tokens $P --plugins "$PLUG/h2o.so,$PLUG/int8.so" --set cache.budget=$BUDGET \
     --tag config=h2o+int8
fi

if stage batch $((${#MODEL_LIST[@]} * 45)); then
  for model in "${MODEL_LIST[@]}"; do
    for B in "${BATCHES[@]}"; do
      kv --model $(spec $model) --batch $B --prompt-tokens $((BT - NEW)) --max-new $NEW --tag stage=batch --tag ctx=$BT
    done
    hf --preset $model --batch "$(csv "${BATCHES[@]}")" --prompt-tokens $((BT - NEW)) --max-new $NEW --tag stage=batch
  done
fi

if stage stores 45; then
  for store in fp16 int8 int4; do
    plug=(); [ "$store" = fp16 ] || plug=(--plugins "$PLUG/$store.so")
    kv --model $(spec $SMALL) --batch $QB --prompt-tokens $QP --max-new $QN ${plug[@]+"${plug[@]}"} \
       --tag stage=stores --tag store=$store
  done
fi

if stage overhead 60; then
  keep=$((TS[${#TS[@]}-1] + 64))   # a window that never evicts: only the hooks' cost remains
  for B in 1 32; do
    kv --model $(spec $SMALL) --batch $B --prompt-tokens $((BT - NEW)) --max-new $NEW --tag stage=overhead \
       --tag config=none
    kv --model $(spec $SMALL) --batch $B --prompt-tokens $((BT - NEW)) --max-new $NEW --tag stage=overhead \
       --plugins "$PLUG/window.so" --set cache.budget=$keep --tag config=window-keep-all
  done
  for pol in h2o tova scissorhands; do
    kv --model $(spec $SMALL) --batch 1 --prompt-tokens $((TS[${#TS[@]}-1] - NEW)) --max-new $NEW \
       --plugins "$PLUG/$pol.so" --set cache.budget=$BUDGET --tag stage=overhead --tag config=$pol
  done
  if [ "$BACKEND" = cuda ]; then
    for model in "${MODEL_LIST[@]}"; do
      KVH_CUDA_GRAPH=0 kv --model $(spec $model) --batch 1 --prompt-tokens $((BT - NEW)) --max-new $NEW \
        --tag stage=overhead --tag config=graph-off --tag ctx=$BT
    done
  fi
fi

if stage capacity 120; then
  for store in fp16 int8 int4; do
    plug=(); [ "$store" = fp16 ] || plug=(--plugins "$PLUG/$store.so")
    bounded "$PY" bench/kvbench.py capacity --kvhost "$KVH" --backend "$BACKEND" --model $(spec $SMALL) \
      --prompt-tokens $QP --max-new $QN --mem-limit "$KV_CAP" --max-batch $CAP_MAX --predict \
      ${plug[@]+"${plug[@]}"} --label "store=$store" --json "$RUN"
  done
  if [ "$BACKEND" = cuda ]; then
    # the GPU's free memory less the fp16 weights (under 1 GiB for medium) and 8 GiB for the prefill
    # workspace, which chunked prefill (128 tokens a piece) bounds at a batch of hundreds
    free_mib=$(nvidia-smi --query-gpu=memory.free --format=csv,noheader,nounits | head -1)
    cap_mib=$((free_mib - 9 * 1024))
    bounded "$PY" bench/kvbench.py capacity --kvhost "$KVH" --backend cuda --model $(spec $SMALL) \
      --prompt-tokens $QP --max-new $QN --mem-limit "${cap_mib}M" --max-batch 4096 --predict \
      --set cache.prefill_chunk=128 --label "store=fp16,cap=gpu-free" --json "$RUN"
  fi
fi

echo "== all stages done at +$(( $(now) - START )) s"
"$PY" bench/hf_gpu_bench.py summarize "$RUN" | tee "$RES/summary.md"
echo "gpu_bench: $failed command(s) failed; records in $RUN"
[ $failed -eq 0 ]
