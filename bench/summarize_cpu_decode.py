#!/usr/bin/env python3
"""summarize_cpu_decode.py — turns one cpu_decode.sh run (JSON Lines) into the markdown table of
docs/results/cpu-decode.md: kvhost vs PyTorch tokens/s, their ratio, and kvhost's achieved weight-read
bandwidth against the measured memory bandwidth."""
import json
import sys

recs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
kv = {r["threads"]: r for r in recs if r.get("record") == "generate"}
pt = {r["threads"]: r for r in recs if r.get("record") == "torch_decode"}
bw = {r["threads"]: r for r in recs if r.get("record") == "membw"}
best_pt = max(pt.values(), key=lambda r: r["decode_tokens_per_s"])
first = next(iter(kv.values()))
print("# CPU decode: kvhost vs PyTorch eager (GPT-2 Medium shapes, batch 1)\n")
print(f"Model: {first['model']['name']} ({first['model']['n_params']:,} parameters, seeded random weights written "
      "as a Hugging Face checkpoint by bench/torch_gpt2.py and loaded by both), prompt 128 tokens + 128 new, greedy, "
      "1 warm-up run then 3 timed runs per configuration in the same script run.\n")
print(f"Machine: {first['machine']['cpu']}, {first['machine']['cores']} cores; commit {first['commit']}; "
      f"{first['time_utc']}.\n")
print("| engine | threads | decode tokens/s | step median ms (p10-p90) | weight GB/s achieved | measured read GB/s | % of bandwidth |")
print("|---|---|---|---|---|---|---|")
for t in sorted(kv):
    r = kv[t]
    gbs = r["weight_bytes_per_token"] * r["decode_tokens_per_s"] / 1e9
    m = bw.get(t, {}).get("read_gb_per_s", float("nan"))
    d = r["decode_step"]
    print(f"| kvhost | {t} | {r['decode_tokens_per_s']:.2f} | {d['median_ms']:.1f} ({d['p10_ms']:.1f}-{d['p90_ms']:.1f}) "
          f"| {gbs:.2f} | {m:.2f} | {100 * gbs / m:.0f}% |")
for t in sorted(pt):
    r = pt[t]
    gbs = first["weight_bytes_per_token"] * r["decode_tokens_per_s"] / 1e9
    m = bw.get(t, {}).get("read_gb_per_s", float("nan"))
    print(f"| PyTorch {r['torch']} eager | {t} | {r['decode_tokens_per_s']:.2f} | {r['decode_step_median_ms']:.1f} "
          f"({r['decode_step_p10_ms']:.1f}-{r['decode_step_p90_ms']:.1f}) | {gbs:.2f} | {m:.2f} | {100 * gbs / m:.0f}% |")
best_kv = max(kv.values(), key=lambda r: r["decode_tokens_per_s"])
ratio = best_kv["decode_tokens_per_s"] / best_pt["decode_tokens_per_s"]
print(f"\nBest kvhost / best PyTorch: **{ratio:.2f}x** (kvhost {best_kv['threads']} threads, "
      f"PyTorch {best_pt['threads']} threads).")
kv_first = best_kv.get("first_tokens", [])
pt_first = best_pt.get("first_tokens", [])
same = sum(1 for a, b in zip(kv_first, pt_first) if a == b)
print(f"\nCross-check on the same weights: the first {len(kv_first)} greedy tokens of kvhost and PyTorch agree on "
      f"{same} of {min(len(kv_first), len(pt_first))} ({kv_first[:8]}... vs {pt_first[:8]}...).")
print(f"\nWeight bytes read per token: {first['weight_bytes_per_token'] / 1e9:.3f} GB (all fp32 matrices, "
      "vectors and the tied LM head); the bandwidth column is that times tokens/s.")
