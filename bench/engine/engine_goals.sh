#!/usr/bin/env bash
# engine_goals.sh — issue #15's kvhost-only goals, each measured in one run of this script (ratios are
# taken between runs made minutes apart on the same machine, alternating where it matters):
#   paging   batch-1 decode tokens/s with [cache] block_size = 16 vs contiguous slots (block_size = 0),
#            alternated ROUNDS times (random:gpt2-medium, 256-token prompt, 128 new tokens)
#   sharing  N requests of L tokens sharing an Lp-token prefix (the first one alone, then the other N-1
#            together): KV bytes at peak vs the formula Lp + (N-1)(L-Lp) tokens, and their prefill time,
#            with prefix sharing vs without (gpt2-tiny-wt when present, else random:gpt2; block size 8 so
#            Lp = 200 is a whole number of blocks)
#   sharing-policy  the sharing trace under h2o.so (budget 128, slack 32): the part before the first
#            eviction is shared (docs/engine.md): prompt tokens computed and the later requests' TTFT, with
#            prefix sharing vs without
#   capacity a long-context trace (prompts 850..950 tokens) under one KV memory cap, every shipped stack:
#            concurrent sequences and tokens/s vs the full fp32 cache (random:gpt2)
# Results: OUT/goals.jsonl (every replay/generate record) and OUT/goals.md (python3 report_goals.py).
#
# usage: bench/engine/engine_goals.sh [--only paging|sharing|sharing-policy|capacity] [--rounds R] [--threads T]
# environment: KVHOST (default build/kvhost), OUT (default docs/results/engine), CAP (capacity's KV cap,
#   default 512M), NCAP (capacity's requests, default 16), OUTLEN (capacity's new tokens per request,
#   default 64: prefill-bound; longer outputs let the decode batch, and so the memory saving, count),
#   STACKS (capacity's stacks, default all; "full" is the plain cache), PYTHON (python3)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
KVHOST=${KVHOST:-$REPO/build/kvhost}
OUT=${OUT:-$REPO/docs/results/engine}
CAP=${CAP:-512M}
NCAP=${NCAP:-16}
OUTLEN=${OUTLEN:-64}
PYTHON=${PYTHON:-python3}
ONLY="" ROUNDS=3 THREADS=2
while [ $# -gt 0 ]; do
  case "$1" in
    --only) ONLY=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "engine_goals.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -x "$KVHOST" ] || { echo "engine_goals.sh: no kvhost at $KVHOST (build first, or set KVHOST)" >&2; exit 2; }
mkdir -p "$OUT/traces"
J=$OUT/goals.jsonl
TINY=$REPO/../shared/models/gpt2-tiny-wt
want() { [ -z "$ONLY" ] || [ "$ONLY" = "$1" ]; }

if want paging; then
  for r in $(seq 1 "$ROUNDS"); do
    for bs in 0 16; do
      echo "== paging round $r: block_size $bs" >&2
      "$KVHOST" generate --model random:gpt2-medium --threads "$THREADS" --prompt-tokens 256 --max-new 128 \
        --quiet --warmup 1 --set cache.block_size=$bs --json "$J" >/dev/null
    done
  done
fi

model=random:gpt2
[ -d "$TINY" ] && model=$TINY
T=$OUT/traces/sharing-100x1000-200.jsonl
if want sharing || want sharing-policy; then
  # request 0 at t=0 computes the prefix; the other 99 arrive together at t=3 s and find it cached
  "$PYTHON" - "$T" <<'EOF'
import json, random, sys
rng = random.Random(7)
prefix = [rng.randrange(50256) for _ in range(200)]
with open(sys.argv[1], "w") as f:
    for i in range(100):
        ids = prefix + [rng.randrange(50256) for _ in range(800)]
        f.write(json.dumps({"id": f"s{i}", "arrival": 0.0 if i == 0 else 3.0, "prompt_ids": ids,
                            "max_tokens": 1, "prefix": "sys"}) + "\n")
EOF
fi
sharing_runs() { # $@: plugin options
  for mode in share noshare; do
    extra=()
    [ $mode = noshare ] && extra=(--no-prefix-sharing)
    echo "== sharing ${*:-(full cache)}: $mode" >&2
    "$KVHOST" replay "$T" --model "$model" --threads "$THREADS" --block-size 8 --max-seqs 100 \
      --step-tokens 100000 --quiet --json "$J" "${extra[@]}" "$@"
  done
}
want sharing && sharing_runs
want sharing-policy && sharing_runs --plugins h2o.so --set cache.budget=128 --set cache.slack=32

if want capacity; then
  # the 64-token trace keeps its original name, so earlier records still name their trace
  T=$OUT/traces/capacity-long-$NCAP.jsonl
  [ "$OUTLEN" = 64 ] || T=$OUT/traces/capacity-long-$NCAP-out$OUTLEN.jsonl
  "$KVHOST" trace --requests "$NCAP" --rate 0 --prompt-len 850:950 --output-len "$OUTLEN:$OUTLEN" --seed 3 \
    --out "$T" >/dev/null
  stacks=("" "window.so" "sink.so" "h2o.so" "tova.so" "scissorhands.so" "pyramid.so" "int8.so" "int4.so"
          "int4.so:kivi" "minicache.so" "h2o.so,int8.so")
  # STACKS="full h2o.so,int8.so" runs only those ("full" = the plain cache)
  if [ -n "${STACKS:-}" ]; then stacks=(); for s in $STACKS; do [ "$s" = full ] && s=""; stacks+=("$s"); done; fi
  for st in "${stacks[@]}"; do
    args=()
    case "$st" in
      "") ;;
      int8.so|int4.so|minicache.so) args=(--plugins "$st") ;;
      int4.so:kivi) args=(--plugins int4.so --set int4.kivi=true) ;;
      *) args=(--plugins "$st" --set cache.budget=128) ;;
    esac
    echo "== capacity: ${st:-full cache} under $CAP" >&2
    "$KVHOST" replay "$T" --model random:gpt2 --threads "$THREADS" --mem-limit "$CAP" --max-seqs 64 \
      --quiet --json "$J" "${args[@]}" || echo "capacity: ${st:-full} failed" >&2
  done
fi
"$PYTHON" "$HERE/report_goals.py" "$J" "$OUT/goals.md"
