#!/usr/bin/env bash
# gpu_check.sh — issue #18's whole GPU check as one device call: unpack what bench/make_devcarry.sh
# prepared, find the CUDA libraries, run test_cuda (CPU vs CUDA logits, evictions, int8/int4 encoder bytes,
# score reports; the tiny model included), a smoke test of `--backend auto`, compute-sanitizer's memcheck
# over the small configurations, then bench/gpu_bench.sh with the time that is left. Everything goes under OUT (at most 8 files, as the device tool returns):
#
#   check.log        this script's log: library search, test verdicts, the bench's progress
#   device.txt       nvidia-smi's name, driver, memory, clocks
#   test_cuda.log    Criterion's verbose output
#   gpu_bench.jsonl  raw records (docs/results/gpu/ gets them)
#   summary.md       the report tables (bench/hf_gpu_bench.py summarize)
#
# usage (GPU machine, repo root):  bench/gpu_check.sh [OUT]        (default: $OUT)
#   KVH_GPU_BUDGET_S=480   seconds this script may take in all; the bench gets what test_cuda leaves,
#                          less 15 s for the summary. Call the device tool with timeout_s a little above.
#   KVH_GPU_SKIP_TESTS=1   bench only (a second call after test_cuda already passed)
# usage (here, no GPU):  bench/gpu_check.sh --dry-run [OUT]
#   runs the same steps on this machine's build: test_cuda (its GPU tests skip with the reason) and the
#   bench with KVH_BENCH_QUICK=1 on the CPU backend (random:gpt2 unless KVH_BENCH_MODELS says otherwise;
#   the peer on torch's CPU when a python3 with transformers is first on PATH). A check of the script
#   itself; its figures mean nothing. KVH_GPU_BUILD=DIR takes the build from DIR instead of
#   .devcarry/build (tests/gpu_check_dryrun.sh: CTest's build, the tiny model).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = --dry-run ]; then DRY=1; shift; fi
OUTDIR=${1:-${OUT:?usage: bench/gpu_check.sh [--dry-run] [OUT]}}
mkdir -p "$OUTDIR"
BUDGET=${KVH_GPU_BUDGET_S:-480}
T0=$(date +%s)
LOG="$OUTDIR/check.log"
: > "$LOG"
say() { echo "[gpu_check +$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
verdict=0

B=.devcarry/build
[ $DRY = 1 ] && B=${KVH_GPU_BUILD:-$B}
if [ $DRY = 0 ]; then
  [ -f .devcarry/build.tar.xz ] || { say "no .devcarry/build.tar.xz: run bench/make_devcarry.sh here first and carry it"; exit 1; }
  tar -xJf .devcarry/build.tar.xz || { say "could not unpack .devcarry/build.tar.xz"; exit 1; }
  # the binaries bake /work/main (plugin and test paths) and /work/main/../shared (the tiny model)
  if [ "$(pwd -P)" != "$(cd /work/main 2>/dev/null && pwd -P)" ]; then
    if [ -e /work/main ] && [ ! -L /work/main ]; then  # something else sits there: keep it, out of the way
      mv /work/main "/work/main.before-gpu-check.$$" && say "moved the existing /work/main aside"
    fi
    mkdir -p /work && ln -sfn "$PWD" /work/main && say "linked /work/main -> $PWD (the binaries' baked paths)"
  fi
  # the tests look for /work/main/../shared, which the kernel resolves through the link: the folder
  # beside this checkout's real path
  parent=$(cd .. && pwd -P)
  if [ -f .devcarry/tiny-f16.tar.xz ] && [ ! -e "$parent/shared/models/gpt2-tiny-wt" ]; then
    tar -xJf .devcarry/tiny-f16.tar.xz -C "$parent" && say "tiny model (F16 copy) at $parent/shared/models/gpt2-tiny-wt"
  fi
else
  [ -x "$B/test_cuda" ] || { say "dry run: no $B/test_cuda: run bench/make_devcarry.sh first"; exit 1; }
fi
case $B in /*) ;; *) B="$PWD/$B" ;; esac
export LD_LIBRARY_PATH="$B/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# CUDA's own libraries are not carried: find them where this machine keeps them if the loader does not.
missing() { ldd "$B/kvhost" "$B/test_cuda" 2>/dev/null | awk '/not found/{print $1}' | sort -u; }
if [ -n "$(missing)" ]; then
  say "not found by the loader: $(missing | tr '\n' ' ')"
  dirs=$(ls -d /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda-*/lib64 \
             /usr/local/cuda-*/targets/x86_64-linux/lib 2>/dev/null)
  dirs+=" $(python3 -c 'import glob, os, nvidia; print(" ".join(sorted({os.path.dirname(p) for d in nvidia.__path__
            for p in glob.glob(os.path.join(d, "**", "lib*.so*"), recursive=True)})))' 2>/dev/null)"
  for lib in $(missing); do
    for d in $dirs; do
      if [ -e "$d/$lib" ]; then export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$d"; say "found $lib in $d"; break; fi
    done
  done
  [ -z "$(missing)" ] || { say "still missing: $(missing | tr '\n' ' '); stopping"; exit 1; }
fi

if [ $DRY = 0 ]; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.free,clocks.max.sm,clocks.max.mem \
    --format=csv > "$OUTDIR/device.txt" 2>&1
  say "device: $(tail -1 "$OUTDIR/device.txt")"
  python3 bench/hf_gpu_bench.py check 2>&1 | tee -a "$LOG"
fi

# The device must run kvhost's CUDA backend before anything else is worth its time: a driver older than the
# CUDA runtime the build was made with (nvcc 13 needs R580+) would make every GPU test skip, test_cuda exit
# 0 and --backend auto fall back to the CPU, a "pass" that measured nothing.
if [ $DRY = 0 ]; then
  if ! "$B/kvhost" generate --backend cuda --model random:gpt2 --prompt-tokens 16 --max-new 4 --quiet >> "$LOG" 2>&1; then
    say "kvhost --backend cuda does not run here (its message is above in check.log): stopping, nothing measured"
    say "done: verdict FAIL"
    exit 1
  fi
  say "kvhost --backend cuda runs"
fi

if [ "${KVH_GPU_SKIP_TESTS:-0}" != 1 ]; then
  say "test_cuda (at most 240 s)"
  timeout --kill-after=5 240 "$B/test_cuda" --verbose > "$OUTDIR/test_cuda.log" 2>&1
  rc=$?
  grep -E "^\[====\] Synthesis|FAIL|Assertion|skip" "$OUTDIR/test_cuda.log" | head -60 | tee -a "$LOG"
  say "test_cuda exit $rc"
  [ $rc -eq 0 ] || verdict=1
  # --backend auto picks the GPU when there is one, and says so in the record's backend field
  rm -f "$OUTDIR/auto.jsonl"
  if "$B/kvhost" generate --backend auto --model random:gpt2 --prompt-tokens 16 --max-new 4 --quiet \
       --json "$OUTDIR/auto.jsonl" >> "$LOG" 2>&1; then
    chose=$(python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())["backend"])' "$OUTDIR/auto.jsonl")
    say "--backend auto chose: $chose"
    if [ $DRY = 0 ] && [ "$chose" != cuda ]; then say "--backend auto should have chosen cuda here"; verdict=1; fi
  else
    say "--backend auto: FAILED"; verdict=1
  fi
  rm -f "$OUTDIR/auto.jsonl"
  # compute-sanitizer's memcheck over the small configurations (every kernel family: dense attention on
  # both head-size paths, prefill + decode, ragged batches, the int8/int4 encoder, score reports,
  # compaction copies): an out-of-bounds access is named with its kernel, which wrong logits are not.
  # At most 90 s; its verdict counts like test_cuda's.
  if [ $DRY = 0 ] && command -v compute-sanitizer > /dev/null; then
    say "compute-sanitizer memcheck (at most 90 s)"
    cases=(small_model_decode odd_head_size_long_prompt ragged_batch_and_all_logits quant_encode_bytes_match_kvq_encode
           report_tova_matches_cpu eviction_window_int8_same_positions)
    for t in "${cases[@]}"; do
      timeout --kill-after=5 $(( 90 / ${#cases[@]} )) compute-sanitizer --tool memcheck --target-processes all --error-exitcode 9 \
        "$B/test_cuda" --jobs 1 --filter "cuda/$t" >> "$OUTDIR/test_cuda.log" 2>&1
      rc=$?
      say "memcheck $t: exit $rc$([ $rc = 124 ] && echo ' (time limit: not a verdict)')"
      case $rc in 0|124|137) ;; *) verdict=1 ;; esac
    done
  fi
fi

left=$(( BUDGET - ($(date +%s) - T0) - 15 ))
say "bench with $left s left"
if [ $DRY = 0 ]; then
  KVH_BENCH_DEADLINE=$(( $(date +%s) + left )) bench/gpu_bench.sh "$B" "$OUTDIR" >> "$LOG" 2>&1 || verdict=1
else
  KVH_BENCH_DEADLINE=$(( $(date +%s) + left )) KVH_BENCH_QUICK=1 KVH_BENCH_BACKEND=cpu \
    KVH_BENCH_MODELS=${KVH_BENCH_MODELS:-gpt2} \
    bench/gpu_bench.sh "$B" "$OUTDIR" >> "$LOG" 2>&1 || verdict=1
fi
sed -n '/^device:/,$p' "$OUTDIR/summary.md" 2>/dev/null | head -80
say "done: verdict $([ $verdict = 0 ] && echo PASS || echo FAIL) (details in check.log, test_cuda.log)"
exit $verdict
