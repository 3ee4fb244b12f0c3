#!/usr/bin/env python3
"""torch_gpt2.py — the PyTorch peer for kvhost's CPU benchmarks: GPT-2 in eager PyTorch with a KV cache.

Jobs:
  make-checkpoint DIR --preset gpt2-medium --seed S
      writes a Hugging Face-format GPT-2 directory (config.json + model.safetensors, F32, Conv1D layout,
      tied head) with seeded random weights, so kvhost and PyTorch run the very same weights.
  decode DIR --prompt-tokens N --max-new M --threads T --repeats R
      loads DIR, prefills a synthetic prompt of N ids, decodes M tokens greedily with a KV cache, and
      prints one JSON line: tokens/s, per-step latency median/p10/p90 (bench/cpu_decode.sh).
  peer --model-dir DIR --batch B --prompt-tokens N --max-new M --warmup W --repeats R [--threads T]
      the sweep driver's peer interface (bench/kvbench.py, peer = torch-eager): the same greedy decode at
      batch B (B copies of the prompt, like kvhost generate --batch), printing one `peer_run` JSON line with
      every timed run's prefill and total ms, every decode step's ms, tokens/s per run, peak RSS.
  check
      exit status 0 and one JSON line with the peer's version when torch and numpy import; 1 otherwise.

The synthetic prompt ids are (i * 7919 + 13) % vocab, the same formula as `kvhost generate --prompt-tokens`.
Written independently of kvhost (only torch + numpy), so it is also a reference for its numerics.
"""
import argparse
import json
import math
import os
import resource
import struct
import sys
import time

try:
    import numpy as np
    import torch
    IMPORT_ERROR = None
except ImportError as e:  # reported by `check` and by every job that needs them
    np = torch = None
    IMPORT_ERROR = e

PRESETS = {
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12),
    "gpt2-medium": dict(n_layer=24, n_embd=1024, n_head=16),
    "gpt2-large": dict(n_layer=36, n_embd=1280, n_head=20),
    "gpt2-xl": dict(n_layer=48, n_embd=1600, n_head=25),
}


def synthetic_prompt(n, vocab):
    return [(i * 7919 + 13) % vocab for i in range(n)]


def write_safetensors(path, tensors):
    """Writes the safetensors container by hand: 8-byte header length, JSON header, raw data."""
    header, offset, blobs = {}, 0, []
    for name, arr in tensors:
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        nbytes = arr.nbytes
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        blobs.append(arr)
    header["__metadata__"] = {"format": "pt"}
    hjson = json.dumps(header, separators=(",", ":")).encode()
    hjson += b" " * ((8 - len(hjson) % 8) % 8)
    with open(path + ".tmp", "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        for a in blobs:
            a.tofile(f)
    os.replace(path + ".tmp", path)


def make_checkpoint(args):
    p = PRESETS[args.preset]
    L, C = p["n_layer"], p["n_embd"]
    V, P, F = 50257, 1024, 4 * p["n_embd"]
    rng = np.random.default_rng(args.seed)

    def normal(*shape, std=0.02):
        return (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float32)

    t = [("wte.weight", normal(V, C)), ("wpe.weight", normal(P, C, std=0.01))]
    proj_std = 0.02 / math.sqrt(2 * L)
    for i in range(L):
        h = f"h.{i}."
        t += [
            (h + "ln_1.weight", np.ones(C, np.float32)), (h + "ln_1.bias", np.zeros(C, np.float32)),
            (h + "attn.c_attn.weight", normal(C, 3 * C)), (h + "attn.c_attn.bias", np.zeros(3 * C, np.float32)),
            (h + "attn.c_proj.weight", normal(C, C, std=proj_std)), (h + "attn.c_proj.bias", np.zeros(C, np.float32)),
            (h + "ln_2.weight", np.ones(C, np.float32)), (h + "ln_2.bias", np.zeros(C, np.float32)),
            (h + "mlp.c_fc.weight", normal(C, F)), (h + "mlp.c_fc.bias", np.zeros(F, np.float32)),
            (h + "mlp.c_proj.weight", normal(F, C, std=proj_std)), (h + "mlp.c_proj.bias", np.zeros(C, np.float32)),
        ]
    t += [("ln_f.weight", np.ones(C, np.float32)), ("ln_f.bias", np.zeros(C, np.float32))]
    os.makedirs(args.dir, exist_ok=True)
    write_safetensors(os.path.join(args.dir, "model.safetensors"), t)
    cfg = dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=V, n_positions=P, n_ctx=P,
               n_embd=C, n_layer=L, n_head=p["n_head"], n_inner=None, activation_function="gelu_new",
               layer_norm_epsilon=1e-5, bos_token_id=50256, eos_token_id=50256, tie_word_embeddings=True)
    with open(os.path.join(args.dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    print(f"wrote {args.dir} ({args.preset}, seed {args.seed})", file=sys.stderr)


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        assert meta["dtype"] == "F32", name
        b, e = meta["data_offsets"]
        out[name] = torch.from_numpy(np.frombuffer(data[b:e], dtype=np.float32).reshape(meta["shape"]).copy())
    return out


class GPT2:
    """GPT-2 decoder with a per-layer KV cache (list of [B, NH, T, HS] tensors), eager PyTorch."""

    def __init__(self, d, cfg):
        self.w = {k[len("transformer."):] if k.startswith("transformer.") else k: v for k, v in d.items()}
        self.L, self.C, self.NH = cfg["n_layer"], cfg["n_embd"], cfg["n_head"]
        self.eps = cfg.get("layer_norm_epsilon", 1e-5)

    def ln(self, x, name):
        return torch.nn.functional.layer_norm(x, (self.C,), self.w[name + ".weight"], self.w[name + ".bias"], self.eps)

    def forward(self, ids, past):
        with torch.no_grad():
            return self._forward(ids, past)

    def _forward(self, ids, past):
        w, C, NH = self.w, self.C, self.NH
        HS = C // NH
        B, T = ids.shape
        start = 0 if past[0] is None else past[0][0].shape[2]
        pos = torch.arange(start, start + T)
        x = w["wte.weight"][ids] + w["wpe.weight"][pos]
        new_past = []
        for i in range(self.L):
            h = f"h.{i}."
            a = self.ln(x, h + "ln_1")
            qkv = torch.addmm(w[h + "attn.c_attn.bias"], a.view(-1, C), w[h + "attn.c_attn.weight"]).view(B, T, 3 * C)
            q, k, v = qkv.split(C, dim=2)
            q = q.view(B, T, NH, HS).transpose(1, 2)
            k = k.view(B, T, NH, HS).transpose(1, 2)
            v = v.view(B, T, NH, HS).transpose(1, 2)
            if past[i] is not None:
                k = torch.cat([past[i][0], k], dim=2)
                v = torch.cat([past[i][1], v], dim=2)
            new_past.append((k, v))
            att = (q @ k.transpose(-1, -2)) / math.sqrt(HS)
            if T > 1:
                S = k.shape[2]
                mask = torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T)
                att = att.masked_fill(~mask, float("-inf"))
            att = torch.softmax(att, dim=-1)
            y = (att @ v).transpose(1, 2).reshape(B, T, C)
            x = x + torch.addmm(w[h + "attn.c_proj.bias"], y.view(-1, C), w[h + "attn.c_proj.weight"]).view(B, T, C)
            m = self.ln(x, h + "ln_2")
            m = torch.addmm(w[h + "mlp.c_fc.bias"], m.view(-1, C), w[h + "mlp.c_fc.weight"])
            m = torch.nn.functional.gelu(m, approximate="tanh")
            x = x + torch.addmm(w[h + "mlp.c_proj.bias"], m, w[h + "mlp.c_proj.weight"]).view(B, T, C)
        x = self.ln(x[:, -1, :], "ln_f")
        return x @ w["wte.weight"].t(), new_past


def decode(args):
    with open(os.path.join(args.dir, "config.json")) as f:
        cfg = json.load(f)
    torch.set_num_threads(args.threads)
    model = GPT2(read_safetensors(os.path.join(args.dir, "model.safetensors")), cfg)
    ids = torch.tensor([synthetic_prompt(args.prompt_tokens, cfg["vocab_size"])])
    results = []
    for rep in range(args.warmup + args.repeats):
        past = [None] * model.L
        t0 = time.perf_counter()
        logits, past = model.forward(ids, past)
        prefill_ms = (time.perf_counter() - t0) * 1e3
        steps = []
        nxt = logits.argmax(-1, keepdim=True)
        out = [int(nxt)]
        for _ in range(args.max_new - 1):
            t0 = time.perf_counter()
            logits, past = model.forward(nxt, past)
            steps.append((time.perf_counter() - t0) * 1e3)
            nxt = logits.argmax(-1, keepdim=True)
            out.append(int(nxt))
        if rep >= args.warmup:
            results.append(dict(prefill_ms=prefill_ms, steps=steps, tokens=out))
    med = [float(np.median(r["steps"])) for r in results]
    best = results[int(np.argmin(med))]
    s = np.array(best["steps"])
    rec = dict(record="torch_decode", threads=args.threads, torch=torch.__version__, prompt_tokens=args.prompt_tokens,
               max_new=args.max_new, repeats=args.repeats, prefill_ms=best["prefill_ms"],
               decode_step_median_ms=float(np.median(s)), decode_step_p10_ms=float(np.percentile(s, 10)),
               decode_step_p90_ms=float(np.percentile(s, 90)),
               decode_tokens_per_s=float(len(s) / (s.sum() / 1e3)),
               repeat_medians_ms=med, first_tokens=best["tokens"][:16])
    print(json.dumps(rec))


def n_params(cfg):
    """Parameters of a GPT-2 with tied head: wte + wpe + L blocks + ln_f (what kvhost reports)."""
    V, P, C, L = cfg["vocab_size"], cfg["n_positions"], cfg["n_embd"], cfg["n_layer"]
    F = cfg.get("n_inner") or 4 * C
    return V * C + P * C + L * (4 * C * C + 4 * C + 2 * C * F + F + C + 4 * C) + 2 * C


def peer(args):
    with open(os.path.join(args.model_dir, "config.json")) as f:
        cfg = json.load(f)
    P = cfg.get("n_positions", 1024)
    if args.prompt_tokens + args.max_new > P:
        print(f"torch_gpt2.py: --prompt-tokens {args.prompt_tokens} + --max-new {args.max_new} exceeds "
              f"n_positions {P}", file=sys.stderr)
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    model = GPT2(read_safetensors(os.path.join(args.model_dir, "model.safetensors")), cfg)
    B, M = args.batch, args.max_new
    ids = torch.tensor([synthetic_prompt(args.prompt_tokens, cfg["vocab_size"])] * B)  # [B, N]
    prefills, totals, steps_all, tps, out = [], [], [], [], []
    for rep in range(args.warmup + args.repeats):
        past = [None] * model.L
        t_start = time.perf_counter()
        logits, past = model.forward(ids, past)  # [B, V]
        nxt = logits.argmax(-1, keepdim=True)    # [B, 1]
        prefill_ms = (time.perf_counter() - t_start) * 1e3
        toks, steps = [nxt[0, 0].item()], []
        for _ in range(M - 1):
            t0 = time.perf_counter()
            logits, past = model.forward(nxt, past)
            nxt = logits.argmax(-1, keepdim=True)
            steps.append((time.perf_counter() - t0) * 1e3)
            toks.append(nxt[0, 0].item())
        total_ms = (time.perf_counter() - t_start) * 1e3
        if rep < args.warmup:
            continue
        prefills.append(prefill_ms)
        totals.append(total_ms)
        steps_all += steps
        tps.append(B * len(steps) / (sum(steps) / 1e3) if steps else 0.0)
        out = toks
    rec = {
        "record": "peer_run", "peer": "torch-eager", "peer_version": "torch " + torch.__version__,
        "peer_impl": "bench/torch_gpt2.py: eager PyTorch, fp32, KV cache grown with torch.cat, greedy",
        "device": f"cpu ({torch.get_num_threads()} threads, torch {torch.__version__})",
        "threads": torch.get_num_threads(), "batch": B, "prompt_tokens": args.prompt_tokens, "max_new": M,
        "warmup_runs": args.warmup, "repeats": args.repeats, "prefill_ms": prefills, "total_ms": totals,
        "step_ms": steps_all, "repeat_tokens_per_s": tps, "generated_tokens": [M] * B, "first_tokens": out[:16],
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "model": {"n_layer": cfg["n_layer"], "n_head": cfg["n_head"], "n_embd": cfg["n_embd"],
                  "n_params": n_params(cfg)},
    }
    print(json.dumps(rec), flush=True)
    return 0


def check(args):
    if IMPORT_ERROR is not None:
        print(f"torch_gpt2.py: {IMPORT_ERROR} (Debian: apt-get install python3-torch; python {sys.executable})",
              file=sys.stderr)
        return 1
    print(json.dumps({"peer": "torch-eager", "peer_version": "torch " + torch.__version__,
                      "python": sys.executable}))
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-checkpoint")
    m.add_argument("dir")
    m.add_argument("--preset", default="gpt2-medium", choices=sorted(PRESETS))
    m.add_argument("--seed", type=int, default=1234)
    d = sub.add_parser("decode")
    d.add_argument("dir")
    d.add_argument("--prompt-tokens", type=int, default=128)
    d.add_argument("--max-new", type=int, default=128)
    d.add_argument("--threads", type=int, default=1)
    d.add_argument("--repeats", type=int, default=3)
    d.add_argument("--warmup", type=int, default=1)
    p = sub.add_parser("peer")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-new", type=int, default=16)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    sub.add_parser("check")
    a = ap.parse_args()
    if a.cmd == "check":
        return check(a)
    if IMPORT_ERROR is not None:
        print(f"torch_gpt2.py: {IMPORT_ERROR} (Debian: apt-get install python3-torch)", file=sys.stderr)
        return 1
    return {"make-checkpoint": make_checkpoint, "decode": decode, "peer": peer}[a.cmd](a) or 0


if __name__ == "__main__":
    sys.exit(main())
