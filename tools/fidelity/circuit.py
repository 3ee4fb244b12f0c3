#!/usr/bin/env python3
"""circuit.py — can layer 1 of the stand-in learn to match tokens? Isolated checks of issue 19's third attempt.

An induction head (layer 1) must attend from a token X of a repeated span to the token *after* X's
earlier occurrence; its keys can only know "the token before me was X" through a previous-token head in
layer 0. This script builds that setting on a 2-layer slice of a GPT-2 of the stand-in's shape and
measures, on pairs [S][S] of random token ids, how much attention layer 1 head 0 puts on its target:

  same       target = the earlier occurrence of the same token (needs no layer 0: a match of the token
             embeddings alone); layer 1's c_attn trained on that attention (negative log)
  induction  target = the token after the earlier occurrence (needs layer 0's previous-token head);
             --train picks what is trained besides layer 1's c_attn
  analytic   no training: layer 1 head 0's query matrix set to c * W_V0 W_O0 W_K1 (the previous-token
             head's value-output map composed with the key map, i.e. the exact solution of the bilinear
             match if the previous-token head's output were the only thing in the keys), for several c
  reserved   no training beyond the previous-token head: train.circuit_init's hand-set circuit, the
             match with directions of its own (token embeddings in dimensions 0-191, the position code
             alone in 224-255, the previous-token head's projection P of the token written to 192-223;
             layer 1 head 0's query c * P, its key the identity on 192-223), for several c

Stage 0 (every mode; train.train_prev_head): 40 Adam steps (lr 6e-3) train the position embeddings and
layer 0's c_attn so that layer 0 head 0 attends to t-1 (with a sinusoidal position code: 0.9997).

  /usr/bin/python3 tools/fidelity/circuit.py same --lr 1e-2
  /usr/bin/python3 tools/fidelity/circuit.py induction --lr 1e-2 --train attn1 --proj-scale 10
  /usr/bin/python3 tools/fidelity/circuit.py analytic
docs/fidelity.md ("Third attempt") has what these printed.
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train  # noqa: E402


def pairs(data, step, T):
    """4 sequences of [S][S] pairs; (sequence, query, induction key) index rows."""
    xs, inds = [], []
    for i in range(4):
        rng = np.random.default_rng([2, step, i])
        ids, _, ii = train.rand_pairs(data, rng, T, 8, min(128, T // 3), 0)
        xs.append(ids[:T])
        inds.append(np.concatenate([np.full((len(ii), 1), i), ii], 1))
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.concatenate(inds))


def target_attention(m, x, ind, shift):
    """Mean attention of layer 1 head 0 on the targets (shift 1: the same token instead of the next)."""
    T = x.shape[1]
    h = m.wte[x] + m.wpe[:T]
    for b in m.h[:2]:
        h = b(h, m.mask)
    return m.h[1].kept[:, 0][ind[:, 0], ind[:, 1], ind[:, 2] - shift]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["same", "induction", "analytic", "reserved"])
    ap.add_argument("--model", default=os.path.join(train.SHARED, "models", "gpt2-tiny-wt"), help="the shape")
    ap.add_argument("--corpus", default="/work/fidelity-run/corpus")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=1024, help="alphabet of the random spans")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--train", choices=["attn1", "attn1+proj0", "attn1+v0proj0"], default="attn1")
    ap.add_argument("--proj-scale", type=float, default=1.0, help="multiply layer 0's output projection")
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    m, cfg = train.load_model(a.model, scratch=True, wpe_init="sin")
    C = cfg["n_embd"]
    H = C // cfg["n_head"]  # head size
    data = train.Data(a.corpus, None, {"austen": 1, "moby": 1, "kjv": 1})
    data.set_rand_vocab(8192)
    if a.mode == "reserved":  # train.circuit_init's construction, at several query scales
        for c in [1, 3, 10, 15, 30, 100]:
            m, _ = train.load_model(a.model, scratch=True)
            prev = train.circuit_init(m, data, 1, c, 50.0, 0)[0]  # (pins unused here)
            data.rand_vocab = data.rand_vocab[::max(1, data.rand_vocab.size // a.vocab)][:a.vocab]
            m.h[1].keep = [0]
            x, ind = pairs(data, 0, a.seq)
            with torch.no_grad():
                att = target_attention(m, x, ind, 0)
            print(f"query scale {c:g}: attention on the induction targets {att.mean().item():.3f} "
                  f"(uniform {(1 / (ind[:, 1] + 1.0)).mean().item():.3f}; layer 0 head 0 on t-1 {prev:.3f})")
            data.set_rand_vocab(8192)
        return
    prev = train.train_prev_head(m, data, a.seq, 40, lambda step: np.random.default_rng([1, step]))
    m.h[0].keep = [0]
    print(f"stage 0: layer 0 head 0 attention on t-1 {prev:.4f}")
    data.rand_vocab = data.rand_vocab[::max(1, 8192 // a.vocab)][:a.vocab]
    with torch.no_grad():
        m.h[0].c_proj_w.mul_(a.proj_scale)
    m.h[1].keep = [0]
    if a.mode == "analytic":
        x, ind = pairs(data, 0, a.seq)
        wv0, wo0 = m.h[0].c_attn_w[:, 2 * C:2 * C + H].detach(), m.h[0].c_proj_w[:H].detach()
        for c in [0, 1e2, 1e3, 1e4, 1e5, 3e5]:
            with torch.no_grad():
                m.h[1].c_attn_w[:, :H] = c * (wv0 @ wo0 @ m.h[1].c_attn_w[:, C:C + H])
                att = target_attention(m, x, ind, 0)
            print(f"c {c:g}: attention on the induction targets {att.mean().item():.3f} "
                  f"(uniform {(1 / (ind[:, 1] + 1.0)).mean().item():.3f})")
        return
    params = {"attn1": [m.h[1].c_attn_w], "attn1+proj0": [m.h[1].c_attn_w, m.h[0].c_proj_w],
              "attn1+v0proj0": [m.h[1].c_attn_w, m.h[0].c_proj_w, m.h[0].c_attn_w]}[a.train]
    opt = torch.optim.Adam(params, lr=a.lr)
    shift = 1 if a.mode == "same" else 0
    t = torch.arange(1, a.seq)
    for step in range(a.steps + 1):
        x, ind = pairs(data, step, a.seq)
        att = target_attention(m, x, ind, shift)
        loss = -att.clamp_min(1e-6).log().mean()
        if a.train != "attn1":  # layer 0 trained too: keep its head on t-1
            loss = loss - m.h[0].kept[:, 0][:, t, t - 1].clamp_min(1e-6).log().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 0:
            print(f"step {step}: attention on the {a.mode} targets {att.mean().item():.3f} "
                  f"(uniform {(1 / (ind[:, 1] + 1.0)).mean().item():.3f})", flush=True)


if __name__ == "__main__":
    main()
