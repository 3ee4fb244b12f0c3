#!/usr/bin/env python3
"""hf_cpu_bench.py — the transformers peer of bench/peer_bench.py: Hugging Face GPT2LMHeadModel on the CPU,
eager attention, fp32, batch 1, greedy, its own KV cache (past_key_values), torch.set_num_threads(T).

  PYTHON bench/peers/hf_cpu_bench.py run --model DIR --test decode|prefill --prompt-tokens N [--gen-tokens M]
                                     --threads T [--warmup W]
  PYTHON bench/peers/hf_cpu_bench.py check

`run` prints one JSON line:
  decode:  prefill the N-token prompt, then M-1 single-token steps (the first of the M tokens comes from the
           prefill, as in `kvhost generate --prompt-tokens N --max-new M`); tokens_per_s = steps / their time.
  prefill: one forward pass over the N-token prompt (logits of the last position, as kvhost);
           tokens_per_s = N / its time.
W untimed runs of the same kind first (default 1). The prompt ids are (i * 7919 + 13) % vocab, the same
synthetic prompt as kvhost's --prompt-tokens. `check` exits 0 and prints the versions when torch and
transformers import. Needs torch + transformers (docs/bench.md, "Peer benchmark").
"""
import argparse
import json
import os
import sys
import time


def versions():
    import torch
    import transformers
    return f"transformers {transformers.__version__}, torch {torch.__version__}"


def load(model_dir, threads):
    import torch
    from transformers import GPT2LMHeadModel
    torch.set_num_threads(threads)
    kw = dict(torch_dtype=torch.float32)
    try:
        m = GPT2LMHeadModel.from_pretrained(model_dir, attn_implementation="eager", **kw)
    except TypeError:  # transformers before attn_implementation
        m = GPT2LMHeadModel.from_pretrained(model_dir, **kw)
    m.eval()
    return m


def one_run(model, ids, test, gen):
    import torch
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(ids, use_cache=(test == "decode"))
        nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)
        prefill_s = time.perf_counter() - t0
        if test == "prefill":
            return prefill_s, []
        past, steps = out.past_key_values, []
        for _ in range(gen - 1):
            t0 = time.perf_counter()
            out = model(nxt, past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1, :].argmax(-1, keepdim=True)
            steps.append(time.perf_counter() - t0)
        return prefill_s, steps


def run(a):
    import torch
    model = load(a.model, a.threads)
    cfg = model.config
    if a.prompt_tokens + (a.gen_tokens if a.test == "decode" else 0) > cfg.n_positions:
        print(f"hf_cpu_bench.py: {a.prompt_tokens} + {a.gen_tokens} tokens exceed n_positions {cfg.n_positions}",
              file=sys.stderr)
        return 1
    ids = torch.tensor([[(i * 7919 + 13) % cfg.vocab_size for i in range(a.prompt_tokens)]])
    for _ in range(a.warmup):
        one_run(model, ids, a.test, a.gen_tokens)
    prefill_s, steps = one_run(model, ids, a.test, a.gen_tokens)
    if a.test == "prefill":
        tps = a.prompt_tokens / prefill_s
    else:
        tps = len(steps) / sum(steps) if steps else 0.0
    s = sorted(steps)
    rec = {"tool": "transformers", "tool_version": versions(),
           "impl": "GPT2LMHeadModel, eager attention, fp32, past_key_values, greedy",
           "test": a.test, "threads": torch.get_num_threads(), "prompt_tokens": a.prompt_tokens,
           "gen_tokens": a.gen_tokens if a.test == "decode" else 0, "warmup": a.warmup,
           "tokens_per_s": tps, "prefill_ms": prefill_s * 1e3, "decode_steps": len(steps),
           "step_median_ms": (s[len(s) // 2] * 1e3) if s else None}
    print(json.dumps(rec), flush=True)
    return 0


def check(_a):
    try:
        v = versions()
    except Exception as e:  # noqa: BLE001 - any import failure means the peer cannot run here
        print(f"hf_cpu_bench.py: {type(e).__name__}: {e} (python {sys.executable})", file=sys.stderr)
        return 1
    print(json.dumps({"tool": "transformers", "tool_version": v, "python": sys.executable}))
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--model", required=True)
    r.add_argument("--test", choices=("decode", "prefill"), required=True)
    r.add_argument("--prompt-tokens", type=int, required=True)
    r.add_argument("--gen-tokens", type=int, default=128)
    r.add_argument("--threads", type=int, default=os.cpu_count())
    r.add_argument("--warmup", type=int, default=1)
    sub.add_parser("check")
    a = ap.parse_args()
    return check(a) if a.cmd == "check" else run(a)


if __name__ == "__main__":
    sys.exit(main())
