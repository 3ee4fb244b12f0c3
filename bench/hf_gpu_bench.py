#!/usr/bin/env python3
"""hf_gpu_bench.py — the Hugging Face transformers peer for kvhost's GPU benchmark (issue #6), and its summary.

  decode --preset gpt2-medium --batch B[,B...] --prompt-tokens N[,N...] --max-new M --warmup W --repeats R [--tag K=V]
      GPT2LMHeadModel with random init at the preset's shapes (GPT2Config), fp16 on the GPU, eager
      attention, use_cache=True, greedy decoding written out step by step (prefill asking for the last
      position's logits only where the version can, then one token per step with past_key_values), and
      prints one JSON line per (batch, prompt) shape, the model built once: prefill ms, decode step latency
      median / p10 / p90, decode tokens/s (B tokens per step), peak device memory.
  peer --model-dir DIR | --preset P [--seed S]  --batch B --prompt-tokens N --max-new M --warmup W --repeats R
      the sweep driver's peer interface (bench/kvbench.py, peer = transformers): the same decode as above
      on a checkpoint directory (from_pretrained) or a preset with random init, printing one `peer_run`
      JSON line with every timed run's prefill and total ms, every decode step's ms, peak device memory.
  check
      exit status 0 and one JSON line with the versions when torch and transformers import and a CUDA
      device is visible; 1 with the reason otherwise.
  membw
      measures device memory bandwidth with a large device-to-device copy (bytes read + written per
      second, the usual convention) and prints one JSON line.
  summarize RUN.jsonl
      reads one bench/gpu_bench.sh run (kvhost generate records tagged stage=..., the lines above,
      kvbench.py capacity records, skipped stages) and prints a Markdown report, a table per stage:
      ms/token and tokens/s beside transformers at the same (model, batch, prompt), achieved roofline
      (fp16 weights + the live K/V bytes the record measured, over the measured bandwidth), policies
      against the full cache at the same context and at the budget's, stores against fp16, max batch.

The synthetic prompt ids are (i * 7919 + 13) % vocab, the same formula as `kvhost generate --prompt-tokens`.
Random weights make the text meaningless; speed and memory are what is measured.
"""
import argparse
import contextlib
import json
import statistics
import sys
import time

PRESETS = {
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12),
    "gpt2-medium": dict(n_layer=24, n_embd=1024, n_head=16),
    "gpt2-large": dict(n_layer=36, n_embd=1280, n_head=20),
    "gpt2-xl": dict(n_layer=48, n_embd=1600, n_head=25),
}
VOCAB, NPOS = 50257, 1024


def pct(xs, q):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def int_list(text):
    """'96,480,992' -> [96, 480, 992] (argparse type: every value a positive integer)."""
    try:
        vals = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated positive integers") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated positive integers")
    return vals


def last_logits_kwargs(model):
    """Ask the forward for the last position's logits only where this transformers version can
    (logits_to_keep in 4.50+, num_logits_to_keep in 4.45-4.49), as its own generate() does: a [B, T, 50257]
    logits tensor at prefill is work kvhost does not do either."""
    import inspect
    params = inspect.signature(model.forward).parameters
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            return {name: 1}
    return {}


def preset_model(torch, preset, device):
    """GPT2LMHeadModel with random init (the caller seeds torch) at a preset's shapes, eager attention, on
    `device`: fp16 on a GPU, fp32 on a CPU (fp16 matmuls on a CPU are not a peer anyone runs)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    p = PRESETS[preset]
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=NPOS, n_embd=p["n_embd"], n_layer=p["n_layer"],
                     n_head=p["n_head"], activation_function="gelu_new", attn_implementation="eager")
    cfg._attn_implementation = "eager"
    # built on the device where torch can (2.0+: a device is a context manager), else built, then moved
    where = torch.device(device) if hasattr(torch.device, "__enter__") else contextlib.nullcontext()
    with where:
        model = GPT2LMHeadModel(cfg)
    model = model.to(device)
    return (model.half() if device == "cuda" else model).eval()


def timed_generate(torch, dev, model, ids, M, prefill_kwargs):
    """One greedy generation of M tokens from the prompt ids [B, N]: the prefill, then M - 1 decode steps
    with past_key_values, each timed up to a device synchronization. Returns (prefill ms, [step ms], total
    ms, the first sequence's tokens)."""
    steps, toks = [], []
    with torch.inference_mode():
        dev.sync()
        t_start = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, **prefill_kwargs)
        past = out.past_key_values
        nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)
        toks.append(int(nxt[0, 0]))
        dev.sync()
        prefill = (time.perf_counter() - t_start) * 1e3
        for _ in range(M - 1):
            t = time.perf_counter()
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)
            dev.sync()
            steps.append((time.perf_counter() - t) * 1e3)
            toks.append(int(nxt[0, 0]))
        total = (time.perf_counter() - t_start) * 1e3
    return prefill, steps, total, toks


def decode(args):
    import torch

    if args.max_new < 2:
        print(f"hf_gpu_bench.py: --max-new {args.max_new}: decode times the steps after the first token, so it "
              "needs 2 or more", file=sys.stderr)
        return 2
    torch.manual_seed(1234)
    dev = Device(torch, args.device)
    model = preset_model(torch, args.preset, args.device)
    last_only = last_logits_kwargs(model)
    tags = dict(t.split("=", 1) for t in args.tag or [])
    for B in args.batch:
        for N in args.prompt_tokens:
            M = args.max_new
            if N + M > NPOS:
                print(f"hf_gpu_bench.py: --prompt-tokens {N} + --max-new {M} exceeds n_positions {NPOS}",
                      file=sys.stderr)
                return 1
            decode_one(torch, dev, model, last_only, args, B, N, M, tags)
    return 0


class Device:
    """The GPU the benchmark runs on, or the CPU (--device cpu: a smoke test of this script where no GPU
    is, in fp32): synchronization, peak memory and the name the records give."""

    def __init__(self, torch, name):
        self.torch, self.cuda = torch, name == "cuda"

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset_peak(self):
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()

    def peak_bytes(self):
        return self.torch.cuda.max_memory_allocated() if self.cuda else None

    def name(self):
        return self.torch.cuda.get_device_name(0) if self.cuda else "cpu"


def decode_one(torch, dev, model, last_only, args, B, N, M, tags):
    """One (batch, prompt) shape: warmup runs, then timed runs; prints one hf_generate record."""
    ids = torch.tensor([[(i * 7919 + 13) % VOCAB for i in range(N)]] * B, device=args.device)
    for _ in range(args.warmup):
        timed_generate(torch, dev, model, ids, M, last_only)
    dev.reset_peak()
    prefills, all_steps, tps = [], [], []
    for _ in range(args.repeats):
        pf, st, _, _ = timed_generate(torch, dev, model, ids, M, last_only)
        prefills.append(pf)
        all_steps += st
        tps.append(B * len(st) / (sum(st) / 1e3))
    rec = {
        "record": "hf_generate", "impl": "transformers %s eager %s" % (
            __import__("transformers").__version__, "fp16" if dev.cuda else "fp32"),
        "torch": torch.__version__, "device": dev.name(), "model": "random:" + args.preset,
        "batch": B, "prompt_tokens": N, "max_new": M, "warmup_runs": args.warmup, "repeats": args.repeats,
        "prefill_ms": statistics.median(prefills), "prefill_last_logits_only": bool(last_only),
        "decode_step": {"n": len(all_steps), "median_ms": statistics.median(all_steps),
                        "p10_ms": pct(all_steps, 0.1), "p90_ms": pct(all_steps, 0.9)},
        "decode_tokens_per_s": statistics.median(tps), "repeat_tokens_per_s": tps,
        "peak_device_bytes": dev.peak_bytes(), "tags": tags,
    }
    print(json.dumps(rec), flush=True)


def n_params(c):
    """Parameters of a GPT-2 with tied head (what kvhost reports): wte + wpe + L blocks + ln_f."""
    V, P, C, L = c.vocab_size, c.n_positions, c.n_embd, c.n_layer
    F = c.n_inner or 4 * C
    return V * C + P * C + L * (4 * C * C + 2 * C * F + 9 * C + F) + 2 * C


def peer(args):
    import resource
    import torch
    import transformers
    from transformers import GPT2LMHeadModel

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.model_dir:
        model = GPT2LMHeadModel.from_pretrained(args.model_dir, torch_dtype=torch.float16, attn_implementation="eager")
        model = model.to("cuda").eval()
    else:
        model = preset_model(torch, args.preset, "cuda")
    dev = Device(torch, "cuda")
    c = model.config
    B, N, M = args.batch, args.prompt_tokens, args.max_new
    if N + M > c.n_positions:
        print(f"hf_gpu_bench.py: --prompt-tokens {N} + --max-new {M} exceeds n_positions {c.n_positions}",
              file=sys.stderr)
        return 1
    ids = torch.tensor([[(i * 7919 + 13) % c.vocab_size for i in range(N)]] * B, device="cuda")  # [B, N]
    # the sweep peer's prefill computes every position's logits, as its records so far were measured
    for _ in range(args.warmup):
        timed_generate(torch, dev, model, ids, M, {})
    dev.reset_peak()
    prefills, totals, all_steps, tps, toks = [], [], [], [], []
    for _ in range(args.repeats):
        pf, st, tot, toks = timed_generate(torch, dev, model, ids, M, {})
        prefills.append(pf)
        totals.append(tot)
        all_steps += st
        tps.append(B * len(st) / (sum(st) / 1e3) if st else 0.0)
    rec = {
        "record": "peer_run", "peer": "transformers", "peer_version": "transformers " + transformers.__version__,
        "peer_impl": f"GPT2LMHeadModel eager attention fp16, past_key_values, greedy (torch {torch.__version__})",
        "device": dev.name(), "threads": torch.get_num_threads(), "batch": B,
        "prompt_tokens": N, "max_new": M, "warmup_runs": args.warmup, "repeats": args.repeats,
        "prefill_ms": prefills, "total_ms": totals, "step_ms": all_steps, "repeat_tokens_per_s": tps,
        "generated_tokens": [M] * B, "first_tokens": toks[:16],
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_device_bytes": dev.peak_bytes(),
        "model": {"n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd, "n_params": n_params(c)},
    }
    print(json.dumps(rec), flush=True)
    return 0


def check(args):
    try:
        import torch
        import transformers
    except ImportError as e:
        print(f"hf_gpu_bench.py: {e} (python {sys.executable})", file=sys.stderr)
        return 1
    if not torch.cuda.is_available():
        print(f"hf_gpu_bench.py: no CUDA device visible to torch {torch.__version__}", file=sys.stderr)
        return 1
    print(json.dumps({"peer": "transformers", "peer_version": "transformers " + transformers.__version__,
                      "device": torch.cuda.get_device_name(0), "python": sys.executable}))
    return 0


def membw(args):
    import torch
    n = args.bytes // 2
    x = torch.empty(n, dtype=torch.float16, device="cuda")
    y = torch.empty_like(x)
    x.fill_(1.0)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    times = []
    for _ in range(args.iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        y.copy_(x)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    t = statistics.median(times)
    print(json.dumps({"record": "membw", "device": torch.cuda.get_device_name(0), "bytes_copied": 2 * n,
                      "read_write_GBps": 2 * (2 * n) / t / 1e9, "method": "torch device-to-device copy, "
                      "bytes read + written, median of %d" % args.iters}), flush=True)


def step_bytes(r):
    """Bytes one decode step must read at least: the fp16 weights once (the record counts fp32 bytes) plus
    the live K/V of every sequence at the decode phase's mean context. kv_live_bytes is measured at the end
    (the backend's own slot size: fp16, int8, int4); without a budget the mean context is scaled from the
    final one, with a budget the cache holds about the budget throughout."""
    w = r["weight_bytes_per_token"] / 2
    P, N = r["prompt_tokens"][0], r["generated_tokens"][0]
    kvb = r.get("kv_live_bytes") or 0
    if not r.get("cache_budget"):
        kvb *= (P + N / 2) / (P + N)
    return w + kvb


def device_mb(r):
    """The K/V slots' device memory (the backend's pool regions: class rounding and free blocks included)."""
    b = r.get("kv_device_reserved_bytes")
    return "%.1f MB" % (b / 1e6) if b is not None else "-"


def tags_of(r):
    return r.get("tags") or {}


def summarize(args):
    recs = [json.loads(l) for l in open(args.run) if l.strip().startswith("{")]
    bw = next((r for r in recs if r.get("record") == "membw"), None)
    bw_Bps = bw["read_write_GBps"] * 1e9 if bw else None
    kv = [r for r in recs if r.get("record") == "generate"]
    hf = {(r["model"], r["batch"], r["prompt_tokens"]): r for r in recs if r.get("record") == "hf_generate"}
    out = []

    def roof(r):
        return "%.0f%%" % (100 * step_bytes(r) / (r["decode_step"]["median_ms"] / 1e3) / bw_Bps) if bw_Bps else "-"

    def ms(r):
        return r["decode_step"]["median_ms"]

    def peer_of(r):
        return hf.get((r["model"]["name"], r["batch"], r["prompt_tokens"][0]))

    def stage(name):
        return [r for r in kv if tags_of(r).get("stage") == name]

    out.append("device: %s" % (kv[0]["device"] if kv else "?"))
    if bw:
        out.append("measured bandwidth: %.0f GB/s (%s)" % (bw["read_write_GBps"], bw["method"]))
    rows = stage("decode")
    if rows:
        out += ["", "### Batch-1 decode (prompt T - %d, %d new tokens)" % (rows[0]["generated_tokens"][0],
                                                                           rows[0]["generated_tokens"][0]), "",
                "| model | T | kvhost ms/token (p10-p90) | transformers ms/token | speed-up | kvhost prefill ms | "
                "transformers prefill ms | bytes/step | roofline |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            h = peer_of(r)
            out.append("| %s | %s | %.3f (%.3f-%.3f) | %s | %s | %.1f | %s | %.0f MB | %s |" % (
                r["model"]["name"], tags_of(r).get("ctx", "?"), ms(r), r["decode_step"]["p10_ms"],
                r["decode_step"]["p90_ms"], "%.3f" % h["decode_step"]["median_ms"] if h else "-",
                "%.1fx" % (h["decode_step"]["median_ms"] / ms(r)) if h else "-", r["prefill_ms"],
                "%.1f" % h["prefill_ms"] if h else "-", step_bytes(r) / 1e6, roof(r)))
    rows = stage("policies")
    if rows:
        by = {tags_of(r).get("config"): r for r in rows}
        full, eq = by.get("full"), by.get("full-at-budget")
        r0 = rows[0]
        out += ["", "### Policies and stores (%s, batch 1, prompt %d + %d new; budget %s)" % (
            r0["model"]["name"], (full or r0)["prompt_tokens"][0], r0["generated_tokens"][0],
            next((r["cache_budget"] for r in rows if r.get("cache_budget")), "-")), "",
            "| config | ms/token | vs full cache | vs full cache at the budget's context | KV held | KV device "
            "memory | roofline |", "|---|---|---|---|---|---|---|"]
        for r in rows:
            out.append("| %s | %.3f | %s | %s | %.1f MB | %s | %s |" % (
                tags_of(r).get("config", "-"), ms(r), "%.2fx" % (ms(r) / ms(full)) if full else "-",
                "%.2fx" % (ms(r) / ms(eq)) if eq else "-", r["kv_bytes_held"] / 1e6, device_mb(r), roof(r)))
    rows = stage("batch")
    if rows:
        out += ["", "### Batched decode", "",
                "| model | batch | T | kvhost tok/s | ms/step | transformers tok/s | speed-up | roofline |",
                "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            h = peer_of(r)
            out.append("| %s | %d | %s | %.0f | %.3f | %s | %s | %s |" % (
                r["model"]["name"], r["batch"], tags_of(r).get("ctx", "?"), r["decode_tokens_per_s"], ms(r),
                "%.0f" % h["decode_tokens_per_s"] if h else "-",
                "%.1fx" % (r["decode_tokens_per_s"] / h["decode_tokens_per_s"]) if h else "-", roof(r)))
    rows = stage("stores")
    if rows:
        fp16 = next((r for r in rows if tags_of(r).get("store") == "fp16"), None)
        out += ["", "### KV stores (%s, batch %d, %d + %d tokens)" % (
            rows[0]["model"]["name"], rows[0]["batch"], rows[0]["prompt_tokens"][0], rows[0]["generated_tokens"][0]),
            "", "| store | tok/s | ms/step | vs fp16 | KV held | KV device memory | roofline |",
            "|---|---|---|---|---|---|---|"]
        for r in rows:
            out.append("| %s | %.0f | %.3f | %s | %.1f MB | %s | %s |" % (
                tags_of(r).get("store"), r["decode_tokens_per_s"], ms(r),
                "%.2fx" % (ms(r) / ms(fp16)) if fp16 else "-", r["kv_bytes_held"] / 1e6, device_mb(r), roof(r)))
    rows = stage("overhead")
    if rows:
        out += ["", "### Overheads (%s)" % rows[0]["model"]["name"], "",
                "| config | batch | prompt + new | ms/step | vs no plugin, same shape |", "|---|---|---|---|---|"]
        for r in rows:
            base = next((b for b in rows if tags_of(b).get("config") == "none" and b["batch"] == r["batch"]
                         and b["prompt_tokens"] == r["prompt_tokens"] and b["model"]["name"] == r["model"]["name"]),
                        None)
            out.append("| %s | %d | %d + %d | %.3f | %s |" % (
                tags_of(r).get("config"), r["batch"], r["prompt_tokens"][0], r["generated_tokens"][0], ms(r),
                "%.3fx" % (ms(r) / ms(base)) if base else "-"))
    other = [r for r in kv if tags_of(r).get("stage") is None]
    if other:
        out += ["", "### Other kvhost runs", "", "| model | batch | tags | ms/step | tok/s | roofline |",
                "|---|---|---|---|---|---|"]
        for r in other:
            out.append("| %s | %d | %s | %.3f | %.0f | %s |" % (
                r["model"]["name"], r["batch"], ",".join("%s=%s" % t for t in sorted(tags_of(r).items())) or "-",
                ms(r), r["decode_tokens_per_s"], roof(r)))
    cap = [r for r in recs if r.get("record") == "capacity"]
    if cap:
        out += ["", "### Max batch", "", "| model | config | KV cap | context (prompt + new) | max batch | probes |",
                "|---|---|---|---|---|---|"]
        for r in cap:
            probes = ", ".join("%d:%s" % (b, "ok" if ok else "no") for b, ok in r.get("probes", []))
            out.append("| %s | %s | %s | %d + %d | %d | %s |" % (
                (r.get("model") or {}).get("name", "?"), r.get("tags", {}).get("config", "-"), r["mem_limit"],
                r["prompt_tokens"], r["max_new"], r["max_batch"], probes))
    skipped = [r for r in recs if r.get("record") == "skipped"]
    if skipped:
        out += ["", "Skipped: " + "; ".join("%s (%s)" % (r["stage"], r["reason"]) for r in skipped)]
    print("\n".join(out))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("decode")
    d.add_argument("--preset", default="gpt2-medium", choices=sorted(PRESETS))
    d.add_argument("--batch", type=int_list, default=[1], help="one or more batch sizes: 1,8,32")
    d.add_argument("--prompt-tokens", type=int_list, default=[512], help="one or more prompt lengths: 96,480,992")
    d.add_argument("--max-new", type=int, default=512)
    d.add_argument("--warmup", type=int, default=1)
    d.add_argument("--repeats", type=int, default=3)
    d.add_argument("--tag", action="append", help="KEY=VALUE added to every record's tags (repeatable)")
    d.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: a smoke test of the script on a machine without a GPU (fp32)")
    p = sub.add_parser("peer")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--model-dir")
    g.add_argument("--preset", choices=sorted(PRESETS))
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-new", type=int, default=16)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    sub.add_parser("check")
    b = sub.add_parser("membw")
    b.add_argument("--bytes", type=int, default=2 << 30)
    b.add_argument("--iters", type=int, default=20)
    s = sub.add_parser("summarize")
    s.add_argument("run")
    a = ap.parse_args()
    return {"decode": decode, "membw": membw, "summarize": summarize, "peer": peer, "check": check}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
