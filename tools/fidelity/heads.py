#!/usr/bin/env python3
"""heads.py — does a GPT-2 checkpoint have the parts of a copy (induction) mechanism? (issue 19)

On R random token sequences [S][S] (S: L ids drawn from the training corpus's most frequent tokens) it
prints, per layer and head, the mean attention
  prev  from position t to t-1 (a previous-token head: ~1 here, ~1/t for uniform attention), and
  ind   from a token of the second copy to the token after the same token in the first copy (an
        induction head: ~1), and
the NLL and top-1 of the second copy; and how much the position embeddings tell neighbours apart (mean
cosine of centred wpe[t] and wpe[t-d]; a smooth, usable code has ~1 at d = 1 falling with d).

  /usr/bin/python3 tools/fidelity/heads.py ../shared/models/gpt2-tiny-wt
  /usr/bin/python3 tools/fidelity/heads.py ../shared/models/gpt2-tiny-wt --ckpt /work/fidelity-run/p7/ckpt.pt
"""
import argparse
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="HF-layout model directory (the shape; and the weights unless --ckpt)")
    ap.add_argument("--ckpt", help="a train.py RUN/ckpt.pt to load instead of the directory's weights")
    ap.add_argument("--corpus", default="/work/fidelity-run/corpus")
    ap.add_argument("--span", type=int, default=100)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--offset", type=int, default=0, help="book tokens (Northanger Abbey) before the pair")
    a = ap.parse_args()
    torch.set_num_threads(1)
    m, cfg = train.load_model(a.model)
    if a.ckpt:
        m.load_state_dict(torch.load(a.ckpt)["model"])
    m.eval()
    L, NL, NH = a.span, cfg["n_layer"], cfg["n_head"]
    d = train.Data(a.corpus, None, {"austen": 1, "moby": 1, "kjv": 1})
    d.set_rand_vocab(8192)
    na = np.fromfile(os.path.join(a.corpus, "northanger.u16"), dtype="<u2").astype(np.int64)
    for b in m.h:
        b.keep = list(range(NH))
    prev = torch.zeros(NL, NH)
    ind = torch.zeros(NL, NH)
    nll = top = 0.0
    for r in range(a.samples):
        rng = np.random.default_rng([4242, r])
        S = d.rand_vocab[rng.integers(0, d.rand_vocab.size, size=L)]
        x = torch.from_numpy(np.concatenate([na[1000:1000 + a.offset], S, S]))[None]
        o = a.offset
        with torch.no_grad():
            lg = m.logits(m.hidden(x))[0, :-1]
        y = x[0, 1:]
        q = torch.arange(o + L, o + 2 * L - 1)  # second-copy tokens with a successor in the first copy
        k = q - L + 1
        t = torch.arange(1, x.shape[1])
        for li, b in enumerate(m.h):
            att = b.kept[0]  # [NH, T, T]
            prev[li] += att[:, t, t - 1].mean(-1) / a.samples
            ind[li] += att[:, q, k].mean(-1) / a.samples
        nll += F.cross_entropy(lg[o + L:], y[o + L:]).item() / a.samples
        top += (lg[o + L:].argmax(-1) == y[o + L:]).float().mean().item() / a.samples
    print(f"second copy of {a.samples} random spans of {L} (after {a.offset} book tokens): NLL {nll:.3f}, "
          f"top-1 {100 * top:.1f} %")
    for li in range(NL):
        print(f"layer {li}  prev " + " ".join(f"{v:.2f}" for v in prev[li]) +
              "  | ind " + " ".join(f"{v:.2f}" for v in ind[li]))
    P = m.wpe.detach()
    P = P - P.mean(0)
    P = P / P.norm(dim=1, keepdim=True)
    cos = {dd: (P[dd:] * P[:-dd]).sum(1).mean().item() for dd in (1, 2, 4, 16, 64)}
    print("wpe: mean norm %.3f; cosine of centred wpe[t], wpe[t-d]: " % m.wpe.detach().norm(dim=1).mean() +
          ", ".join(f"d={dd} {v:.2f}" for dd, v in cos.items()))


if __name__ == "__main__":
    main()
