#!/bin/sh
# eval_policies.sh — regenerates docs/results/eval: streaming (autoregressive) perplexity, KL from the
# full cache and top-1 agreement of each KV policy on the tiny model, then the tables and the plot.
# Owns: the sweep (texts x policies x budgets) and its JSON Lines file. Does not own: the evaluation
# (kvhost eval) or the report (bench/report_eval.py).
#
# usage: sh bench/eval_policies.sh [BUILD_DIR]      (default: build)
# env:   TOKENS (2048), CTX (1024), BUDGETS ("64 128 256"), THREADS (1), JOBS (1: runs in parallel),
#        POLICIES (default: window sink h2o pyramid tova tova-head scissorhands minicache, each only if its .so
#        exists in BUILD_DIR/plugins; tova-head is tova.so with per_head = true, the paper's per-head variant),
#        OUT (docs/results/eval), FRESH=1 to delete OUT/eval.jsonl first (default: append),
#        FULL=0 to skip the full-cache rows (when appending policies to a file that has them),
#        MC_GAMMAS ("0.05 0.4 0.7": minicache retention thresholds; minicache is a store that evicts
#        nothing, so it runs once per gamma at budget "all" instead of once per budget)
# minicache also writes OUT/minicache_sweep.jsonl: per (text, gamma) the plugin's merged / retained
# summary (parsed from its log line), and per gamma the KV bytes held by `kvhost generate` on a
# 1000-token prompt + 24 new tokens next to the plugin-free cache (kv_bytes_held of the --json record).
# Needs ../shared (the model and the texts). Every run also runs the full-cache reference itself, so a
# run costs two streaming passes: about 2 x TOKENS decode steps of the tiny model.
set -eu
BUILD=${1:-build}
KVHOST="$BUILD/kvhost"
PLUGDIR="$BUILD/plugins"
MODEL=${MODEL:-../shared/models/gpt2-tiny-wt}
TOKENS=${TOKENS:-2048}
CTX=${CTX:-1024}
BUDGETS=${BUDGETS:-"64 128 256"}
THREADS=${THREADS:-1}
JOBS=${JOBS:-1}
OUT=${OUT:-docs/results/eval}
TEXTS=${TEXTS:-"../shared/data/books/war-of-the-worlds.txt ../shared/data/wikitext-2-raw/wiki.test.raw"}
[ -x "$KVHOST" ] || { echo "eval_policies.sh: $KVHOST not found (build first: cmake -B $BUILD && make -C $BUILD)" >&2; exit 2; }
[ -d "$MODEL" ] || { echo "eval_policies.sh: $MODEL absent (needs ../shared)" >&2; exit 2; }
mkdir -p "$OUT"
JSONL="$OUT/eval.jsonl"
[ "${FRESH:-0}" = 1 ] && rm -f "$JSONL"

POL=""
for p in ${POLICIES:-window sink h2o pyramid tova tova-head scissorhands minicache}; do
  if [ -f "$PLUGDIR/${p%-head}.so" ]; then POL="$POL $p"; else echo "eval_policies.sh: $PLUGDIR/$p.so not built, skipping $p" >&2; fi
done

# One line per run: the kvhost eval arguments after the common ones.
LIST=$(mktemp)
trap 'rm -f "$LIST"' EXIT
for t in $TEXTS; do
  [ "${FULL:-1}" = 0 ] || echo "$t full 0" >> "$LIST"
  for p in $POL; do
    if [ "$p" = minicache ]; then
      for g in ${MC_GAMMAS:-0.05 0.4 0.7}; do echo "$t $p 0 $g" >> "$LIST"; done
      continue
    fi
    for b in $BUDGETS; do echo "$t $p $b" >> "$LIST"; done
  done
done
echo "eval_policies.sh: $(wc -l < "$LIST") runs of $TOKENS tokens, ctx $CTX, $JOBS at a time -> $JSONL" >&2

SWEEP="$OUT/minicache_sweep.jsonl"
run_one() {
  t=$1; p=$2; b=$3; g=${4:-}
  if [ "$p" = full ]; then
    set -- --tag policy=full --tag budget=0
  elif [ "$p" = minicache ]; then
    LOG=$(mktemp)
    "$KVHOST" eval --model "$MODEL" --text-file "$t" --max-tokens "$TOKENS" --ctx "$CTX" --mode stream \
      --threads "$THREADS" --json "$JSONL" --plugins "$PLUGDIR/minicache.so" --set minicache.gamma="$g" \
      --tag policy=minicache --tag budget=0 --tag gamma="$g" > /dev/null 2> "$LOG" || { cat "$LOG" >&2; rm -f "$LOG"; return 1; }
    /usr/bin/python3 -c 'import json,re,sys
m = [l for l in open(sys.argv[1]) if "retained fraction" in l][-1]
n = [int(x) for x in re.findall(r"(\d+) / (\d+)", m)[0] + re.findall(r"(\d+) / (\d+)", m)[1]]
print(json.dumps({"record": "minicache_eval", "text": sys.argv[2], "gamma": float(sys.argv[3]),
      "merged_k": n[0], "paired_k": n[1], "merged_v": n[2], "paired_v": n[3],
      "retained_fraction": float(m.split("retained fraction")[1]), "summary": m.split("info: ")[-1].strip()}))' \
      "$LOG" "$(basename "$t")" "$g" >> "$SWEEP"
    rm -f "$LOG"
    echo "done: $(basename "$t") minicache gamma $g" >&2
    return 0
  elif [ "$p" = tova-head ]; then
    set -- --plugins "$PLUGDIR/tova.so" --set tova.per_head=true --set cache.budget="$b" --tag policy="$p" \
      --tag budget="$b"
  else
    set -- --plugins "$PLUGDIR/$p.so" --set cache.budget="$b" --tag policy="$p" --tag budget="$b"
  fi
  "$KVHOST" eval --model "$MODEL" --text-file "$t" --max-tokens "$TOKENS" --ctx "$CTX" --mode stream \
    --threads "$THREADS" --json "$JSONL" "$@" > /dev/null
  echo "done: $(basename "$t") $p $b" >&2
}

# JOBS lanes, each taking every JOBS-th run; records are single O_APPEND writes, so lanes never
# interleave inside a line.
lane=0
while [ "$lane" -lt "$JOBS" ]; do
  awk -v n="$JOBS" -v k="$lane" 'NR % n == k' "$LIST" | while read -r t p b g; do run_one "$t" "$p" "$b" "$g"; done &
  lane=$((lane + 1))
done
wait
# minicache: KV bytes held at each gamma vs the plain cache (kvhost generate, 1000 + 24 tokens)
case " $POL " in *" minicache "*)
  MEM=$(mktemp)
  "$KVHOST" generate --model "$MODEL" --prompt-tokens 1000 --max-new 24 --threads "$THREADS" --json "$MEM" \
    --tag policy=full > /dev/null 2>&1
  for g in ${MC_GAMMAS:-0.05 0.4 0.7} 0; do
    "$KVHOST" generate --model "$MODEL" --prompt-tokens 1000 --max-new 24 --threads "$THREADS" --json "$MEM" \
      --plugins "$PLUGDIR/minicache.so" --set minicache.gamma="$g" --tag policy=minicache --tag gamma="$g" \
      > /dev/null 2>&1
  done
  /usr/bin/python3 -c 'import json,sys
for l in open(sys.argv[1]):
    r = json.loads(l)
    t = r.get("tags", {})
    print(json.dumps({"record": "minicache_mem", "policy": t.get("policy"), "gamma": float(t["gamma"]) if "gamma" in t else None,
                      "tokens": r["prompt_tokens"][0] + r["generated_tokens"][0], "kv_bytes_held": r["kv_bytes_held"],
                      "kv_bytes_peak": r["kv_bytes_peak"], "commit": r.get("commit")}))' "$MEM" >> "$SWEEP"
  rm -f "$MEM"
  ;;
esac
/usr/bin/python3 bench/report_eval.py "$JSONL" "$OUT"
