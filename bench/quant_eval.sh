#!/usr/bin/env bash
# quant_eval.sh — issue #5's quality figures: streaming perplexity, KL divergence from the fp32 cache and
# top-1 agreement for fp32 / int8 / int4 alone and under h2o at budget 256, tiny model, 2048 tokens in
# 1024-token chunks, on War of the Worlds (in distribution) and WikiText-2 test (out of distribution).
# Appends to docs/results/quant/eval.jsonl and writes docs/results/quant/eval.md.
# usage: bench/quant_eval.sh [BUILD_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:-build}
MODEL=../shared/models/gpt2-tiny-wt
OUT=docs/results/quant/eval.jsonl
RUN=$(mktemp /tmp/kvh-qeval-XXXXXX.jsonl)
for text in ../shared/data/books/war-of-the-worlds.txt ../shared/data/wikitext-2-raw/wiki.test.raw; do
  for stack in "" int8.so int4.so h2o.so h2o.so,int8.so h2o.so,int4.so; do
    args=(eval --model "$MODEL" --text-file "$text" --max-tokens 2048 --ctx 1024 --mode stream --threads 2
          --json "$RUN" --tag "stack=${stack:-fp32}")
    [ -n "$stack" ] && args+=(--plugins "$stack" --set cache.budget=256)
    "$BUILD/kvhost" "${args[@]}" > /dev/null
  done
done
cat "$RUN" >> "$OUT"
/usr/bin/python3 - "$RUN" > docs/results/quant/eval.md <<'PY'
import json, os, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
r0 = recs[0]
print("# Quantized KV cache: quality (issue #5)\n")
print(f"Tiny model (gpt2-tiny-wt), streaming mode: every token decoded through the cache, 2048 tokens in "
      f"1024-token chunks, beside a plugin-free fp32 cache on the same tokens; commit {r0['commit']}. "
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
