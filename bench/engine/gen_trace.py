#!/usr/bin/env python3
"""gen_trace.py — a small synthetic request trace for the engine benchmark (JSON Lines, one request a line,
the format of docs/trace.md as `kvhost trace` writes it): Poisson arrivals at --rate requests/s, prompt and
output lengths uniform (or --dist lognormal) in MIN:MAX, explicit prompt_ids (seeded random ids in [0, 50256), so never EOS), and
optionally a share of the requests starting with one common "system prompt" prefix.

  python3 bench/engine/gen_trace.py --requests 20 --rate 0.5 --prompt-len 16:48 --max-tokens 8:16 \
      [--prefix-share 0.5 --prefix-len 32] [--seed 1] --out trace.jsonl

The benchmark driver (engine_bench.sh) uses `kvhost trace` when the binary has it and this script otherwise;
the peers' self-tests use this one. --output-len, --shared-share and
--shared-len are accepted as `kvhost trace` spells them (the same values do not give the same ids or arrivals). Arrival of the first request is 0.0; each later one adds an exponential
gap of mean 1/rate. A prefixed request's --prompt-len counts the prefix too (its own part is at least 1 token).
Every request: {"id","arrival","prompt_ids","max_tokens","prefix"(when shared),"temperature":0,"top_k":0,
"top_p":1,"seed","ignore_eos":true}. Standard library only.
"""
import argparse
import json
import math
import random
import sys


def span(text, name):
    try:
        lo, hi = (int(x) for x in text.split(":")) if ":" in text else (int(text), int(text))
    except ValueError:
        raise SystemExit(f"gen_trace: {name} {text!r}: expected N or MIN:MAX")
    if lo < 1 or hi < lo:
        raise SystemExit(f"gen_trace: {name} {text!r}: need 1 <= MIN <= MAX")
    return lo, hi


def draw(rng, lo, hi, dist):
    """uniform in lo..hi, or lognormal (median sqrt(lo*hi), sigma ln(hi/lo)/4, redrawn until in lo..hi)."""
    if dist == "uniform" or lo == hi:
        return rng.randint(lo, hi)
    mu, sigma = math.log(math.sqrt(lo * hi)), math.log(hi / lo) / 4
    while True:
        v = round(rng.lognormvariate(mu, sigma))
        if lo <= v <= hi:
            return v


def generate(n, rate, plen, mtok, prefix_share=0.0, prefix_len=0, seed=1, vocab=50256, dist="uniform"):
    rng = random.Random(seed)
    prefix = [rng.randrange(vocab) for _ in range(prefix_len)]
    t, out = 0.0, []
    for i in range(n):
        if i > 0:
            t += rng.expovariate(rate)
        total = draw(rng, *plen, dist)
        shared = prefix_len > 0 and rng.random() < prefix_share
        own = max(1, total - prefix_len) if shared else total
        ids = (prefix if shared else []) + [rng.randrange(vocab) for _ in range(own)]
        r = {"id": f"r{i}", "arrival": round(t, 6), "prompt_ids": ids, "max_tokens": draw(rng, *mtok, dist)}
        if shared:
            r["prefix"] = "sys"
        r.update({"temperature": 0, "top_k": 0, "top_p": 1, "seed": seed * 100003 + i, "ignore_eos": True})
        out.append(r)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--rate", type=float, default=1.0, help="mean arrivals per second (Poisson)")
    ap.add_argument("--prompt-len", default="16:64", help="prompt tokens, N or MIN:MAX (uniform)")
    ap.add_argument("--max-tokens", "--output-len", default="8:32", help="max_tokens, N or MIN:MAX (uniform)")
    ap.add_argument("--prefix-share", "--shared-share", type=float, default=0.0,
                    help="share of requests with the common prefix")
    ap.add_argument("--prefix-len", "--shared-len", type=int, default=0, help="tokens of the common prefix")
    ap.add_argument("--dist", choices=("uniform", "lognormal"), default="uniform",
                    help="of both lengths (lognormal: median sqrt(MIN*MAX), sigma ln(MAX/MIN)/4, kept in range)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default="-")
    a = ap.parse_args(argv)
    if a.requests < 1 or a.rate <= 0:
        raise SystemExit("gen_trace: need --requests >= 1 and --rate > 0")
    if not 0 <= a.prefix_share <= 1 or a.prefix_len < 0:
        raise SystemExit("gen_trace: need 0 <= --prefix-share <= 1 and --prefix-len >= 0")
    reqs = generate(a.requests, a.rate, span(a.prompt_len, "--prompt-len"), span(a.max_tokens, "--max-tokens"),
                    a.prefix_share, a.prefix_len, a.seed, dist=a.dist)
    f = sys.stdout if a.out == "-" else open(a.out, "w")
    for r in reqs:
        f.write(json.dumps(r, separators=(",", ":")) + "\n")
    if f is not sys.stdout:
        f.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
