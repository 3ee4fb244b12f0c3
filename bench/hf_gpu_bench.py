#!/usr/bin/env python3
"""hf_gpu_bench.py — the Hugging Face transformers peer for kvhost's GPU benchmark (issue #6), and its summary.

  decode --preset gpt2-medium --batch B --prompt-tokens N --max-new M --warmup W --repeats R
      GPT2LMHeadModel with random init at the preset's shapes (GPT2Config), fp16 on the GPU, eager
      attention, use_cache=True, greedy decoding written out step by step (prefill, then one token per
      step with past_key_values), and prints one JSON line: prefill ms, decode step latency median /
      p10 / p90, decode tokens/s (B tokens per step), peak device memory.
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
      reads kvhost generate records and the lines above from one script run and prints a Markdown
      report: tokens/s per (model, batch), speed-up over transformers, achieved roofline (KV bytes from the
      record's live bytes for quantized stores), and the max-batch table of `kvbench.py capacity` records.

The synthetic prompt ids are (i * 7919 + 13) % vocab, the same formula as `kvhost generate --prompt-tokens`.
Random weights make the text meaningless; speed and memory are what is measured.
"""
import argparse
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


def decode(args):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    p = PRESETS[args.preset]
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=NPOS, n_embd=p["n_embd"], n_layer=p["n_layer"],
                     n_head=p["n_head"], activation_function="gelu_new", attn_implementation="eager")
    cfg._attn_implementation = "eager"
    torch.manual_seed(1234)
    with torch.device("cuda"):
        model = GPT2LMHeadModel(cfg)
    model = model.half().eval()
    B, N, M = args.batch, args.prompt_tokens, args.max_new
    ids = torch.tensor([[(i * 7919 + 13) % VOCAB for i in range(N)]] * B, device="cuda")

    def one_run():
        steps = []
        with torch.inference_mode():
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model(input_ids=ids, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)
            torch.cuda.synchronize()
            prefill = (time.perf_counter() - t0) * 1e3
            for _ in range(M - 1):
                t = time.perf_counter()
                out = model(input_ids=nxt, past_key_values=past, use_cache=True)
                past = out.past_key_values
                nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)
                torch.cuda.synchronize()
                steps.append((time.perf_counter() - t) * 1e3)
        return prefill, steps

    for _ in range(args.warmup):
        one_run()
    torch.cuda.reset_peak_memory_stats()
    prefills, all_steps, tps = [], [], []
    for _ in range(args.repeats):
        pf, st = one_run()
        prefills.append(pf)
        all_steps += st
        tps.append(B * len(st) / (sum(st) / 1e3))
    rec = {
        "record": "hf_generate", "impl": "transformers " + __import__("transformers").__version__ + " eager fp16",
        "torch": torch.__version__, "device": torch.cuda.get_device_name(0), "model": "random:" + args.preset,
        "batch": B, "prompt_tokens": N, "max_new": M, "warmup_runs": args.warmup, "repeats": args.repeats,
        "prefill_ms": statistics.median(prefills),
        "decode_step": {"n": len(all_steps), "median_ms": statistics.median(all_steps),
                        "p10_ms": pct(all_steps, 0.1), "p90_ms": pct(all_steps, 0.9)},
        "decode_tokens_per_s": statistics.median(tps), "repeat_tokens_per_s": tps,
        "peak_device_bytes": torch.cuda.max_memory_allocated(),
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
    from transformers import GPT2Config, GPT2LMHeadModel

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.model_dir:
        model = GPT2LMHeadModel.from_pretrained(args.model_dir, torch_dtype=torch.float16, attn_implementation="eager")
        model = model.to("cuda")
    else:
        p = PRESETS[args.preset]
        cfg = GPT2Config(vocab_size=VOCAB, n_positions=NPOS, n_embd=p["n_embd"], n_layer=p["n_layer"],
                         n_head=p["n_head"], activation_function="gelu_new", attn_implementation="eager")
        cfg._attn_implementation = "eager"
        with torch.device("cuda"):
            model = GPT2LMHeadModel(cfg)
        model = model.half()
    model = model.eval()
    c = model.config
    B, N, M = args.batch, args.prompt_tokens, args.max_new
    if N + M > c.n_positions:
        print(f"hf_gpu_bench.py: --prompt-tokens {N} + --max-new {M} exceeds n_positions {c.n_positions}",
              file=sys.stderr)
        return 1
    ids = torch.tensor([[(i * 7919 + 13) % c.vocab_size for i in range(N)]] * B, device="cuda")  # [B, N]

    def one_run():
        steps, toks = [], []
        with torch.inference_mode():
            torch.cuda.synchronize()
            t_start = time.perf_counter()
            out = model(input_ids=ids, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)
            toks.append(int(nxt[0, 0]))
            torch.cuda.synchronize()
            prefill = (time.perf_counter() - t_start) * 1e3
            for _ in range(M - 1):
                t = time.perf_counter()
                out = model(input_ids=nxt, past_key_values=past, use_cache=True)
                past = out.past_key_values
                nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)
                torch.cuda.synchronize()
                steps.append((time.perf_counter() - t) * 1e3)
                toks.append(int(nxt[0, 0]))
            total = (time.perf_counter() - t_start) * 1e3
        return prefill, steps, total, toks

    for _ in range(args.warmup):
        one_run()
    torch.cuda.reset_peak_memory_stats()
    prefills, totals, all_steps, tps, toks = [], [], [], [], []
    for _ in range(args.repeats):
        pf, st, tot, toks = one_run()
        prefills.append(pf)
        totals.append(tot)
        all_steps += st
        tps.append(B * len(st) / (sum(st) / 1e3) if st else 0.0)
    rec = {
        "record": "peer_run", "peer": "transformers", "peer_version": "transformers " + transformers.__version__,
        "peer_impl": f"GPT2LMHeadModel eager attention fp16, past_key_values, greedy (torch {torch.__version__})",
        "device": torch.cuda.get_device_name(0), "threads": torch.get_num_threads(), "batch": B,
        "prompt_tokens": N, "max_new": M, "warmup_runs": args.warmup, "repeats": args.repeats,
        "prefill_ms": prefills, "total_ms": totals, "step_ms": all_steps, "repeat_tokens_per_s": tps,
        "generated_tokens": [M] * B, "first_tokens": toks[:16],
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_device_bytes": torch.cuda.max_memory_allocated(),
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


def summarize(args):
    recs = [json.loads(l) for l in open(args.run) if l.strip().startswith("{")]
    bw = next((r for r in recs if r.get("record") == "membw"), None)
    bw_Bps = bw["read_write_GBps"] * 1e9 if bw else None
    kv = [r for r in recs if r.get("record") == "generate"]
    hf = {(r["model"], r["batch"]): r for r in recs if r.get("record") == "hf_generate"}
    out = ["| model | batch | config | kvhost tok/s | step ms (median, p10-p90) | transformers tok/s | speed-up | "
           "bytes/step (W + KV) | roofline |", "|---|---|---|---|---|---|---|---|---|"]
    for r in kv:
        m, B = r["model"]["name"], r["batch"]
        tag = ",".join("%s=%s" % kv_ for kv_ in sorted(r.get("tags", {}).items())) or "-"
        st = r["decode_step"]
        h = hf.get((m, B))
        # bytes one decode step reads: fp16 weights once (fp32 count / 2), plus every sequence's live K/V
        # at the mean context of the decode phase (prompt + half the new tokens), fp16.
        L, C = r["model"]["n_layer"], r["model"]["n_embd"]
        ctx = r["prompt_tokens"][0] + r["generated_tokens"][0] / 2
        w = r["weight_bytes_per_token"] / 2
        kvb = B * L * 2 * C * 2 * ctx
        NH = r["model"].get("n_head")
        if r.get("tags", {}).get("store") not in (None, "fp16") and NH and r.get("kv_live_tokens"):
            # packed store: the bytes the cache really holds per token (all layers and heads, K + V)
            kvb = B * r["kv_live_bytes"] / r["kv_live_tokens"] * L * NH * ctx
        roof = ""
        if bw_Bps:
            roof = "%.0f%%" % (100 * (w + kvb) / (st["median_ms"] / 1e3) / bw_Bps)
        out.append("| %s | %d | %s | %.1f | %.3f (%.3f-%.3f) | %s | %s | %.0f MB | %s |" % (
            m, B, tag, r["decode_tokens_per_s"], st["median_ms"], st["p10_ms"], st["p90_ms"],
            "%.1f" % h["decode_tokens_per_s"] if h else "-",
            "%.1fx" % (r["decode_tokens_per_s"] / h["decode_tokens_per_s"]) if h and tag == "-" else "-",
            (w + kvb) / 1e6, roof))
    print("device: %s" % (kv[0]["device"] if kv else "?"))
    if bw:
        print("measured bandwidth: %.0f GB/s (%s)" % (bw["read_write_GBps"], bw["method"]))
    print()
    print("\n".join(out))
    cap = [r for r in recs if r.get("record") == "capacity"]
    if cap:
        print()
        print("| model | config | KV cap | context (prompt + new) | max batch | probes |")
        print("|---|---|---|---|---|---|")
        for r in cap:
            probes = ", ".join("%d:%s" % (b, "ok" if ok else "no") for b, ok in r.get("probes", []))
            print("| %s | %s | %s | %d + %d | %d | %s |" % (
                (r.get("model") or {}).get("name", "?"), r.get("tags", {}).get("config", "-"), r["mem_limit"],
                r["prompt_tokens"], r["max_new"], r["max_batch"], probes))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("decode")
    d.add_argument("--preset", default="gpt2-medium", choices=sorted(PRESETS))
    d.add_argument("--batch", type=int, default=1)
    d.add_argument("--prompt-tokens", type=int, default=512)
    d.add_argument("--max-new", type=int, default=512)
    d.add_argument("--warmup", type=int, default=1)
    d.add_argument("--repeats", type=int, default=3)
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
