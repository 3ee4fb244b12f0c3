#!/usr/bin/env bash
# score_hook_cost.sh — what the ABI 1.3 score-report policies cost per decoded token next to h2o (the
# host-summed fast path) at the same budget: tova (layer-wise), scissorhands, h2o and the plain cache,
# decoding MAX_NEW tokens after a PROMPT-token prompt. Every round runs every configuration once (own
# process, 1 warm-up run excluded), so a shared machine's drift hits all alike; the summary is the median
# decode tokens/s over rounds. Records go to OUT (JSON Lines).
# usage: bench/score_hook_cost.sh [BUILD_DIR] [ROUNDS]   env: MODEL (random:gpt2-medium), PROMPT (768),
#        MAX_NEW (256), THREADS (2), BUDGET (128), SLACK (32), OUT (docs/results/score-hooks.jsonl)
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:-build}
ROUNDS=${2:-3}
KV="$BUILD/kvhost"
MODEL=${MODEL:-random:gpt2-medium}
OUT=${OUT:-docs/results/score-hooks.jsonl}
common=(--model "$MODEL" --prompt-tokens "${PROMPT:-768}" --max-new "${MAX_NEW:-256}" --threads "${THREADS:-2}"
        --warmup 1 --repeats 1 --quiet --json "$OUT")
b=(--set cache.budget="${BUDGET:-128}" --set cache.slack="${SLACK:-32}")
for round in $(seq 1 "$ROUNDS"); do
  "$KV" generate "${common[@]}" --tag config=full --tag round="$round" > /dev/null
  for p in h2o tova scissorhands; do
    "$KV" generate "${common[@]}" --tag config="$p" --tag round="$round" --plugins "$p.so" "${b[@]}" > /dev/null
  done
  echo "round $round done" >&2
done
python3 - "$OUT" "$MODEL" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1], encoding="utf-8", errors="replace"):
    r = json.loads(line)
    m = r.get("model", {})
    if sys.argv[2] not in (m.get("name"), m.get("source")):
        continue
    tps = r["decode_tokens_per_s"]
    rows.setdefault(r.get("tags", {}).get("config"), []).append(tps)
h2o = statistics.median(rows["h2o"]) if rows.get("h2o") else None
for k in ["full", "h2o", "tova", "scissorhands"]:
    if rows.get(k):
        m = statistics.median(rows[k])
        rel = f"  ({100 * (m / h2o - 1):+.1f}% vs h2o)" if h2o and k != "h2o" else ""
        print(f"{k:14s} median decode {m:8.2f} tok/s over {len(rows[k])} rounds{rel}")
PY
