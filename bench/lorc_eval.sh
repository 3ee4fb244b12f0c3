#!/bin/sh
# lorc_eval.sh — docs/results/lorc/README.md's numbers: lorc.so (LoRC low-rank K/V store) on the tiny model at
# several ranks (uniform and progressive) against the full fp32 cache: streaming NLL, KL(full || lorc),
# top-1 agreement (kvhost eval --mode stream, TOKENS tokens of War of the Worlds), and KV bytes held
# after a 1000-token prompt + 24 new tokens (kvhost generate). Appends to OUT/lorc.jsonl.
# usage: sh bench/lorc_eval.sh [BUILD_DIR]    env: TOKENS (2048), CTX (1024), THREADS (1), OUT (docs/results/lorc)
set -eu
BUILD=${1:-build}
KV="$BUILD/kvhost"
MODEL=${MODEL:-../shared/models/gpt2-tiny-wt}
TEXT=${TEXT:-../shared/data/books/war-of-the-worlds.txt}
TOKENS=${TOKENS:-2048}
CTX=${CTX:-1024}
THREADS=${THREADS:-1}
OUT=${OUT:-docs/results/lorc}
[ -d "$MODEL" ] || { echo "lorc_eval.sh: $MODEL absent (needs ../shared)" >&2; exit 2; }
mkdir -p "$OUT"
J="$OUT/lorc.jsonl"
"$KV" generate --model "$MODEL" --prompt-tokens 1000 --max-new 24 --threads "$THREADS" --json "$J" --quiet \
  --tag what=bytes --tag rank=full > /dev/null
for r in "24 24" "16 16" "8 8" "24 8"; do
  set -- $r
  "$KV" eval --model "$MODEL" --text-file "$TEXT" --max-tokens "$TOKENS" --ctx "$CTX" --mode stream \
    --threads "$THREADS" --json "$J" --plugins "$BUILD/plugins/lorc.so" --set lorc.rank="$1" --set lorc.last_rank="$2" \
    --tag what=eval --tag rank="$1-$2" > /dev/null
  "$KV" generate --model "$MODEL" --prompt-tokens 1000 --max-new 24 --threads "$THREADS" --json "$J" --quiet \
    --plugins "$BUILD/plugins/lorc.so" --set lorc.rank="$1" --set lorc.last_rank="$2" \
    --tag what=bytes --tag rank="$1-$2" > /dev/null
  echo "done: rank $1 -> $2" >&2
done
