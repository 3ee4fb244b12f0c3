#!/usr/bin/env bash
# quant_eval.sh — issue #5's quality figures: streaming perplexity, KL divergence from the fp32 cache and
# top-1 agreement for fp32 / int8 / int4 alone and under h2o at budget 256, and the KIVI option (kivi int8,
# kivi int4, kivi int4 under h2o 256; default group 32, residual 128), tiny model, 2048 tokens in
# 1024-token chunks, on War of the Worlds (in distribution) and WikiText-2 test (out of distribution).
# Appends to docs/results/quant/eval.jsonl and writes docs/results/quant/eval.md from the latest record
# of every (text, stack) in eval.jsonl, so a partial rerun (STACKS=...) updates only its rows.
# usage: [STACKS="tag=plugins[=set,set...] ..."] bench/quant_eval.sh [BUILD_DIR]
#   e.g. STACKS="kivi-int4=int4.so=int4.kivi=true" bench/quant_eval.sh build
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:-build}
MODEL=../shared/models/gpt2-tiny-wt
OUT=docs/results/quant/eval.jsonl
RUN=$(mktemp /tmp/kvh-qeval-XXXXXX.jsonl)
# tag=plugins=sets (sets comma-separated; the tag names the row, "fp32" runs no plugin)
DEFAULT_STACKS="fp32 int8.so=int8.so int4.so=int4.so h2o.so=h2o.so h2o.so,int8.so=h2o.so,int8.so h2o.so,int4.so=h2o.so,int4.so
  kivi-int8=int8.so=int8.kivi=true kivi-int4=int4.so=int4.kivi=true kivi-int4+h2o=h2o.so,int4.so=int4.kivi=true"
for text in ../shared/data/books/war-of-the-worlds.txt ../shared/data/wikitext-2-raw/wiki.test.raw; do
  for entry in ${STACKS:-$DEFAULT_STACKS}; do
    IFS== read -r tag plugins sets <<< "$entry"
    args=(eval --model "$MODEL" --text-file "$text" --max-tokens 2048 --ctx 1024 --mode stream --threads 2
          --json "$RUN" --tag "stack=$tag")
    [ -n "$plugins" ] && args+=(--plugins "$plugins" --set cache.budget=256)
    for s in ${sets//,/ }; do args+=(--set "$s"); done
    "$BUILD/kvhost" "${args[@]}" > /dev/null
  done
done
cat "$RUN" >> "$OUT"
/usr/bin/python3 - "$OUT" > docs/results/quant/eval.md <<'PY'
import json, os, sys
latest = {}
for l in open(sys.argv[1]):
    if not l.strip(): continue
    r = json.loads(l)
    k = (os.path.basename(r.get("text_file", r.get("text", "?"))), r["tags"]["stack"])
    latest.pop(k, None)
    latest[k] = r
order = {"war-of-the-worlds.txt": 0}
recs = sorted(latest.values(), key=lambda r: order.get(os.path.basename(r.get("text_file", r.get("text", "?"))), 1))
commits = sorted({r["commit"] for r in recs})
print("# Quantized KV cache: quality (issue #5)\n")
print(f"Tiny model (gpt2-tiny-wt), streaming mode: every token decoded through the cache, 2048 tokens in "
      f"1024-token chunks, beside a plugin-free fp32 cache on the same tokens; commit(s) {', '.join(commits)}. "
      "kivi-* rows: `--set <store>.kivi=true` (group 32, residual 128). "
      "Regenerate with `bench/quant_eval.sh build`.\n")
def key(r, k, *alts):
    for a in (k,) + alts:
        if a in r: return r[a]
    return float("nan")
print("| text | stack | ppl | fp32 ppl | ppl change | mean KL (nats) | top-1 agreement |")
print("|---|---|---|---|---|---|---|")
for r in recs:
    text = os.path.basename(r.get("text_file", r.get("text", "?")))
    ppl, full = key(r, "ppl", "perplexity"), key(r, "full_ppl")
    print(f"| {text} | {r['tags']['stack']}{' (budget 256)' if 'h2o' in r['tags']['stack'] else ''} | {ppl:.2f} | "
          f"{full:.2f} | {100 * (ppl / full - 1):+.2f}% | {key(r, 'kl_mean'):.2e} | "
          f"{100 * key(r, 'top1_agreement'):.2f}% |")
PY
cat docs/results/quant/eval.md
