#!/bin/sh
# gpu_check_dryrun.sh — the GPU check's scripts (bench/gpu_check.sh, gpu_bench.sh, hf_gpu_bench.py
# summarize, kvbench.py capacity --predict) run end to end on the CPU, so that a change to kvhost's options
# or records breaks here and not in the few minutes a GPU machine is lent (issue #18). Two runs, on the
# tiny model with the CTest build:
#   1. the whole check: every stage writes its records (decode, policies, batch, stores, overhead: kvhost
#      generate records tagged with the stage; capacity: one record per store, the predicted search), the
#      summary has each stage's table, the verdict is PASS;
#   2. a budget too small for any stage: every stage is skipped with a "skipped" record naming the deadline,
#      and that is not a failure.
# Exit 77 (CTest: skipped) without ../shared's tiny model.
# usage: tests/gpu_check_dryrun.sh BUILD_DIR
set -eu
BUILD=$(cd "$1" && pwd)
REPO=$(cd "$(dirname "$0")/.." && pwd)
TINY="$REPO/../shared/models/gpt2-tiny-wt"
[ -f "$TINY/model.safetensors" ] || { echo "skipping: $TINY is absent"; exit 77; }
OUT=$(mktemp -d /tmp/kvh-gpucheck-XXXXXX)
trap 'rm -rf "$OUT"' EXIT
cd "$REPO"

KVH_GPU_BUILD="$BUILD" KVH_BENCH_MODELS="$TINY" KVH_BENCH_KV_CAP=16M bench/gpu_check.sh --dry-run "$OUT/full" > "$OUT/full.txt" 2>&1 ||
  { cat "$OUT/full.txt" "$OUT/full/check.log"; echo "FAIL: the dry run's verdict is not PASS"; exit 1; }
KVH_GPU_BUILD="$BUILD" KVH_BENCH_MODELS="$TINY" KVH_GPU_BUDGET_S=1 KVH_GPU_SKIP_TESTS=1 \
  bench/gpu_check.sh --dry-run "$OUT/short" > "$OUT/short.txt" 2>&1 ||
  { cat "$OUT/short.txt" "$OUT/short/check.log"; echo "FAIL: skipping stages made the check fail"; exit 1; }

python3 - "$OUT" <<'EOF'
import json, sys, os
out = sys.argv[1]
def records(d):
    return [json.loads(l) for l in open(os.path.join(out, d, "gpu_bench.jsonl")) if l.strip()]
full = records("full")
bad = []
for st in ("decode", "policies", "batch", "stores", "overhead"):
    n = sum(1 for r in full if r.get("record") == "generate" and (r.get("tags") or {}).get("stage") == st)
    if n == 0:
        bad.append("no generate record for stage %s" % st)
configs = {(r.get("tags") or {}).get("config") for r in full if (r.get("tags") or {}).get("stage") == "policies"}
want = {"full", "full-at-budget", "window", "sink", "h2o", "pyramid", "int8", "int4", "h2o+int8"}
if configs != want:
    bad.append("policies stage configs %s, want %s" % (sorted(configs - {None}), sorted(want)))
cap = [r for r in full if r.get("record") == "capacity"]
if sorted(r["tags"]["config"] for r in cap) != ["store=fp16", "store=int4", "store=int8"]:
    bad.append("capacity records: %s" % [r.get("tags") for r in cap])
for r in cap:
    # the predicted search: batch 1, the prediction, the one above (the cache's bytes are linear in the batch)
    if r["max_batch"] < 2 or len(r["probes"]) != 3 or r["probes"][-1] != [r["max_batch"] + 1, False]:
        bad.append("capacity %s: max %s after probes %s" % (r["tags"]["config"], r["max_batch"], r["probes"]))
if any(r.get("record") == "skipped" and r["stage"] != "peer" for r in full):
    bad.append("the full run skipped a stage: %s" % [r for r in full if r.get("record") == "skipped"])
summary = open(os.path.join(out, "full", "summary.md")).read()
for title in ("### Batch-1 decode", "### Policies and stores", "### Batched decode", "### KV stores",
              "### Overheads", "### Max batch"):
    if title not in summary:
        bad.append("summary lacks %r" % title)
short = records("short")
skipped = {r["stage"] for r in short if r.get("record") == "skipped" and "deadline" in r["reason"]}
if skipped != {"decode", "policies", "batch", "stores", "overhead", "capacity"}:
    bad.append("short budget skipped %s" % sorted(skipped))
if any(r.get("record") == "generate" for r in short):
    bad.append("short budget still ran kvhost")
for b in bad:
    print("FAIL:", b)
print("gpu_check dry run: %d records, %d stages skipped under a 1 s budget" % (len(full), len(skipped)))
sys.exit(1 if bad else 0)
EOF
