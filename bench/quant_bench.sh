#!/bin/sh
# quant_bench.sh — KV bytes, peak memory and decode speed of the quantized stores (int8.so, int4.so, and
# their KIVI mode) against the fp32 cache when the cache reaches 1024 tokens (960-token synthetic prompt +
# 64 decoded), on random:gpt2-medium and the tiny trained model.
# One script run in ROUNDS rounds: every round runs every configuration once, each in its own process
# with 1 warm-up run (excluded) and 1 timed run, so drift of a shared machine hits all configurations
# alike; bench/report_quant.py takes medians over the rounds.
#
# usage: bench/quant_bench.sh BUILD_DIR OUT_DIR [THREADS] [ROUNDS]
#   writes OUT_DIR/quant_bench.jsonl (one kvhost record per run) and OUT_DIR/commands.txt, then
#   OUT_DIR/summary.md and OUT_DIR/quant_bench.png.
set -eu
BUILD=${1:?usage: quant_bench.sh BUILD_DIR OUT_DIR [THREADS] [ROUNDS]}
OUT=${2:?usage: quant_bench.sh BUILD_DIR OUT_DIR [THREADS] [ROUNDS]}
THREADS=${3:-2}
ROUNDS=${4:-3}
HERE=$(cd "$(dirname "$0")/.." && pwd)
TINY="$HERE/../shared/models/gpt2-tiny-wt"
mkdir -p "$OUT"
JSON="$OUT/quant_bench.jsonl"
: > "$JSON"
: > "$OUT/commands.txt"
run() {
  echo "$*" >> "$OUT/commands.txt"
  "$@"
}
MODELS="random:gpt2-medium"
if [ -d "$TINY" ]; then MODELS="$MODELS $TINY"; else echo "note: $TINY absent, tiny model skipped" >&2; fi
for model in $MODELS; do
  for round in $(seq 1 "$ROUNDS"); do
    for store in fp32 int8 int4 int8-kivi int4-kivi; do
      case $store in
        fp32) plug="" ;;
        *-kivi) plug="--plugins ${store%-kivi}.so --set ${store%-kivi}.kivi=true" ;;
        *) plug="--plugins $store.so" ;;
      esac
      # shellcheck disable=SC2086
      run "$BUILD/kvhost" generate --model "$model" --prompt-tokens 960 --max-new 64 --warmup 1 --repeats 1 \
        --threads "$THREADS" --quiet --json "$JSON" --tag store=$store --tag round=$round $plug
    done
  done
done
echo "wrote $JSON" >&2
/usr/bin/python3 "$HERE/bench/report_quant.py" "$JSON"
