#!/bin/sh
# lorc_eval.sh — docs/results/lorc/README.md's numbers: lorc.so (LoRC low-rank K/V store) on the tiny model at
# several ranks (uniform and progressive) against the full fp32 cache: streaming NLL, KL(full || lorc),
# top-1 agreement (kvhost eval --mode stream, TOKENS tokens of War of the Worlds), and KV bytes held
# after a 1000-token prompt + 24 new tokens (kvhost generate). Appends to OUT/lorc.jsonl.
# usage: sh bench/lorc_eval.sh [BUILD_DIR]    env: TOKENS (2048), CTX (1024), THREADS (1), OUT (docs/results/lorc),
#        BITS (32: fp32 latents; 8: int8 latents), RANKS ("24 24,16 16,8 8,24 8": first and last rank pairs),
#        FULL (1: also the plugin-free bytes record)
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
BITS=${BITS:-32}
RANKS=${RANKS:-24 24,16 16,8 8,24 8}
if [ "${FULL:-1}" = 1 ]; then
  "$KV" generate --model "$MODEL" --prompt-tokens 1000 --max-new 24 --threads "$THREADS" --json "$J" --quiet \
    --tag what=bytes --tag rank=full > /dev/null
fi
IFS_SAVED=$IFS
IFS=,
for r in $RANKS; do
  IFS=$IFS_SAVED
  set -- $r
  "$KV" eval --model "$MODEL" --text-file "$TEXT" --max-tokens "$TOKENS" --ctx "$CTX" --mode stream \
    --threads "$THREADS" --json "$J" --plugins "$BUILD/plugins/lorc.so" --set lorc.rank="$1" --set lorc.last_rank="$2" \
    --set lorc.bits="$BITS" --tag what=eval --tag rank="$1-$2" --tag bits="$BITS" > /dev/null
  "$KV" generate --model "$MODEL" --prompt-tokens 1000 --max-new 24 --threads "$THREADS" --json "$J" --quiet \
    --plugins "$BUILD/plugins/lorc.so" --set lorc.rank="$1" --set lorc.last_rank="$2" --set lorc.bits="$BITS" \
    --tag what=bytes --tag rank="$1-$2" --tag bits="$BITS" > /dev/null
  echo "done: rank $1 -> $2, $BITS bits" >&2
done
