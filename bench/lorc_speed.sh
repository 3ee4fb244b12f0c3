#!/usr/bin/env bash
# lorc_speed.sh — decode speed of lorc.so (K and V as rank-r latents, fp32 and int8) next to the plain
# fp32 cache at a 1024-token context: a PROMPT-token prompt, then MAX_NEW decoded tokens. Every round runs
# every configuration once (own process, 1 warm-up run excluded), so a shared machine's drift hits all
# alike; the summary is the median decode tokens/s over rounds and its ratio to the plain cache.
# usage: bench/lorc_speed.sh [BUILD_DIR] [ROUNDS]   env: MODEL (random:gpt2-medium), PROMPT (768),
#        MAX_NEW (256), THREADS (2), RANK (0 = head_dim / 2), OUT (docs/results/lorc/speed.jsonl)
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:-build}
ROUNDS=${2:-3}
KV="$BUILD/kvhost"
MODEL=${MODEL:-random:gpt2-medium}
OUT=${OUT:-docs/results/lorc/speed.jsonl}
common=(--model "$MODEL" --prompt-tokens "${PROMPT:-768}" --max-new "${MAX_NEW:-256}" --threads "${THREADS:-2}"
        --warmup 1 --repeats 1 --quiet --json "$OUT")
run_id=$(date -u +%Y%m%dT%H%M%SZ)
for round in $(seq 1 "$ROUNDS"); do
  "$KV" generate "${common[@]}" --tag run="$run_id" --tag config=full --tag round="$round" > /dev/null
  "$KV" generate "${common[@]}" --tag run="$run_id" --tag config=lorc --tag round="$round" --plugins lorc.so \
    --set lorc.rank="${RANK:-0}" > /dev/null
  "$KV" generate "${common[@]}" --tag run="$run_id" --tag config=lorc-int8 --tag round="$round" --plugins lorc.so \
    --set lorc.rank="${RANK:-0}" --set lorc.bits=8 > /dev/null
  echo "round $round done" >&2
done
python3 - "$OUT" "$run_id" <<'PY'
import json, statistics, sys
rows, kv = {}, {}
for line in open(sys.argv[1], encoding="utf-8", errors="replace"):
    r = json.loads(line)
    if r.get("tags", {}).get("run") != sys.argv[2]:
        continue
    c = r["tags"]["config"]
    rows.setdefault(c, []).append(r["decode_tokens_per_s"])
    kv[c] = r.get("kv_bytes_peak")
full = statistics.median(rows["full"])
for k in ["full", "lorc", "lorc-int8"]:
    m = statistics.median(rows[k])
    print(f"{k:10s} median decode {m:8.2f} tok/s over {len(rows[k])} rounds ({m / full:.3f}x full), "
          f"KV peak {kv[k] / 2**20:.1f} MiB")
PY
