#!/bin/sh
# study.sh — the policy study of docs/fidelity.md: every policy at every budget and every store, on the
# retrieval tasks of `kvhost eval --task`, slack 0 (every head attends exactly budget + 1 tokens at a
# step: equal attended tokens for every policy), records appended to OUT/study.jsonl, then the tables
# and plots (tools/fidelity/report.py). Resumable: a run whose tag is already in the file is skipped.
#
#   sh tools/fidelity/study.sh [MODEL]        (default models/gpt2-tiny-copy)
# environment: KVHOST (build/kvhost), PLUGINS (build/plugins), OUT (docs/results/fidelity), FILLER (The
#   War of the Worlds: never trained on), BUDGETS ("32 64 128 256"), POLICIES ("window sink h2o tova
#   scissorhands pyramid random"), STORES ("int8 int4 kivi minicache"), TASKS ("passkey copy kvlookup"),
#   MODE (prefill; or stream), SAMPLES (per cell; default the command's), THREADS (1), EXTRA (more args)
set -eu
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
MODEL=${1:-$ROOT/models/gpt2-tiny-copy}
KVHOST=${KVHOST:-$ROOT/build/kvhost}
PLUGINS=${PLUGINS:-$ROOT/build/plugins}
OUT=${OUT:-$ROOT/docs/results/fidelity}
FILLER=${FILLER:-$ROOT/../shared/data/books/war-of-the-worlds.txt}
BUDGETS=${BUDGETS:-32 64 128 256}
POLICIES=${POLICIES:-window sink h2o tova scissorhands pyramid random}
STORES=${STORES:-int8 int4 kivi minicache}
TASKS=${TASKS:-passkey copy kvlookup}
MODE=${MODE:-prefill}
THREADS=${THREADS:-1}
EXTRA=${EXTRA:-}
mkdir -p "$OUT"
J=$OUT/study.jsonl
touch "$J"
name=$(basename "$MODEL")

run() { # run ID ARGS...: one eval --task run unless ID is already recorded
    id=$1; shift
    if grep -q "\"run\":\"$id\"" "$J"; then return 0; fi
    echo "== $id" >&2
    # shellcheck disable=SC2086
    "$KVHOST" eval --model "$MODEL" --text-file "$FILLER" --mode "$MODE" --threads "$THREADS" \
        --plugin-path "$PLUGINS" --json "$J" --tag "run=$id" --tag "model=$name" ${SAMPLES:+--samples $SAMPLES} \
        $EXTRA "$@" > /dev/null || echo "study: $id failed" >&2
}

for task in $TASKS; do
    run "$name/$MODE/$task/full" --task "$task" --tag policy=full --tag budget=all
    for st in $STORES; do
        case $st in
            kivi) args="--plugins int4.so --set int4.kivi=true" ;;
            *) args="--plugins $st.so" ;;
        esac
        # shellcheck disable=SC2086
        run "$name/$MODE/$task/$st" --task "$task" $args --tag policy="$st" --tag budget=all
    done
    for b in $BUDGETS; do
        for p in $POLICIES; do
            run "$name/$MODE/$task/$p/$b" --task "$task" --plugins "$p.so" --set cache.budget="$b" \
                --set cache.slack=0 --tag policy="$p" --tag budget="$b"
        done
    done
done
/usr/bin/python3 "$ROOT/tools/fidelity/report.py" "$J" "$OUT"
