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


def model_name(r):
    m = r["model"]
    return m.get("name") or m.get("spec") if isinstance(m, dict) else str(m)


table = []
for r in rows:
    tokens = r["kv_live_tokens"] / max(1, r["model"]["n_layer"] * r["model"]["n_head"]) if isinstance(r["model"], dict) and "n_layer" in r["model"] else None
    table.append({
        "model": model_name(r),
        "store": r["tags"].get("store", "?"),
        "held": r["kv_bytes_held"],
        "live": r["kv_live_bytes"],
        "live_tokens": r["kv_live_tokens"],
        "rss": r["peak_rss_bytes"],
        "tps": r["decode_tokens_per_s"],
        "reps": r.get("repeat_tokens_per_s"),
        "median_ms": r["decode_step"].get("median_ms") if isinstance(r["decode_step"], dict) else None,
        "attn_ms": (r.get("phase_ms") or {}).get("attention"),
    })
base = {t["model"]: t for t in table if t["store"] == "fp32"}
lines = ["| model | store | KV held (MiB) | vs fp32 | live K/V bytes per cached token (all layers) | peak RSS (MiB) | decode tok/s (median step) | vs fp32 | per-repeat tok/s |",
         "|---|---|---|---|---|---|---|---|---|"]
for t in table:
    b = base.get(t["model"])
    # live_tokens counts (layer, head, token) slots; bytes per cached token = live bytes / tokens of one head
    per_tok = t["live"] / (t["live_tokens"] / (t["live_tokens"] / max(1, 1)))  # placeholder, replaced below
    lines.append("| {} | {} | {:.2f} | {} | {} | {:.0f} | {:.2f} | {} | {} |".format(
        os.path.basename(t["model"].rstrip("/")), t["store"], t["held"] / 2**20,
        "{:.1%}".format(t["held"] / b["held"]) if b else "-",
        "{:.0f}".format(t["per_token"]) if "per_token" in t else "-",
        t["rss"] / 2**20, t["tps"], "{:.2f}x".format(t["tps"] / b["tps"]) if b else "-",
        ", ".join("{:.2f}".format(x) for x in (t["reps"] or []))))
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
    ax.set_xticklabels([os.path.basename(m.rstrip("/")) for m in models])
    ax.set_ylabel("% of fp32")
    ax.set_title(label, fontsize=9)
    ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(os.path.join(out_dir, "quant_bench.png"), dpi=110)
