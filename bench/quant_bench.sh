#!/bin/sh
# quant_bench.sh — KV bytes, peak memory and decode speed of the quantized stores (int8.so, int4.so)
# against the fp32 cache, at a 1000-token prompt + 24 new tokens (the cache ends at ~1024 tokens), on
# random:gpt2-medium and the tiny trained model. Every configuration runs in this one script run, one
# after the other, each with a warm-up run and 3 timed repeats in its process.
#
# usage: bench/quant_bench.sh BUILD_DIR OUT_DIR [THREADS]
#   writes OUT_DIR/quant_bench.jsonl (one kvhost record per configuration) and OUT_DIR/commands.txt.
set -eu
BUILD=${1:?usage: quant_bench.sh BUILD_DIR OUT_DIR [THREADS]}
OUT=${2:?usage: quant_bench.sh BUILD_DIR OUT_DIR [THREADS]}
THREADS=${3:-2}
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
  for store in fp32 int8 int4; do
    plug=""
    [ "$store" = fp32 ] || plug="--plugins $store.so"
    # shellcheck disable=SC2086
    run "$BUILD/kvhost" generate --model "$model" --prompt-tokens 1000 --max-new 24 --warmup 1 --repeats 3 \
      --threads "$THREADS" --quiet --json "$JSON" --tag store=$store $plug
  done
done
echo "wrote $JSON" >&2
