#!/usr/bin/env python3
"""report_weights.py — tables (Markdown, stdout) and a plot from bench/weights_bench.sh's records.

usage: report_weights.py RECORDS.jsonl [--plot OUT.png]

Speed: per (format, threads), the median over rounds of decode tokens/s (batch 1, 128 + 128) and prefill
tokens/s (512-token prompt), with min-max, each as a ratio to fp32's median at the same threads, plus
weight bytes held, bytes read per decoded token and peak RSS. Quality: per text, teacher-forced ppl and
its change against fp32, streaming KL(P_fp32 || P_format) and top-1 agreement.
Standard library only (matplotlib for --plot when installed). Lines that are not valid JSON are skipped
with a warning naming file:line.
"""
import json
import statistics
import sys

FORMATS = ["fp32", "f16", "bf16", "w8", "w4", "smoothquant"]


def load_records(path):
    recs = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, 1):
            try:
                r = json.loads(line)
            except ValueError:
                print(f"report_weights: {path}:{i}: not JSON, skipped", file=sys.stderr)
                continue
            if isinstance(r, dict) and (r.get("tags") or {}).get("bench") == "weights":
                recs.append(r)
    return recs


def med_range(xs):
    if not xs:
        return None, None, None
    return statistics.median(xs), min(xs), max(xs)


def speed_rows(recs):
    rows = {}
    for r in recs:
        t = r["tags"]
        if t.get("test") not in ("decode", "prefill"):
            continue
        key = (t["format"], r["threads"])
        d = rows.setdefault(key, {"decode": [], "prefill": [], "bytes": r.get("weights_bytes_held"),
                                   "per_token": None, "rss": [], "load": []})
        if t["test"] == "decode":
            d["decode"].append(r["decode_tokens_per_s"])
            d["per_token"] = r.get("weight_bytes_per_token")
        else:
            n = sum(r["prompt_tokens"])
            d["prefill"].append(n / (r["prefill_ms"] / 1000.0))
        d["rss"].append(r.get("peak_rss_bytes") or 0)
        try:
            d["load"].append(float(t.get("load", "nan")))
        except ValueError:
            pass
    return rows


def fmt_cell(m, lo, hi, base):
    if m is None:
        return "—", "—"
    ratio = f"{m / base:.2f}x" if base else "—"
    return f"{m:.2f} ({lo:.2f}–{hi:.2f})", ratio


def main(argv):
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    recs = load_records(argv[1])
    rows = speed_rows(recs)
    out = []
    out.append("# Weight formats: speed, bytes, quality\n")
    out.append("Produced by `bench/weights_bench.sh` (raw records: weights.jsonl, appended run after run; this "
               "page is rebuilt from all of them by `bench/report_weights.py`). GPT-2 Medium shapes with seeded "
               "random weights (speed and bytes are real, text is not); quality on the tiny trained model.\n")
    machines = sorted({(r.get("machine") or {}).get("cpu", "?") for r in recs})
    kernels = sorted({r.get("kernels", "?") for r in recs if r.get("kernels")})
    commits = sorted({r.get("commit", "?") for r in recs})
    out.append(f"Machine: {', '.join(machines)}; kernels: {'; '.join(kernels)}; commits: {', '.join(commits)}.\n")
    out.append("## Speed (batch 1; medians over rounds, min–max in brackets; ratios against fp32 at the same threads)\n")
    out.append("| format | threads | decode tok/s (128+128) | vs fp32 | prefill tok/s (512) | vs fp32 | weights MiB | "
               "MiB read / token | peak RSS MiB | load (median) |")
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for threads in sorted({k[1] for k in rows}):
        base = rows.get(("fp32", threads), {})
        bd = med_range(base.get("decode", []))[0]
        bp = med_range(base.get("prefill", []))[0]
        for f in FORMATS:
            d = rows.get((f, threads))
            if not d:
                continue
            dc, dr = fmt_cell(*med_range(d["decode"]), bd)
            pc, pr = fmt_cell(*med_range(d["prefill"]), bp)
            mib = lambda b: f"{b / 1048576:.0f}" if b else "—"
            load_med = f"{statistics.median(d['load']):.2f}" if d["load"] else "—"
            out.append(f"| {f} | {threads} | {dc} | {dr} | {pc} | {pr} | {mib(d['bytes'])} | {mib(d['per_token'])} | "
                       f"{mib(max(d['rss']) if d['rss'] else 0)} | {load_med} |")
    q = {}
    for r in recs:
        t = r["tags"]
        if t.get("test") != "quality":
            continue
        q.setdefault(t.get("text", "?"), {}).setdefault(t["format"], {})[r.get("mode")] = r
    if q:
        out.append("\n## Quality (tiny model, first 2048 tokens, context 1024)\n")
        out.append("Teacher-forced perplexity, its change against fp32 weights, and with every token decoded through "
                   "the cache: mean KL(P_fp32 || P_format) per token and top-1 agreement with fp32.\n")
        out.append("| text | format | ppl | Δ ppl vs fp32 | KL mean | KL max | top-1 |")
        out.append("|---|---|---:|---:|---:|---:|---:|")
        for text in sorted(q):
            base = q[text].get("fp32", {}).get("teacher")
            for f in FORMATS:
                m = q[text].get(f)
                if not m:
                    continue
                te, st = m.get("teacher"), m.get("stream")
                ppl = te["ppl"] if te else None
                delta = f"{(ppl / base['ppl'] - 1) * 100:+.3f} %" if ppl and base else "—"
                kl = f"{st['kl_mean']:.2e}" if st and st.get("kl_mean") is not None else "—"
                klm = f"{st['kl_max']:.2e}" if st and st.get("kl_max") is not None else "—"
                top1 = f"{st['top1_agreement'] * 100:.2f} %" if st and st.get("top1_agreement") is not None else "—"
                out.append(f"| {text} | {f} | {ppl:.3f} | {delta} | {kl} | {klm} | {top1} |" if ppl else
                           f"| {text} | {f} | — | — | {kl} | {klm} | {top1} |")
    print("\n".join(out))
    if "--plot" in argv:
        plot(rows, argv[argv.index("--plot") + 1])
    return 0


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("report_weights: matplotlib not installed: no plot", file=sys.stderr)
        return
    threads = sorted({k[1] for k in rows})
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, test, title in ((axes[0], "decode", "decode tok/s (batch 1, 128+128)"),
                            (axes[1], "prefill", "prefill tok/s (512 tokens)")):
        width = 0.8 / max(1, len(threads))
        for ti, t in enumerate(threads):
            xs, ys = [], []
            for fi, f in enumerate(FORMATS):
                d = rows.get((f, t))
                if d and d[test]:
                    xs.append(fi + ti * width)
                    ys.append(statistics.median(d[test]))
            ax.bar(xs, ys, width=width, label=f"{t} thread{'s' if t > 1 else ''}")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(FORMATS))])
        ax.set_xticklabels(FORMATS)
        ax.set_title(title)
        ax.legend()
    fig.suptitle("GPT-2 Medium shapes, kvhost weight formats (medians over rounds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
