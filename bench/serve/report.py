#!/usr/bin/env python3
"""report.py — the table and plot of a serve_bench.sh run: per server, the median over rounds (and the
range) of requests/s, streamed tokens/s, p50/p99 time to first token and time per output token, errors,
and each measure's ratio kvhost / llama-server.

Reads `serve_load` records that carry `server` and `round` (serve_bench.sh writes them; older records
without them are skipped). --run-id-from TIME_UTC keeps records written at or after that time (one run
out of an appended file). Writes OUT/table.md and, when matplotlib is importable, OUT/serve.png
(tokens/s and TPOT p50 per round, one line per server). Standard library only for the table.

usage: report.py RESULTS.jsonl --out DIR [--since 2026-12-05T04:00:00Z]
"""
import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import jsonl  # noqa: E402

MEASURES = [  # (key in the table, title, getter, higher is better)
    ("rps", "req/s", lambda r: r["requests_per_s"], True),
    ("tps", "tokens/s", lambda r: r["chunks_per_s"], True),
    ("ttft50", "TTFT p50 ms", lambda r: r["ttft_ms"]["p50"], False),
    ("ttft99", "TTFT p99 ms", lambda r: r["ttft_ms"]["p99"], False),
    ("tpot50", "TPOT p50 ms", lambda r: r["tpot_ms"]["p50"], False),
    ("tpot99", "TPOT p99 ms", lambda r: r["tpot_ms"]["p99"], False),
]


def load(path, since):
    runs = {}
    for where, r in jsonl.records(path, "report.py"):
        if r.get("record") != "serve_load" or "server" not in r or "round" not in r:
            continue
        if since and r.get("time_utc", "") < since:
            continue
        runs.setdefault(r["server"], []).append(r)
    for v in runs.values():
        v.sort(key=lambda r: r["round"])
    return runs


def fmt(v):
    return "-" if v is None else (f"{v:.2f}" if abs(v) < 100 else f"{v:.0f}")


def summary(recs):
    out = {}
    for key, _, get, _ in MEASURES:
        vals = [get(r) for r in recs if get(r) is not None]
        out[key] = (statistics.median(vals), min(vals), max(vals)) if vals else None
    out["errors"] = sum(r["errors"] for r in recs)
    out["requests"] = sum(r["requests_ok"] for r in recs)
    out["rounds"] = len(recs)
    return out


def table(runs):
    lines = ["| server | rounds | requests | " + " | ".join(t for _, t, _, _ in MEASURES) + " | errors |",
             "|---|---:|---:|" + "---:|" * len(MEASURES) + "---:|"]
    sums = {s: summary(v) for s, v in sorted(runs.items())}
    for s, m in sums.items():
        cells = []
        for key, _, _, _ in MEASURES:
            v = m[key]
            cells.append("-" if v is None else f"{fmt(v[0])} ({fmt(v[1])}–{fmt(v[2])})")
        lines.append(f"| {s} | {m['rounds']} | {m['requests']} | " + " | ".join(cells) + f" | {m['errors']} |")
    if "kvhost" in sums and "llama-server" in sums:
        k, l = sums["kvhost"], sums["llama-server"]
        cells = []
        for key, _, _, higher in MEASURES:
            if k[key] is None or l[key] is None or not l[key][0] or not k[key][0]:
                cells.append("-")
            else:
                # always "how many times better kvhost is": rates kvhost/llama, latencies llama/kvhost
                r = k[key][0] / l[key][0] if higher else l[key][0] / k[key][0]
                cells.append(f"{r:.2f}x")
        lines.append("| kvhost advantage (medians) | | | " + " | ".join(cells) + " | |")
    return "\n".join(lines) + "\n", sums


def plot(runs, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("report.py: matplotlib not found, no plot", file=sys.stderr)
        return False
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for s, recs in sorted(runs.items()):
        rounds = [r["round"] for r in recs]
        axes[0].plot(rounds, [r["chunks_per_s"] for r in recs], marker="o", label=s)
        axes[1].plot(rounds, [r["tpot_ms"]["p50"] for r in recs], marker="o", label=s)
    axes[0].set_title("streamed tokens/s (higher is better)")
    axes[1].set_title("time per output token, p50 ms (lower is better)")
    rounds = sorted({r["round"] for recs in runs.values() for r in recs})
    for ax in axes:
        ax.set_xlabel("round")
        ax.set_xticks(rounds)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results")
    ap.add_argument("--out", required=True)
    ap.add_argument("--since", default="")
    a = ap.parse_args(argv[1:])
    runs = load(a.results, a.since)
    if not runs:
        print(f"report.py: no serve_load records with server and round in {a.results}", file=sys.stderr)
        return 1
    text, _ = table(runs)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "table.md"), "w") as f:
        f.write(text)
    sys.stdout.write(text)
    plot(runs, os.path.join(a.out, "serve.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
