#!/bin/sh
# kivi_bytes.sh — KV bytes held by the KIVI option of int8.so / int4.so (default group 32, residual 128)
# against the fp32 cache and the per-token int8 / int4 stores, at a 1000-token prompt + 24 new tokens
# (the cache ends at ~1024 tokens), on random:gpt2-medium and the tiny trained model. Memory only: one
# run per configuration, no repeats (not a speed benchmark; the timings in the records mean nothing).
# usage: bench/kivi_bytes.sh BUILD_DIR [OUT_DIR]   (writes OUT_DIR/kivi_bytes.jsonl and OUT_DIR/kivi.md)
set -eu
BUILD=${1:?usage: kivi_bytes.sh BUILD_DIR [OUT_DIR]}
HERE=$(cd "$(dirname "$0")/.." && pwd)
OUT=${2:-$HERE/docs/results/quant}
TINY="$HERE/../shared/models/gpt2-tiny-wt"
JSON="$OUT/kivi_bytes.jsonl"
mkdir -p "$OUT"
: > "$JSON"
MODELS="random:gpt2-medium"
[ -d "$TINY" ] && MODELS="$MODELS $TINY"
for model in $MODELS; do
  for store in fp32 int8 int4 kivi-int8 kivi-int4; do
    case $store in
      fp32) plug="" ;;
      kivi-*) s=${store#kivi-}; plug="--plugins $s.so --set $s.kivi=true" ;;
      *) plug="--plugins $store.so" ;;
    esac
    # shellcheck disable=SC2086
    "$BUILD/kvhost" generate --model "$model" --prompt-tokens 1000 --max-new 24 --threads 2 --quiet \
      --json "$JSON" --tag store=$store $plug > /dev/null
  done
done
/usr/bin/python3 - "$JSON" > "$OUT/kivi.md" <<'PY'
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("# KIVI option: KV bytes held at ~1024 tokens\n")
print("Made by `bench/kivi_bytes.sh BUILD_DIR` (1000-token synthetic prompt + 24 new tokens, one run each; "
      f"commit {recs[0]['commit']}). kivi-*: `--set <store>.kivi=true`, group 32, residual 128 (so 128..159 "
      "tokens per head stay fp32). Formula: docs/quant.md, section KIVI.\n")
print("| model | store | KV held (bytes) | KV held (MiB) | vs fp32 |")
print("|---|---|---|---|---|")
base = {}
for r in recs:
    m = r["model"]["name"]
    b = r["kv_bytes_held"]
    if r["tags"]["store"] == "fp32": base[m] = b
    print(f"| {m} | {r['tags']['store']} | {b} | {b / 2**20:.2f} | {100 * b / base[m]:.1f}% |")
PY
cat "$OUT/kivi.md"
