#!/usr/bin/env python3
"""report_quant.py — summarizes bench/quant_bench.sh records into summary.md and quant_bench.png beside them.
Medians over the rounds of each (model, store); speed relative to the fp32 cache of the same model.
usage: python3 bench/report_quant.py OUT_DIR/quant_bench.jsonl"""
import os
import statistics
import sys

import jsonl  # bench/jsonl.py: reading record files whatever their bytes

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STORES = ("fp32", "int8", "int4", "int8-kivi", "int4-kivi")


def summarize(rows):
    groups = {}
    for r in rows:
        m = r["model"]
        key = (m.get("name") or str(m.get("source")), r["tags"].get("store", "?"))
        groups.setdefault(key, []).append(r)
    table = []
    for (model, store), rs in groups.items():
        m = rs[0]["model"]
        heads = m["n_layer"] * m["n_head"]
        tokens = rs[0]["kv_live_tokens"] / heads
        tps = [r["decode_tokens_per_s"] for r in rs]
        table.append({
            "model": model, "store": store, "rounds": len(rs), "tokens": tokens,
            "held": rs[0]["kv_bytes_held"], "peak": rs[0]["kv_bytes_peak"],
            "per_token": rs[0]["kv_bytes_held"] / tokens,
            "rss": statistics.median(r["peak_rss_bytes"] for r in rs),
            "tps": statistics.median(tps), "tps_min": min(tps), "tps_max": max(tps),
            "step": statistics.median(r["decode_step"]["median_ms"] for r in rs),
        })
    table.sort(key=lambda t: (t["model"], STORES.index(t["store"]) if t["store"] in STORES else 99))
    return table


def main():
    path = sys.argv[1]
    out_dir = os.path.dirname(os.path.abspath(path))
    rows = [r for _, r in jsonl.records(path, "report_quant")]
    table = summarize(rows)
    base = {t["model"]: t for t in table if t["store"] == "fp32"}
    lines = ["| model | store | cached tokens | KV bytes held per token | KV held (MiB) | held vs fp32 | peak RSS (MiB) | "
             "decode step median (ms) | decode tok/s (min-max over rounds) | tok/s vs fp32 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for t in table:
        b = base.get(t["model"])
        lines.append("| {} | {} | {:.0f} | {:.0f} | {:.2f} | {} | {:.0f} | {:.2f} | {:.2f} ({:.2f}-{:.2f}) | {} |".format(
            t["model"], t["store"], t["tokens"], t["per_token"], t["held"] / 2**20,
            "{:.1%}".format(t["held"] / b["held"]) if b else "-", t["rss"] / 2**20, t["step"], t["tps"],
            t["tps_min"], t["tps_max"], "{:.3f}x".format(t["tps"] / b["tps"]) if b else "-"))
    open(os.path.join(out_dir, "summary.md"), "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))

    models = list(dict.fromkeys(t["model"] for t in table))
    stores = [s for s in STORES if any(t["store"] == s for t in table)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "held", "KV bytes held at ~1024 tokens (% of fp32)"),
                           (axes[1], "tps", "decode tokens/s at ~1024 tokens (% of fp32)")):
        width = 0.8 / max(1, len(stores))
        for i, store in enumerate(stores):
            vals = []
            for m in models:
                t = next((x for x in table if x["model"] == m and x["store"] == store), None)
                vals.append(100.0 * t[key] / base[m][key] if t and m in base else 0)
            ax.bar([j + i * width for j in range(len(models))], vals, width, label=store)
        ax.set_xticks([j + width * (len(stores) - 1) / 2 for j in range(len(models))])
        ax.set_xticklabels(models)
        ax.set_ylabel("% of fp32")
        ax.axhline(100, color="black", linewidth=0.6)
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "quant_bench.png"), dpi=110)


if __name__ == "__main__":
    main()
