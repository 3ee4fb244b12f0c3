#!/usr/bin/env python3
"""report.py — plots and a markdown report from kvbench / kvhost JSON Lines.

Owns: reading records (generate, capacity, eval), the schema check of the fields the report needs, the
markdown tables, the PNG plots (matplotlib, optional) and docs/results/bench/README.md.
Does not own: running anything (bench/kvbench.py, kvhost).

  python3 bench/report.py RESULTS.jsonl [MORE.jsonl ...] --out docs/results/bench [--no-plots]
  python3 bench/report.py --check RESULTS.jsonl      (schema check only)

Where one (model, config, T, batch, backend) was measured more than once, the last record in file order
is reported (results are appended, so that is the newest).

Per (model, backend, batch): a generate table, a phase table and the plots against T. Per (model, backend)
with more than one batch size: throughput (decode tokens/s over the whole batch) against batch size, each
configuration at the largest T it was run at under every batch size, as a table and a plot.

Peer records (PyTorch eager, HF transformers; written by kvbench.py in the generate schema with a `peer`
field) are one more series in the latency and per-token plots and rows in the generate table; they have no
KV bytes or phases (null), so they are left out of the KV-bytes, phase and Pareto plots and shown as '-'.
"""
import argparse
import os
import re
import sys

import jsonl  # bench/jsonl.py: reading record files whatever their bytes

# Fields every generate record must carry for the report (dotted = nested).
GENERATE_FIELDS = [
    "record", "commit", "machine.host", "machine.cpu", "machine.cores", "model.name", "backend", "threads",
    "no_cache", "plugins", "batch", "tags", "prompt_tokens", "generated_tokens", "prefill_ms",
    "decode_step.median_ms", "decode_step.p10_ms", "decode_step.p90_ms", "decode_tokens_per_s",
    "warmup_runs", "repeats", "kv_bytes_held", "kv_bytes_peak", "peak_rss_bytes", "total_ms",
    "phase_ms.embed", "phase_ms.attn_proj", "phase_ms.attn_core", "phase_ms.mlp", "phase_ms.lm_head",
    "phase_ms.plugin_hooks", "phase_ms.other",
]
CAPACITY_FIELDS = ["record", "commit", "machine.host", "model.name", "prompt_tokens", "mem_limit", "max_batch",
                   "tags.config"]
EVAL_FIELDS = ["record", "commit", "model.name", "mode", "ppl"]
PHASES = ["embed", "attn_proj", "attn_core", "mlp", "lm_head", "plugin_hooks", "other"]
MIB = 1048576.0


def get(rec, dotted):
    cur = rec
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise KeyError(dotted)
        cur = cur[part]
    return cur


def has(rec, dotted):
    try:
        get(rec, dotted)
        return True
    except KeyError:
        return False


def check_schema(records):
    """Returns a list of problems: 'line N (generate): missing field X'. A peer record (generate with a
    `peer` field) must also name the peer's version; its null fields count as present."""
    problems = []
    need = {"generate": GENERATE_FIELDS, "capacity": CAPACITY_FIELDS, "eval": EVAL_FIELDS}
    for i, (src, rec) in enumerate(records):
        kind = rec.get("record")
        if kind not in need:
            problems.append(f"{src}: unknown record kind {kind!r}")
            continue
        for f in need[kind]:
            if not has(rec, f):
                problems.append(f"{src} ({kind}): missing field {f}")
        if kind == "generate" and rec.get("peer") is not None and not rec.get("peer_version"):
            problems.append(f"{src} (generate, peer {rec['peer']}): missing field peer_version")
    return problems


def read_records(paths):
    """(FILE:LINE, record) in file order; invalid UTF-8 and lines that are not records are warned about
    (bench/jsonl.py)."""
    out = []
    for p in paths:
        out.extend(jsonl.records(p, "report"))
    return out


def config_name(rec):
    tags = rec.get("tags") or {}
    if "config" in tags:
        return tags["config"]
    if rec.get("no_cache"):
        return "no_cache"
    pl = rec.get("plugins")
    if isinstance(pl, dict) and pl.get("instances"):
        return "+".join(i.get("plugin", "?") for i in pl["instances"])
    return "full"


def model_name(rec):
    return get(rec, "model.name")


def is_peer(rec):
    return rec.get("peer") is not None


def num(x, digits=1, scale=1.0):
    """A number for a table cell, '-' for a field the record's engine does not measure (null)."""
    return "-" if x is None else fmt(x / scale, digits)


def slug(text):
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


class Data:
    """Records grouped for the report, in first-appearance order."""

    def __init__(self, records):
        self.gen = {}       # (model, backend, batch, config, T) -> record (last wins)
        self.cap = {}       # (model, config, T, mem_limit) -> record
        self.evals = {}     # (model, config, mode, ctx) -> record
        self.models, self.configs = [], []
        self.peers = {}     # config name -> "kind (version)" for peer series
        for _, r in records:
            kind = r.get("record")
            if kind not in ("generate", "capacity", "eval"):
                continue
            m, c = model_name(r), config_name(r)
            if m not in self.models:
                self.models.append(m)
            if c not in self.configs:
                self.configs.append(c)
            if kind == "generate":
                if is_peer(r):
                    self.peers[c] = f"{r['peer']} ({r.get('peer_version') or '?'})"
                t = r["prompt_tokens"][0]
                self.gen[(m, r["backend"], r["batch"], c, t)] = r
            elif kind == "capacity":
                self.cap[(m, c, r["prompt_tokens"], r["mem_limit"])] = r
            else:
                self.evals[(m, c, r.get("mode", "?"), r.get("ctx", 0))] = r

    def series(self, model, backend, batch, config):
        pts = [(k[4], r) for k, r in self.gen.items() if k[:4] == (model, backend, batch, config)]
        return sorted(pts, key=lambda x: x[0])

    def label(self, config):
        """Legend label: the config name, plus the peer kind for a peer series."""
        return f"{config} [{self.peers[config].split(' ')[0]} peer]" if config in self.peers else config

    def batch_sizes(self, model, backend):
        """The batch sizes measured for (model, backend), ascending."""
        return sorted({k[2] for k in self.gen if k[:2] == (model, backend)})

    def throughput_points(self, model, backend, config):
        """(T, {batch: record}) at the largest T that config was measured at under every batch size of
        (model, backend), or None when it has no such T (or only one batch size exists)."""
        bs = self.batch_sizes(model, backend)
        if len(bs) < 2:
            return None
        by_t = {}
        for k, r in self.gen.items():
            if k[:2] == (model, backend) and k[3] == config:
                by_t.setdefault(k[4], {})[k[2]] = r
        common = [t for t, rs in by_t.items() if all(b in rs for b in bs)]
        return (max(common), by_t[max(common)]) if common else None

    def backends(self, model):
        """Backends with generate records for model, in first-appearance order."""
        seen = []
        for k in self.gen:
            if k[0] == model and k[1] not in seen:
                seen.append(k[1])
        return seen

    def groups(self):
        """(model, backend, batch) combinations with generate records, in order."""
        seen = []
        for k in self.gen:
            g = k[:3]
            if g not in seen:
                seen.append(g)
        return seen


def fmt(x, digits=1):
    return f"{x:.{digits}f}"


def table_generate(d, model, backend, batch):
    rows = ["| config | T | prefill ms | decode ms/step p50 [p10, p90] | tokens/s | KV held MiB | KV peak MiB | "
            "peak RSS MiB | runs |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in d.configs:
        for t, r in d.series(model, backend, batch, c):
            ds = r["decode_step"]
            rows.append(f"| {c} | {t} | {fmt(r['prefill_ms'])} | {fmt(ds['median_ms'], 2)} "
                        f"[{fmt(ds['p10_ms'], 2)}, {fmt(ds['p90_ms'], 2)}] | {fmt(r['decode_tokens_per_s'])} | "
                        f"{num(r['kv_bytes_held'], 3, MIB)} | {num(r['kv_bytes_peak'], 3, MIB)} | "
                        f"{num(r['peak_rss_bytes'], 0, MIB)} | "
                        f"{r['warmup_runs']}+{r['repeats']} |")
    return "\n".join(rows)


def peer_note(d, model, backend, batch):
    """One line naming the peer series of this table, or ''."""
    names = [c for c in d.configs if c in d.peers and d.series(model, backend, batch, c)]
    if not names:
        return ""
    what = "; ".join(f"`{c}` = {d.peers[c]}" for c in names)
    rnd = any(r.get("model", {}).get("random_weights") for c in names for _, r in d.series(model, backend, batch, c))
    what += (" — on random: models a peer runs its own seeded random weights of the same shapes (speed only)"
             if rnd else "")
    return (f"Peers (not kvhost; same prompt formula, lengths, max_new, threads, warm-up and repeats, run beside "
            f"the kvhost configurations at each point): {what}. KV bytes and phases are not measured for peers (-); "
            f"their peak RSS is the peer process's.")


def table_phases(d, model, backend, batch):
    """Per-phase share of the run time at the largest T measured for each config."""
    rows = ["| config | T | " + " | ".join(PHASES) + " | total ms |",
            "|---|---:|" + "---:|" * len(PHASES) + "---:|"]
    for c in d.configs:
        s = d.series(model, backend, batch, c)
        if not s or c in d.peers:
            continue
        t, r = s[-1]
        ph = r["phase_ms"]
        rows.append(f"| {c} | {t} | " + " | ".join(fmt(ph[p]) for p in PHASES) + f" | {fmt(r['total_ms'])} |")
    return "\n".join(rows)


def table_throughput(d, model, backend):
    """Decode throughput (all sequences' tokens per second) against batch size, one row per configuration,
    at the largest T it was measured at under every batch size; '' when only one batch size was run."""
    bs = d.batch_sizes(model, backend)
    if len(bs) < 2:
        return ""
    rows = ["| config | T | " + " | ".join(f"B={b} tokens/s" for b in bs) + f" | B={bs[-1]} / B={bs[0]} |",
            "|---|---:|" + "---:|" * len(bs) + "---:|"]
    for c in d.configs:
        pts = d.throughput_points(model, backend, c)
        if not pts:
            continue
        t, rs = pts
        tps = [rs[b]["decode_tokens_per_s"] for b in bs]
        rows.append(f"| {c} | {t} | " + " | ".join(fmt(x) for x in tps) + f" | {fmt(tps[-1] / tps[0], 2)}x |")
    return "\n".join(rows) if len(rows) > 2 else ""


def table_capacity(d):
    if not d.cap:
        return ""
    rows = ["| model | config | T | KV cap | max batch | probes (batch:fits) |", "|---|---|---:|---|---:|---|"]
    for (m, c, t, lim), r in d.cap.items():
        probes = ", ".join(f"{b}:{'y' if ok else 'n'}" for b, ok in r.get("probes", []))
        rows.append(f"| {m} | {c} | {t} | {lim} | {r['max_batch']} | {probes} |")
    return "\n".join(rows)


def table_eval(d):
    if not d.evals:
        return ""
    rows = ["| model | config | mode | ctx | ppl | full-cache ppl | KL mean | top-1 agreement |",
            "|---|---|---|---:|---:|---:|---:|---:|"]
    for (m, c, mode, ctx), r in d.evals.items():
        def opt(k, digits=3):
            return fmt(r[k], digits) if isinstance(r.get(k), (int, float)) else "-"
        rows.append(f"| {m} | {c} | {mode} | {ctx} | {fmt(r['ppl'], 3)} | {opt('full_ppl')} | {opt('kl_mean', 4)} | "
                    f"{opt('top1_agreement', 3)} |")
    return "\n".join(rows)


def provenance(records):
    commits = sorted({r.get("commit", "?") for _, r in records})
    machines = sorted({f"{get(r, 'machine.host')} ({get(r, 'machine.cpu')}, {get(r, 'machine.cores')} cores)"
                       for _, r in records if has(r, "machine.cpu")})
    threads = sorted({str(r["threads"]) for _, r in records if "threads" in r})
    times = sorted(r["time_utc"] for _, r in records if "time_utc" in r)
    lines = [f"- commit: {', '.join(commits)}", f"- machine: {'; '.join(machines)}",
             f"- threads: {', '.join(threads)}"]
    peers = []
    for _, r in records:
        if r.get("record") == "generate" and is_peer(r):
            p = f"{r['peer']} ({r.get('peer_version') or '?'}; {r.get('peer_impl') or '-'})"
            if p not in peers:
                peers.append(p)
    if peers:
        lines.append(f"- peers: {'; '.join(peers)}")
    if times:
        lines.append(f"- records: {len(records)}, from {times[0]} to {times[-1]}")
    return "\n".join(lines)


# ---- plots ------------------------------------------------------------------------------------------

def make_plots(d, out):
    """Writes the PNGs; returns [(file, one-line description)]."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    made = []

    def log2_axis(ax, ticks):
        """Log2 x axis with a tick at every measured value, labelled with the value (1000, not 2^10)."""
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(t) for t in ticks])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())

    def t_axis(ax, model, backend, batch):
        log2_axis(ax, sorted({k[4] for k in d.gen if k[:3] == (model, backend, batch)}))

    def save(fig, name, what):
        fig.tight_layout()
        fig.savefig(os.path.join(out, name), dpi=110)
        plt.close(fig)
        made.append((name, what))

    markers = "os^vD<>phx*"
    for (m, be, b) in d.groups():
        tag = f"{slug(m)}-{be}-b{b}"
        title = f"{m} ({be}, batch {b})"
        # latency vs T, per-token latency vs T
        for key, fname, ylabel, what in (
                ("total_ms", "latency", "run time, ms (prefill + all decode steps)",
                 "total time of one run (prefill + decode) against prompt length T, per configuration"),
                ("decode", "per-token", "decode ms per step, one token per sequence (median; bars p10-p90)",
                 "median decode step latency (each step generates one token for every sequence of the batch) against T, bars from p10 to p90")):
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for i, c in enumerate(d.configs):
                s = d.series(m, be, b, c)
                if not s:
                    continue
                ts = [t for t, _ in s]
                style = dict(marker=markers[i % len(markers)], label=d.label(c))
                if c in d.peers:  # peers: black dashed, so they stand apart from kvhost's configurations
                    style.update(linestyle="--", color="black")
                if key == "decode":
                    med = [r["decode_step"]["median_ms"] for _, r in s]
                    lo = [r["decode_step"]["median_ms"] - r["decode_step"]["p10_ms"] for _, r in s]
                    hi = [r["decode_step"]["p90_ms"] - r["decode_step"]["median_ms"] for _, r in s]
                    ax.errorbar(ts, med, yerr=[lo, hi], capsize=3, **style)
                else:
                    ax.plot(ts, [r[key] for _, r in s], **style)
            t_axis(ax, m, be, b)
            ax.set_yscale("log")
            ax.set_xlabel("prompt length T (tokens)")
            ax.set_ylabel(ylabel)
            ax.set_title(title)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8, ncol=2)
            save(fig, f"{fname}-vs-T-{tag}.png", what + f" — {title}")
        # memory vs T
        fig, (a0, a1, a2) = plt.subplots(1, 3, figsize=(15, 4.5))
        for i, c in enumerate(d.configs):
            s = d.series(m, be, b, c)
            if not s:
                continue
            ts = [t for t, _ in s]
            if c in d.peers:  # no KV accounting; RSS of the peer's own process
                a2.plot(ts, [r["peak_rss_bytes"] / MIB for _, r in s], marker=markers[i % len(markers)],
                        label=d.label(c), linestyle="--", color="black")
                continue
            mk = markers[i % len(markers)]
            a0.plot(ts, [r["kv_bytes_held"] / MIB for _, r in s], marker=mk, label=c)
            a1.plot(ts, [r["kv_bytes_peak"] / MIB for _, r in s], marker=mk, label=c)
            a2.plot(ts, [r["peak_rss_bytes"] / MIB for _, r in s], marker=mk, label=c)
        for ax, yl in ((a0, "KV bytes held at the end of the run, MiB (exact)"),
                       (a1, "KV bytes held at peak, MiB (exact)"), (a2, "peak RSS of the process, MiB")):
            t_axis(ax, m, be, b)
            ax.set_xlabel("prompt length T (tokens)")
            ax.set_ylabel(yl)
            ax.grid(True, alpha=0.3)
        a0.set_yscale("log")
        a1.set_yscale("log")
        a0.legend(fontsize=8, ncol=2)
        if d.peers:
            a2.legend(fontsize=7, ncol=2)
        fig.suptitle(title)
        save(fig, f"memory-vs-T-{tag}.png",
             f"KV-cache bytes (exact) held after the last decode step and at peak (a policy's peak is the "
             f"prefill, before its first eviction), and process peak RSS, against T — {title}")
        # per-phase stacked bars at each configuration's largest T; the recompute baseline, an order of
        # magnitude above the rest, gets its own panel and scale so the cached configurations stay readable
        bars = [(c, *d.series(m, be, b, c)[-1]) for c in d.configs
                if d.series(m, be, b, c) and c not in d.peers]
        groups = [g for g in ([x for x in bars if x[0] != "no_cache"], [x for x in bars if x[0] == "no_cache"]) if g]
        fig, axes = plt.subplots(1, len(groups), figsize=(10.5, 4.5), squeeze=False,
                                 gridspec_kw={"width_ratios": [max(1, len(g)) for g in groups]})
        for ax, group in zip(axes[0], groups):
            labels = [f"{c}\nT={t}" for c, t, _ in group]
            bottoms = [0.0] * len(group)
            for p in PHASES:
                vals = [r["phase_ms"][p] for _, _, r in group]
                ax.bar(labels, vals, bottom=bottoms, label=p)
                bottoms = [x + y for x, y in zip(bottoms, vals)]
            ax.tick_params(axis="x", rotation=30, labelsize=8)
        axes[0][0].set_ylabel("ms per run (prefill + decode), largest T")
        axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
        fig.suptitle(f"time per phase — {title}")
        save(fig, f"phases-{tag}.png",
             f"time per phase (embed, attention projections, attention core, MLP, LM head, plugin hooks, other) "
             f"of one run (prefill and decode) at each configuration's largest T, the no-cache baseline on its own "
             f"scale — {title}")
        # Pareto: the KV bytes a configuration holds while it decodes against its per-token latency, each at
        # its largest T. The recompute baseline holds no cache and is 10-100x slower, so it is left out;
        # points are told apart by the legend (labels on the points collide where configurations cluster).
        fig, ax = plt.subplots(figsize=(8.5, 4.8))
        for i, c in enumerate(d.configs):
            s = d.series(m, be, b, c)
            if not s or c in d.peers or c == "no_cache":
                continue
            t, r = s[-1]
            label = f"{c} (T={t})"
            # streaming perplexity shows eviction; teacher-forced only where nothing else was evaluated
            ev = sorted(((mode != "stream", e["ppl"], mode, e.get("kl_mean")) for (em, ec, mode, _), e in
                         d.evals.items() if em == m and ec == c), key=lambda x: x[:2])
            if ev:
                _, ppl, mode, kl = ev[0]
                label += f": ppl {ppl:.2f} ({mode})" + (f", KL {kl:.4f}" if isinstance(kl, (int, float)) else "")
            ax.scatter([r["kv_bytes_held"] / MIB], [r["decode_step"]["median_ms"]], marker=markers[i % len(markers)],
                       s=60, label=label)
        ax.set_xscale("log")
        ax.set_xlabel("KV bytes held after decoding, MiB (exact, log)")
        ax.set_ylabel("decode ms per step (median)")
        ax.set_title(f"memory vs latency — {title}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
        save(fig, f"pareto-{tag}.png",
             f"each cached configuration at its largest T: the KV bytes it holds while decoding against its decode "
             f"latency (lower-left is better), with perplexity and KL from the full cache where an eval record "
             f"exists — {title}")
    for m in d.models:
        for be in d.backends(m):
            bs = d.batch_sizes(m, be)
            if len(bs) < 2:
                continue
            fig, ax = plt.subplots(figsize=(7, 4.5))
            drawn = 0
            for i, c in enumerate(d.configs):
                pts = d.throughput_points(m, be, c)
                if not pts:
                    continue
                t, rs = pts
                style = dict(marker=markers[i % len(markers)], label=f"{d.label(c)} (T={t})")
                if c in d.peers:
                    style.update(linestyle="--", color="black")
                ax.plot(bs, [rs[b]["decode_tokens_per_s"] for b in bs], **style)
                drawn += 1
            if not drawn:
                plt.close(fig)
                continue
            log2_axis(ax, bs)
            ax.set_yscale("log")
            ax.set_xlabel("batch size B (sequences decoded together)")
            ax.set_ylabel("decode tokens/s, all sequences together")
            ax.set_title(f"throughput vs batch — {m} ({be})")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7, ncol=2)
            save(fig, f"throughput-vs-batch-{slug(m)}-{be}.png",
                 f"decode throughput (tokens/s summed over the batch) against batch size, each configuration at the "
                 f"largest T it ran at every batch size — {m} ({be})")
    if d.cap:
        # one panel per (model, T, cap): batches under different caps are not comparable
        panels = []
        for (m, c, t, lim), r in d.cap.items():
            if (m, t, lim) not in panels:
                panels.append((m, t, lim))
        fig, axes = plt.subplots(1, len(panels), figsize=(4 + 3.5 * len(panels), 4.5), squeeze=False)
        for ax, (m, t, lim) in zip(axes[0], panels):
            rows = [(c, r["max_batch"]) for (rm, c, rt, rl), r in d.cap.items() if (rm, rt, rl) == (m, t, lim)]
            bars = ax.bar([c for c, _ in rows], [b for _, b in rows], color="tab:green")
            ax.bar_label(bars, fontsize=8)
            ax.set_title(f"{m}\nT={t}, KV cap {lim}", fontsize=9)
            ax.tick_params(axis="x", rotation=40, labelsize=8)
        axes[0][0].set_ylabel("largest batch that fits")
        save(fig, "max-batch.png", "largest batch whose run fits under the --mem-limit KV cap, per configuration, "
                                   "one panel per model, prompt length and cap")
    if d.evals:
        # perplexity barely moves and hides what differs; show its change from the full cache, and KL
        for m in d.models:
            ev = [(c, mode, r) for (em, c, mode, _), r in d.evals.items() if em == m]
            if not ev:
                continue
            full_teacher = [r["ppl"] for c, mode, r in ev if c == "full" and mode == "teacher"]
            fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
            names = [c for c in d.configs if any(c == ec for ec, _, _ in ev)]
            xs = list(range(len(names)))
            for k, mode in enumerate(("teacher", "stream")):
                vals = []
                for c in names:
                    r = next((r for ec, em2, r in ev if ec == c and em2 == mode), None)
                    ref = r.get("full_ppl") if r and mode == "stream" else (full_teacher[0] if full_teacher else None)
                    vals.append(100.0 * (r["ppl"] / ref - 1.0) if r and ref else float("nan"))
                a1.bar([x + (k - 0.5) * 0.4 for x in xs], vals, width=0.4, label=mode)
            a1.axhline(0, color="black", linewidth=0.8)
            a1.set_xticks(xs)
            a1.set_xticklabels(names, rotation=40, fontsize=8)
            a1.set_ylabel("perplexity change vs the full cache, %")
            a1.legend(fontsize=8)
            kl = [next((r.get("kl_mean") for ec, em2, r in ev if ec == c and em2 == "stream"), None) for c in names]
            a2.bar(xs, [k if isinstance(k, (int, float)) else float("nan") for k in kl], color="tab:purple")
            a2.set_xticks(xs)
            a2.set_xticklabels(names, rotation=40, fontsize=8)
            a2.set_ylabel("mean KL(full || config), nats/token (stream)")
            ctxs = sorted({ctx for (em, _, _, ctx) in d.evals if em == m})
            fig.suptitle(f"quality — {m} (eval ctx {', '.join(map(str, ctxs))})")
            save(fig, f"perplexity-{slug(m)}.png",
                 f"perplexity change from the full cache (teacher-forced and streaming) and the streaming mean KL "
                 f"divergence from the full cache, per configuration — {m}")
    return made


def build_report(records, plots=None, command=None, notes=None):
    """The markdown text. plots: [(file, description)] to list, or None."""
    d = Data(records)
    parts = ["# Benchmark results", "",
             "Generated by `bench/report.py` from the JSON Lines records of `bench/kvbench.py`; do not edit by hand.",
             ""]
    if command:
        parts += ["Regenerate:", "", "```sh", command, "```", ""]
    parts += ["## Provenance", "", provenance(records), ""]
    if notes:
        parts += ["## Notes", "", notes, ""]
    for (m, be, b) in d.groups():
        parts += [f"## {m} — {be}, batch {b}", ""]
        rnd = [r for k, r in d.gen.items() if k[0] == m and r.get("model", {}).get("random_weights")]
        if rnd:
            parts += ["Seeded random weights: speed and memory are real, the text and quality are not.", ""]
        parts += [table_generate(d, m, be, b), ""]
        note = peer_note(d, m, be, b)
        if note:
            parts += [note, ""]
        parts += ["Time per phase (ms, one run, largest T):", "",
                  table_phases(d, m, be, b), ""]
    for m in d.models:
        for be in d.backends(m):
            tp = table_throughput(d, m, be)
            if tp:
                parts += [f"## {m} — {be}, throughput against batch size", "",
                          "Decode tokens/s summed over the batch, each configuration at the largest T it was "
                          "run at under every batch size:", "", tp, ""]
    cap = table_capacity(d)
    if cap:
        parts += ["## Max batch under a KV memory cap", "", cap, ""]
    ev = table_eval(d)
    if ev:
        parts += ["## Perplexity", "", ev, ""]
    if plots:
        parts += ["## Plots", ""]
        for name, what in plots:
            parts += [f"- [{name}]({name}): {what}."]
        parts += [""] + [f"![{name}]({name})" for name, _ in plots] + [""]
    return "\n".join(parts)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="report.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("--out", default="docs/results/bench")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--check", action="store_true", help="schema check only")
    ap.add_argument("--notes", help="a file whose text goes into the report under 'Notes'")
    ap.add_argument("--command", help="the command line that regenerates these results (shown in the report)")
    a = ap.parse_args(argv)
    records = read_records(a.inputs)
    problems = check_schema(records)
    if problems:
        for p in problems[:50]:
            print(f"report: {p}", file=sys.stderr)
        return 1
    if a.check:
        print(f"report: {len(records)} records, schema ok")
        return 0
    os.makedirs(a.out, exist_ok=True)
    plots = None
    if not a.no_plots:
        try:
            plots = make_plots(Data(records), a.out)
        except ImportError:
            print("report: matplotlib not installed (apt-get install python3-matplotlib): tables only",
                  file=sys.stderr)
    with open(os.path.join(a.out, "README.md"), "w", encoding="utf-8") as f:
        notes = None
        if a.notes:
            with open(a.notes, encoding="utf-8") as nf:
                notes = nf.read().strip()
        f.write(build_report(records, plots, a.command, notes))
    print(f"report: {len(records)} records -> {a.out}/README.md" + (f" + {len(plots)} plots" if plots else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
