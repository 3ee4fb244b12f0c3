#!/usr/bin/env python3
"""make_hf_gpt2.py — writes a GPT-2 checkpoint in the exact Hugging Face layout with SEEDED RANDOM weights,
for the side-by-side peer benchmark (bench/peer_bench.py): kvhost loads the directory as is, transformers
loads it with GPT2LMHeadModel.from_pretrained, and llama.cpp's convert_hf_to_gguf.py converts it to GGUF, so
all three engines run the very same weights.

  python3 bench/peers/make_hf_gpt2.py DIR [--preset gpt2-medium] [--seed 1234] [--tokenizer TOKDIR]

DIR gets config.json, model.safetensors (F32, Hugging Face tensor names: wte.weight, wpe.weight,
h.N.{ln_1,attn.c_attn,attn.c_proj,ln_2,mlp.c_fc,mlp.c_proj}.{weight,bias}, ln_f.*; Conv1D input-major;
the LM head tied to wte; no h.N.attn.bias buffers), vocab.json + merges.txt (the GPT-2 tokenizer, copied from
TOKDIR: default ../shared/data/gpt2-tokenizer beside the repository, else the repository's host/model/assets),
tokenizer_config.json, and RANDOM_WEIGHTS.txt. The tensors are the ones `bench/torch_gpt2.py make-checkpoint`
writes for the same preset and seed (same generator, same order), so a checkpoint from either is the same.

THE WEIGHTS ARE RANDOM: speed and memory are meaningful, generated text and perplexity are not.
Needs numpy (Debian: apt-get install python3-numpy). Existing complete directories are left alone unless --force.
"""
import argparse
import json
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "bench"))
import torch_gpt2  # noqa: E402  (the same seeded generator and safetensors writer as the other CPU benches)

MARK = "RANDOM_WEIGHTS.txt"


def find_tokenizer(explicit):
    cands = [explicit] if explicit else [os.path.join(os.path.dirname(REPO), "shared", "data", "gpt2-tokenizer"),
                                         "/work/shared/data/gpt2-tokenizer", os.path.join(REPO, "host", "assets")]
    for c in cands:
        if c and os.path.isfile(os.path.join(c, "vocab.json")) and os.path.isfile(os.path.join(c, "merges.txt")):
            return c
    raise SystemExit("make_hf_gpt2.py: no GPT-2 tokenizer (vocab.json + merges.txt) in " + ", ".join(c for c in cands if c))


def complete(d):
    return all(os.path.isfile(os.path.join(d, f)) for f in
               ("config.json", "model.safetensors", "vocab.json", "merges.txt", MARK))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("--preset", default="gpt2-medium", choices=sorted(torch_gpt2.PRESETS))
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--tokenizer", help="directory with vocab.json and merges.txt")
    ap.add_argument("--force", action="store_true", help="rewrite an existing complete directory")
    a = ap.parse_args(argv)
    if complete(a.dir) and not a.force:
        print(f"make_hf_gpt2.py: {a.dir} already complete (use --force to rewrite)", file=sys.stderr)
        return 0
    if torch_gpt2.np is None:
        raise SystemExit("make_hf_gpt2.py: needs numpy (Debian: apt-get install python3-numpy)")
    tok = find_tokenizer(a.tokenizer)
    torch_gpt2.make_checkpoint(argparse.Namespace(dir=a.dir, preset=a.preset, seed=a.seed))
    for f in ("vocab.json", "merges.txt"):
        shutil.copyfile(os.path.join(tok, f), os.path.join(a.dir, f))
    with open(os.path.join(a.dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "GPT2Tokenizer", "model_max_length": 1024, "bos_token": "<|endoftext|>",
                   "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "add_prefix_space": False}, f, indent=1)
    with open(os.path.join(a.dir, MARK), "w") as f:
        f.write(f"Seeded random weights ({a.preset}, seed {a.seed}) written by bench/peers/make_hf_gpt2.py.\n"
                "Only speed and memory measured with them mean anything; text and perplexity are meaningless.\n")
    print(f"make_hf_gpt2.py: wrote {a.dir} ({a.preset}, seed {a.seed}, RANDOM weights; tokenizer from {tok})",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
