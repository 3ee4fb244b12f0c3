#!/usr/bin/env python3
"""plot.py — summarizes quant_bench.jsonl (bench/quant_bench.sh) into summary.md and quant_bench.png.
usage: python3 docs/results/quant/plot.py docs/results/quant/quant_bench.jsonl"""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

path = sys.argv[1]
out_dir = os.path.dirname(os.path.abspath(path))
rows = [json.loads(line) for line in open(path) if line.strip()]


table = []
for r in rows:
    m = r["model"]
    heads = m["n_layer"] * m["n_head"]
    tokens = r["kv_live_tokens"] / heads  # tokens cached per head (every head holds the same count here)
    table.append({
        "model": m.get("name") or str(m.get("source")),
        "store": r["tags"].get("store", "?"),
        "held": r["kv_bytes_held"],
        "live": r["kv_live_bytes"],
        "per_token": r["kv_live_bytes"] / tokens,  # K+V bytes of one token over all layers and heads
        "tokens": tokens,
        "rss": r["peak_rss_bytes"],
        "tps": r["decode_tokens_per_s"],
        "reps": r.get("repeat_tokens_per_s") or [],
        "median_ms": r["decode_step"]["median_ms"],
        "attn_core_ms": r["phase_ms"]["attn_core"],
    })
base = {t["model"]: t for t in table if t["store"] == "fp32"}
lines = ["| model | store | cached tokens | K+V bytes per token | KV held (MiB) | held vs fp32 | peak RSS (MiB) | "
         "median decode step (ms) | decode tok/s | tok/s vs fp32 | attention core, all runs (ms) |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
for t in table:
    b = base.get(t["model"])
    lines.append("| {} | {} | {:.0f} | {:.0f} | {:.2f} | {} | {:.0f} | {:.2f} | {:.2f} | {} | {:.0f} |".format(
        t["model"], t["store"], t["tokens"], t["per_token"], t["held"] / 2**20,
        "{:.1%}".format(t["held"] / b["held"]) if b else "-", t["rss"] / 2**20, t["median_ms"], t["tps"],
        "{:.2f}x".format(t["tps"] / b["tps"]) if b else "-", t["attn_core_ms"]))
open(os.path.join(out_dir, "summary.md"), "w").write("\n".join(lines) + "\n")
print("\n".join(lines))

models = list(dict.fromkeys(t["model"] for t in table))
fig, axes = plt.subplots(1, 2, figsize=(10, 4))
for ax, key, label in ((axes[0], "held", "KV bytes held at ~1024 tokens (% of fp32)"),
                       (axes[1], "tps", "decode tokens/s (relative to fp32)")):
    width = 0.25
    for i, store in enumerate(("fp32", "int8", "int4")):
        vals = []
        for m in models:
            t = next((x for x in table if x["model"] == m and x["store"] == store), None)
            vals.append(100.0 * t[key] / base[m][key] if t and m in base else 0)
        ax.bar([j + i * width for j in range(len(models))], vals, width, label=store)
    ax.set_xticks([j + width for j in range(len(models))])
    ax.set_xticklabels(models)
    ax.set_ylabel("% of fp32")
    ax.set_title(label, fontsize=9)
    ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(os.path.join(out_dir, "quant_bench.png"), dpi=110)
