#!/usr/bin/env bash
# weights_bench.sh — issue #21's measurement: weight formats (f16, bf16, w8, w4) against the fp32 path.
#
#   Speed (GPT-2 Medium shapes, seeded random weights written as a Hugging Face directory so the fp32
#   weights are memory-mapped and given back once packed): batch-1 decode tokens/s with a 128-token
#   prompt + 128 new, and prefill tokens/s of a 512-token prompt, at 1 and 2 threads, ROUNDS interleaved
#   rounds (every configuration once per round, each its own process with one untimed warm-up run),
#   medians over rounds; weight bytes held and peak RSS from the records.
#   Quality (the tiny trained model, ../shared): `kvhost eval --mode both` on the first 2048 tokens of
#   War of the Worlds and of WikiText-2 test: teacher-forced perplexity, and streaming KL / top-1 against
#   the fp32 weights. smoothquant's statistics (kvhost calibrate) come from the other text.
#
# usage: bench/weights_bench.sh [BUILD_DIR]      env: ROUNDS (default 3), OUT (default docs/results/weights),
#        FORMATS (default "fp32 f16 bf16 w8 w4 smoothquant"; keep fp32 in it: the ratios are against it)
# Writes OUT/weights.jsonl (raw records, appended) and OUT/README.md (tables, via bench/report_weights.py).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:-build}
ROUNDS=${ROUNDS:-3}
OUT=${OUT:-docs/results/weights}
WORK=${KVH_BENCH_DIR:-/tmp/kvh-bench}
CKPT=${CKPT:-$WORK/gpt2-medium-seed1234}
TINY=../shared/models/gpt2-tiny-wt
RUN=$WORK/weights-$(date +%s).jsonl
FORMATS=${FORMATS:-"fp32 f16 bf16 w8 w4 smoothquant"}
WOTW=../shared/data/books/war-of-the-worlds.txt
WIKI=../shared/data/wikitext-2-raw/wiki.test.raw
mkdir -p "$WORK" "$OUT"
: > "$RUN"
[ -x "$BUILD/kvhost" ] || { echo "weights_bench: build kvhost first (make build)" >&2; exit 1; }
[ -f "$CKPT/model.safetensors" ] ||
  /usr/bin/python3 bench/torch_gpt2.py make-checkpoint "$CKPT" --preset gpt2-medium --seed 1234

# smoothquant needs activation statistics: for speed, of the Medium checkpoint over WikiText; for quality,
# of the tiny model over the OTHER text than the one evaluated (never calibrate on the evaluation text).
plugins_for() { # FORMAT [CALIBRATION]
  case "$1" in
    fp32) echo "" ;;
    smoothquant) echo "--plugins smoothquant.so --set model.calibration=$2" ;;
    *) echo "--plugins $1.so" ;;
  esac
}
case " $FORMATS " in *" smoothquant "*)
  "$BUILD/kvhost" calibrate --model "$CKPT" --text-file "$WIKI" --max-tokens 2048 --out "$WORK/medium-wiki.kvcal" > /dev/null ;;
esac
load() { cut -d' ' -f1 /proc/loadavg; }

for round in $(seq 1 "$ROUNDS"); do
  for threads in 1 2; do
    for fmt in $FORMATS; do
      echo "weights_bench: round $round/$ROUNDS, $threads thread(s), $fmt (load $(load))" >&2
      # shellcheck disable=SC2046
      "$BUILD/kvhost" generate --model "$CKPT" $(plugins_for "$fmt" "$WORK/medium-wiki.kvcal") --prompt-tokens 128 --max-new 128 \
        --threads "$threads" --warmup 1 --quiet --json "$RUN" \
        --tag bench=weights --tag test=decode --tag format="$fmt" --tag round="$round" --tag load="$(load)"
      # shellcheck disable=SC2046
      "$BUILD/kvhost" generate --model "$CKPT" $(plugins_for "$fmt" "$WORK/medium-wiki.kvcal") --prompt-tokens 512 --max-new 1 \
        --threads "$threads" --warmup 1 --quiet --json "$RUN" \
        --tag bench=weights --tag test=prefill --tag format="$fmt" --tag round="$round" --tag load="$(load)"
    done
  done
done

if [ -d "$TINY" ]; then
  "$BUILD/kvhost" calibrate --model "$TINY" --text-file "$WIKI" --out "$WORK/tiny-wiki.kvcal" > /dev/null
  "$BUILD/kvhost" calibrate --model "$TINY" --text-file "$WOTW" --out "$WORK/tiny-wotw.kvcal" > /dev/null
  for fmt in $FORMATS; do
    for text in "$WOTW" "$WIKI"; do
      cal=$WORK/tiny-wiki.kvcal
      [ "$text" = "$WIKI" ] && cal=$WORK/tiny-wotw.kvcal
      echo "weights_bench: quality, $fmt, $(basename "$text")" >&2
      # shellcheck disable=SC2046
      "$BUILD/kvhost" eval --model "$TINY" $(plugins_for "$fmt" "$cal") --text-file "$text" --max-tokens 2048 \
        --mode both --json "$RUN" --tag bench=weights --tag test=quality --tag format="$fmt" \
        --tag text="$(basename "$text")" > /dev/null
    done
  done
else
  echo "weights_bench: $TINY absent: quality skipped" >&2
fi

cat "$RUN" >> "$OUT/weights.jsonl"
/usr/bin/python3 bench/report_weights.py "$OUT/weights.jsonl" --plot "$OUT/weights.png" > "$OUT/README.md"
cat "$OUT/README.md"
