#!/usr/bin/env python3
"""golden.py — golden outputs of a GPT-2 checkpoint from an independent implementation (transformers).

Writes DIR/golden.json in the layout of gpt2-tiny-wt's (tests/test_tiny_copy.c reads it): for each prompt
the ids, the top-10 logits, the logits of ids 0..15 and 50256 and the logsumexp at the last position of a
full-sequence float32 forward (no KV cache), and the greedy 20-token continuation (each step recomputed
from the whole sequence). Prompts: one token, a 7-token phrase, and a 64-token copy prompt (a 32-token
passage of The War of the Worlds' opening written twice, so the continuation tests copying).

Needs transformers (pip install transformers==4.44.2 torch) — not the training script's own GPT-2, so the
values check kvhost against an implementation neither of them shares.
  python3 tools/fidelity/golden.py models/gpt2-tiny-copy
"""
import hashlib
import json
import os
import sys

import torch
from transformers import GPT2LMHeadModel, GPT2TokenizerFast

PASSAGE = ("No one would have believed in the last years of the nineteenth century that this world was being "
           "watched keenly and closely by intelligences greater than man's")


def main():
    d = sys.argv[1]
    torch.set_num_threads(1)
    tok = GPT2TokenizerFast(vocab_file=os.path.join(d, "vocab.json"), merges_file=os.path.join(d, "merges.txt"))
    m = GPT2LMHeadModel.from_pretrained(d, torch_dtype=torch.float32).eval()
    p32 = tok(" " + PASSAGE)["input_ids"][:32]
    prompts = [("len1", tok(" Robert")["input_ids"]), ("len7", tok(" The history of the city was")["input_ids"][:7]),
               ("copy64", p32 + p32)]
    out = []
    with torch.no_grad():
        for name, ids in prompts:
            lg = m(torch.tensor([ids])).logits[0, -1].double()
            top = torch.topk(lg, 10)
            probe = list(range(16)) + [50256]
            seq = list(ids)
            for _ in range(20):
                seq.append(int(m(torch.tensor([seq])).logits[0, -1].argmax()))
            out.append({"name": name, "ids": ids, "text": tok.decode(ids),
                        "last_position_logits": {
                            "top10": [{"id": int(i), "logit": float(v)} for v, i in zip(top.values, top.indices)],
                            "probe_ids": probe, "probe_logits": [float(lg[i]) for i in probe],
                            "logsumexp": float(torch.logsumexp(lg, 0))},
                        "greedy_20": {"ids": seq[len(ids):], "text": tok.decode(seq[len(ids):])}})
    sha = hashlib.sha256(open(os.path.join(d, "model.safetensors"), "rb").read()).hexdigest()
    g = {"description": "Golden outputs computed by transformers " + __import__("transformers").__version__ +
         " (GPT2LMHeadModel, float32, CPU) from model.safetensors in this directory: last-position logits of a "
         "full-sequence forward, greedy continuations recomputed from the whole sequence at each step.",
         "model": os.path.basename(os.path.normpath(d)), "model_safetensors_sha256": sha, "dtype": "float32",
         "suggested_tolerance": {"logits_abs": 1e-3, "logsumexp_abs": 1e-3}, "prompts": out}
    with open(os.path.join(d, "golden.json"), "w") as f:
        json.dump(g, f, indent=1)
        f.write("\n")
    for p in out:
        print(p["name"], p["greedy_20"]["text"].replace("\n", "\\n"))


if __name__ == "__main__":
    main()
