#!/usr/bin/python3
"""plot_plan.py — roofline plots from `kvhost plan --json FILE --sweep` outputs.

Owns: turning the "sweep" arrays of one or more plan JSON files into two PNGs:
  ai_vs_context.png  attention arithmetic intensity vs context length (prefill and decode, one head)
  ai_vs_batch.png    decode-step arithmetic intensity vs batch size (weight matmuls, attention, whole step)
Does not own: any formula (all numbers come from the JSON written by kvhost plan).

usage: /usr/bin/python3 bench/plot_plan.py OUTDIR plan1.json [plan2.json ...]
"""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def label(d):
    m, i = d["model"], d["inputs"]
    return f'{m["name"]} (d={m["head_dim"]}, KV {i["kv_prec"]})'


def main(argv):
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    outdir, files = argv[1], argv[2:]
    runs = []
    for f in files:
        with open(f) as fh:
            d = json.load(fh)
        if "sweep" not in d:
            print(f"{f}: no 'sweep' (run kvhost plan with --sweep)", file=sys.stderr)
            return 1
        runs.append(d)
    os.makedirs(outdir, exist_ok=True)
    ridges = sorted({r["ridge"] for r in runs})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    # 1. attention AI vs context length. Curves that coincide (prefill does not depend on the KV
    # precision; decode hardly depends on d) are drawn once with both names in the legend.
    fig, ax = plt.subplots(figsize=(11, 5.2))
    drawn = {}
    for k, d in enumerate(runs):
        c = colors[k % len(colors)]
        n = [e["context"] for e in d["sweep"]["vs_context"]]
        for phase, style in (("prefill", "-o"), ("decode", "--s")):
            ys = [e[f"{phase}_ai"] for e in d["sweep"]["vs_context"]]
            key = (phase, tuple(round(y, 3) for y in ys))
            if key in drawn:
                line = drawn[key]
                line.set_label(line.get_label() + f"\n  = {phase}, {label(d)}")
                continue
            (drawn[key],) = ax.plot(n, ys, style, ms=3, color=c, label=f"{phase}, {label(d)}")
    for r in ridges:
        ax.axhline(r, color="k", lw=1, ls=":")
        ax.text(20, r * 1.12, f"ridge {r:.0f} FLOP/B (peak / bandwidth)", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length N (tokens)")
    ax.set_ylabel("arithmetic intensity (FLOP / byte)")
    ax.set_title("Non-fused attention, one head: AI vs context\n"
                 "(S and P written + read; below the ridge = memory-bound)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    p1 = os.path.join(outdir, "ai_vs_context.png")
    fig.savefig(p1, dpi=130)
    plt.close(fig)

    # 2. decode step AI vs batch
    fig, ax = plt.subplots(figsize=(11, 5.2))
    markers = "os^dv"
    drawn_b = {}
    for k, d in enumerate(runs):
        c = colors[k % len(colors)]
        b = [e["batch"] for e in d["sweep"]["vs_batch"]]
        vb = d["sweep"]["vs_batch"]
        ctx = d["inputs"]["context"]
        for kind, style, name in (("linear_ai", ":", "weight matmuls"),
                                  ("attention_ai", "--", f"attention (N={ctx})")):
            ys = [e[kind] for e in vb]
            key = (kind, tuple(round(y, 3) for y in ys))
            if key in drawn_b:  # identical curve (e.g. same weights, other KV precision)
                line = drawn_b[key]
                line.set_label(line.get_label() + f"\n  = {name}, {label(d)}")
                continue
            (drawn_b[key],) = ax.plot(b, ys, style, color=c, lw=1.2, label=f"{name}, {label(d)}")
        ax.plot(b, [e["step_ai"] for e in vb], "-" + markers[k % 5], ms=4, color=c, lw=max(0.8, 2.4 - 0.6 * k),
                label=f"whole decode step, {label(d)}")
        mb = int(d["kv"]["policy"]["max_batch_tp"])
        if 0 < mb < b[-1]:
            ax.axvline(mb, color=c, lw=0.8, alpha=0.6)
            ax.text(mb * 1.04, 0.12 * (1.6 ** k), f"max batch {mb}\n{d['model']['name']}, KV {d['inputs']['kv_prec']}",
                    fontsize=7, color=c)
    for r in ridges:
        ax.axhline(r, color="k", lw=1, ls=":")
        ax.text(1.1, r * 1.12, f"ridge {r:.0f} FLOP/B (peak / bandwidth)", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_ylim(0.1, max(ridges) * 4)
    ax.set_xlabel("batch size (requests decoding together)")
    ax.set_ylabel("arithmetic intensity (FLOP / byte)")
    ax.set_title("Decode step AI vs batch: weights are shared by the batch, each request's KV is not",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    p2 = os.path.join(outdir, "ai_vs_batch.png")
    fig.savefig(p2, dpi=130)
    plt.close(fig)
    print(p1)
    print(p2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
