#!/usr/bin/env python3
"""report_engine.py — the engine benchmark's table and plots from results.jsonl (engine_bench.sh's output: the
`replay` records of kvhost, llama-server and transformers, plus `engine_bench_start` records).

  /usr/bin/python3 bench/engine/report_engine.py RESULTS.jsonl [--out-dir docs/results/engine]
      [--cdf-rate R] [--timeline TIMELINE.jsonl ...] [--all]

Writes OUT/table.md (one row per system and arrival rate: requests/s, generated tokens/s, TTFT p50/p99, TPOT
p50/p99, max concurrent; with --all every record, else the newest per system and rate; and kvhost's ratios to
the peers when it is there), and, when matplotlib imports:
  OUT/throughput.png   generated tokens/s and requests/s against the arrival rate, one line per system
  OUT/latency_cdf.png  CDFs of per-request TTFT and TPOT at one rate (--cdf-rate, default the middle rate), from
                       each record's "per_request" rows (a record without them is left out, with a note)
  OUT/kv_timeline.png  for each --timeline file (kvhost replay --timeline: {"t_s","running","waiting",
                       "kv_bytes","kv_tokens"} per engine step): KV bytes held and running/waiting sequences over
                       time; no --timeline, no plot.
The arrival rate of a record is read from its trace's file name (trace-rate<R>.jsonl, as engine_bench.sh names
them), else computed from the trace file (requests - 1) / (last arrival - first arrival). The system: "peer"
("llama-server", "transformers"), or "kvhost" (peer null) with its plugin stack appended when it has one.
Standard library for the table; matplotlib for the plots.
"""
import argparse
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import jsonl  # noqa: E402

TOOL = "report_engine"
ORDER = {"kvhost": 0, "llama-server": 1, "transformers": 2}


def note(msg):
    print(f"{TOOL}: note: {msg}", file=sys.stderr)


def system_of(rec):
    if rec.get("peer"):
        return rec["peer"]
    name = "kvhost"
    pl = rec.get("plugins")
    if isinstance(pl, dict) and pl.get("instances"):
        name += " " + "+".join(str(i.get("plugin", "?")) for i in pl["instances"])
    elif isinstance(pl, list) and pl:
        name += " " + "+".join(str(p) for p in pl)
    elif isinstance(pl, str) and pl:
        name += " " + pl
    return name


_rate_cache = {}


def rate_of(rec):
    trace = rec.get("trace") or ""
    m = re.search(r"rate([0-9]+(?:\.[0-9]+)?)", os.path.basename(trace))
    if m:
        return float(m.group(1))
    if trace in _rate_cache:
        return _rate_cache[trace]
    r = None
    try:
        arr = sorted(json.loads(line)["arrival"] for line in open(trace) if line.strip())
        if len(arr) > 1 and arr[-1] > arr[0]:
            r = round((len(arr) - 1) / (arr[-1] - arr[0]), 3)
    except (OSError, ValueError, KeyError):
        pass
    _rate_cache[trace] = r
    return r


def frate(x):
    return "—" if x is None else f"{x:g}"


def load_span(m):
    a, b = m.get("load1_start"), m.get("load1_end")
    return "—" if a is None and b is None else f"{fmt(a, 2)}-{fmt(b, 2)}"


def fmt(x, nd=None):
    if x is None:
        return "—"
    if nd is None:
        nd = 3 if abs(x) < 1 else 2 if abs(x) < 10 else 1 if abs(x) < 1000 else 0
    return f"{x:.{nd}f}"


def load(path, keep_all):
    recs, starts = [], []
    for where, r in jsonl.records(path, TOOL):
        if r.get("command") == "engine_bench_start":
            starts.append(r)
        elif r.get("command") == "replay":
            r["_where"], r["_system"], r["_rate"] = where, system_of(r), rate_of(r)
            recs.append(r)
    if not keep_all:
        newest = {}
        for r in recs:  # file order = time order: the later one wins
            newest[(r["_system"], r["_rate"])] = r
        recs = list(newest.values())
    recs.sort(key=lambda r: (r["_rate"] if r["_rate"] is not None else 1e9, ORDER.get(r["_system"].split()[0], 9),
                             r["_system"]))
    return recs, starts


def table(recs, starts, path_in):
    out = ["# Engine benchmark: kvhost replay beside llama-server and transformers", ""]
    out.append(f"From `{path_in}` ({len(recs)} replay records shown). Rate: requests/s offered by the trace "
               "(Poisson). req/s and tok/s: completed requests and generated tokens over the replay's duration "
               "(time 0 to the last token). TTFT: arrival to first token, queueing included. TPOT: per-request "
               "mean time between output tokens. p50/p99: nearest rank over requests. Max conc.: most sequences "
               "decoding at once (llama-server: seen from the client; transformers: the largest batch). "
               "bench/engine/README.md says how each system is run and measured.")
    out.append("")
    if starts:
        s = starts[-1]
        out.append(f"Last run: {s.get('timestamp')}: {s.get('requests')} requests a trace, prompt {s.get('prompt_len')} "
                   f"tokens, max_tokens {s.get('max_tokens')}, prefix share {s.get('prefix_share')} of "
                   f"{s.get('prefix_len')} tokens, seed {s.get('seed')}, threads {s.get('threads')}, llama-server "
                   f"-np {s.get('llama_parallel')}, transformers batch {s.get('hf_batch')} "
                   f"({s.get('hf_dispatch')}); load {s.get('load1')} at start.")
        for sk in s.get("skipped") or []:
            out.append(f"- skipped: {sk}")
        out.append("")
    machines = {json.dumps({k: (r.get("machine") or {}).get(k) for k in ("host", "cpu", "cores")}) for r in recs}
    for m in sorted(machines):
        m = json.loads(m)
        out.append(f"Machine: {m.get('cpu')}, {m.get('cores')} cores (host {m.get('host')}).")
    versions = sorted({f"{r['_system']}: {r.get('tool_version') or r.get('kvhost_version') or '?'}" for r in recs})
    for v in versions:
        out.append(f"- {v}")
    out.append("")
    out.append("| system | rate | done | req/s | tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms "
               "| max conc. | threads | load start-end |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in recs:
        t, p, m = r.get("ttft_ms") or {}, r.get("tpot_ms") or {}, r.get("machine") or {}
        out.append(f"| {r['_system']} | {frate(r['_rate'])} | {r.get('completed')}/{r.get('requests')} "
                   f"| {fmt(r.get('requests_per_s'))} | {fmt(r.get('tokens_per_s'))} | {fmt(t.get('p50'), 0)} "
                   f"| {fmt(t.get('p99'), 0)} | {fmt(p.get('p50'), 1)} | {fmt(p.get('p99'), 1)} "
                   f"| {r.get('max_concurrent', '—')} | {r.get('threads', '—')} "
                   f"| {load_span(m)} |")
    # kvhost against the peers at each rate (issue #15's goals: >= llama-server, >= 3.8x transformers)
    by = {}
    for r in recs:
        by.setdefault(r["_rate"], {})[r["_system"]] = r
    rows = []
    for rate in sorted(k for k in by if k is not None):
        d = by[rate]
        for ks in sorted(s for s in d if s.startswith("kvhost")):
            for peer in ("llama-server", "transformers"):
                if peer in d:
                    k, q = d[ks], d[peer]
                    ratio = lambda f: (k.get(f) / q[f]) if k.get(f) and q.get(f) else None  # noqa: E731
                    rows.append(f"| {frate(rate)} | {ks} / {peer} | {fmt(ratio('requests_per_s'))}x "
                                f"| {fmt(ratio('tokens_per_s'))}x | {fmt((k.get('tpot_ms') or {}).get('p99'), 1)} vs "
                                f"{fmt((q.get('tpot_ms') or {}).get('p99'), 1)} |")
    if rows:
        out += ["", "## kvhost over the peers", "",
                "| rate | pair | req/s ratio | tok/s ratio | TPOT p99 ms (kvhost vs peer) |", "|---|---|---|---|---|"]
        out += rows
    eng = [r for r in recs if "kv_bytes_peak" in r]
    if eng:
        out += ["", "## kvhost engine figures", "",
                "| system | rate | KV peak MiB | KV tokens peak | prefix hit rate | prompt tokens shared | preemptions "
                "| steps | max_seqs |", "|---|---|---|---|---|---|---|---|---|"]
        for r in eng:
            e = r.get("engine") or {}
            hit = r.get("prefix_hit_rate")
            out.append(f"| {r['_system']} | {frate(r['_rate'])} | {fmt((r.get('kv_bytes_peak') or 0) / 2**20, 1)} "
                       f"| {r.get('kv_tokens_peak', '—')} | {'—' if hit is None else f'{100 * hit:.0f}%'} "
                       f"| {r.get('prompt_tokens_shared', '—')} | {r.get('preemptions', '—')} | {r.get('steps', '—')} "
                       f"| {e.get('max_seqs', '—')} |")
    errs = [r for r in recs if r.get("errors")]
    if errs:
        out += ["", "Failed requests: " + "; ".join(f"{r['_system']} at {frate(r['_rate'])}: {r['errors']}" for r in errs)]
    return "\n".join(out) + "\n"


def cdf_points(vals):
    s = sorted(v for v in vals if v is not None)
    return s, [(i + 1) / len(s) for i in range(len(s))]


def plots(recs, out_dir, cdf_rate, timelines):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        note("no matplotlib: plots skipped (apt-get install python3-matplotlib; run with /usr/bin/python3)")
        return []
    made = []
    systems = sorted({r["_system"] for r in recs}, key=lambda s: (ORDER.get(s.split()[0], 9), s))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for s in systems:
        rs = sorted((r for r in recs if r["_system"] == s and r["_rate"] is not None), key=lambda r: r["_rate"])
        if not rs:
            continue
        x = [r["_rate"] for r in rs]
        axes[0].plot(x, [r.get("tokens_per_s") or 0 for r in rs], marker="o", label=s)
        axes[1].plot(x, [r.get("requests_per_s") or 0 for r in rs], marker="o", label=s)
    rates = sorted({r["_rate"] for r in recs if r["_rate"] is not None})
    if rates:
        axes[1].plot(rates, rates, ls=":", color="grey", label="offered")
    axes[0].set(xlabel="arrival rate (requests/s)", ylabel="generated tokens/s", title="Throughput")
    axes[1].set(xlabel="arrival rate (requests/s)", ylabel="completed requests/s", title="Requests served")
    for ax in axes:
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    p = os.path.join(out_dir, "throughput.png")
    fig.savefig(p, dpi=120)
    plt.close(fig)
    made.append(p)

    if rates:
        if cdf_rate is None:
            cdf_rate = rates[len(rates) // 2]
        at = [r for r in recs if r["_rate"] is not None and abs(r["_rate"] - cdf_rate) < 1e-9]
        if not at:
            note(f"no record at rate {cdf_rate}: no latency CDF")
        else:
            fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
            for r in at:
                rows = r.get("per_request")
                if not rows:
                    note(f"{r['_system']} at rate {cdf_rate}: no per_request rows, left out of the CDF")
                    continue
                for ax, key in zip(axes, ("ttft_ms", "tpot_ms")):
                    x, y = cdf_points(row.get(key) for row in rows)
                    if x:
                        ax.step(x, y, where="post", label=r["_system"])
            axes[0].set(xlabel="time to first token (ms)", ylabel="share of requests", title=f"TTFT at {cdf_rate} req/s")
            axes[1].set(xlabel="time per output token (ms)", ylabel="share of requests", title=f"TPOT at {cdf_rate} req/s")
            for ax in axes:
                ax.set_xscale("log")
                ax.grid(alpha=0.3)
                ax.legend()
            fig.tight_layout()
            p = os.path.join(out_dir, "latency_cdf.png")
            fig.savefig(p, dpi=120)
            plt.close(fig)
            made.append(p)

    if timelines:
        fig, axes = plt.subplots(len(timelines), 1, figsize=(10, 3.2 * len(timelines)), squeeze=False)
        for ax, path in zip(axes[:, 0], timelines):
            pts = [r for _, r in jsonl.records(path, TOOL) if "t_s" in r]
            if not pts:
                note(f"{path}: no timeline rows")
                continue
            t = [r["t_s"] for r in pts]
            ax.plot(t, [(r.get("kv_bytes") or 0) / 2**20 for r in pts], color="C0", drawstyle="steps-post", label="KV held (MiB)")
            ax.set(xlabel="time (s)", ylabel="KV bytes held (MiB)", title=os.path.basename(path))
            ax2 = ax.twinx()
            ax2.plot(t, [r.get("running", 0) for r in pts], color="C1", lw=0.8, drawstyle="steps-post", label="running")
            ax2.plot(t, [r.get("waiting", 0) for r in pts], color="C2", lw=0.8, drawstyle="steps-post", label="waiting")
            ax2.set_ylabel("sequences")
            h1, l1 = ax.get_legend_handles_labels()
            h2, l2 = ax2.get_legend_handles_labels()
            ax.legend(h1 + h2, l1 + l2, loc="upper left")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        p = os.path.join(out_dir, "kv_timeline.png")
        fig.savefig(p, dpi=120)
        plt.close(fig)
        made.append(p)
    return made


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results")
    ap.add_argument("--out-dir", default=None, help="default: the results file's folder")
    ap.add_argument("--cdf-rate", type=float, default=None)
    ap.add_argument("--timeline", action="append", default=[])
    ap.add_argument("--all", action="store_true", help="every record, not only the newest per system and rate")
    a = ap.parse_args(argv)
    out_dir = a.out_dir or os.path.dirname(os.path.abspath(a.results))
    os.makedirs(out_dir, exist_ok=True)
    recs, starts = load(a.results, a.all)
    if not recs:
        print(f"{TOOL}: {a.results}: no replay records", file=sys.stderr)
        return 1
    md = table(recs, starts, a.results)
    made = plots(recs, out_dir, a.cdf_rate, a.timeline)
    if made:
        md += "\n" + "\n".join(f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in made) + "\n"
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(md)
    print(md)
    for p in made:
        print(f"{TOOL}: wrote {p}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
