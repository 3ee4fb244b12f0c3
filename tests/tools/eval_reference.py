#!/usr/bin/env python3
"""eval_reference.py — independent reference for tests/test_eval.c: teacher-forced mean NLL of a text
prefix under a Hugging Face-format GPT-2 checkpoint, in PyTorch float32.

Owns: the expected values REF_*_NLL_2048 written into tests/test_eval.c. Does not own: any C code.
Written without kvhost: weights are read straight from model.safetensors (header parsed here), the
forward pass is plain GPT-2 (pre-LN, tanh GELU, causal attention, tied LM head), log-softmax in float64.

Two steps, because the tokenizer and torch live in different Python installs on the build machine:
  python3 tests/tools/eval_reference.py tokenize TEXT N OUT.json     (needs `tokenizers`)
  /usr/bin/python3 tests/tools/eval_reference.py nll MODEL_DIR OUT.json CTX   (needs `torch`, numpy)
The first writes the first N GPT-2 token ids of the whole TEXT (special tokens as plain text); the
second prints the mean NLL over non-overlapping CTX-token chunks, each chunk's first token unpredicted.
"""
import json
import math
import struct
import sys


def tokenize(text_path, n, out_path, vocab_dir):
    # Hugging Face `tokenizers` (Rust): byte-level BPE with GPT-2's pre-tokenizer regex, no special tokens
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.BPE.from_file(f"{vocab_dir}/vocab.json", f"{vocab_dir}/merges.txt"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    with open(text_path, "rb") as f:
        text = f.read().decode("utf-8")
    ids = tok.encode(text).ids
    with open(out_path, "w") as f:
        json.dump(ids[:n], f)
    print(f"{len(ids)} tokens in the file, wrote {min(n, len(ids))}")


def load_safetensors(path):
    import numpy as np
    import torch
    with open(path, "rb") as f:
        hlen = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(hlen))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "F32", name
        a, b = info["data_offsets"]
        arr = np.frombuffer(data[a:b], dtype="<f4").reshape(info["shape"])
        out[name] = torch.from_numpy(arr.copy())
    return out


def nll(model_dir, ids_path, ctx):
    import torch
    torch.set_num_threads(1)
    with open(f"{model_dir}/config.json") as f:
        cfg = json.load(f)
    W = load_safetensors(f"{model_dir}/model.safetensors")
    C, NH, L = cfg["n_embd"], cfg["n_head"], cfg["n_layer"]
    eps = cfg["layer_norm_epsilon"]
    HS = C // NH
    with open(ids_path) as f:
        ids = json.load(f)

    def ln(x, p):
        return torch.nn.functional.layer_norm(x, (C,), W[p + ".weight"], W[p + ".bias"], eps)

    def gelu(x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))

    def forward(tokens):  # tokens: [T] -> logits [T, V]
        T = len(tokens)
        t = torch.tensor(tokens)
        x = W["wte.weight"][t] + W["wpe.weight"][:T]
        mask = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
        for i in range(L):
            p = f"h.{i}."
            h = ln(x, p + "ln_1")
            qkv = h @ W[p + "attn.c_attn.weight"] + W[p + "attn.c_attn.bias"]
            q, k, v = qkv.split(C, dim=1)
            q = q.view(T, NH, HS).transpose(0, 1)
            k = k.view(T, NH, HS).transpose(0, 1)
            v = v.view(T, NH, HS).transpose(0, 1)
            att = (q @ k.transpose(1, 2)) / math.sqrt(HS)
            att = att.masked_fill(mask, float("-inf")).softmax(dim=-1)
            y = (att @ v).transpose(0, 1).reshape(T, C)
            x = x + y @ W[p + "attn.c_proj.weight"] + W[p + "attn.c_proj.bias"]
            h = ln(x, p + "ln_2")
            h = gelu(h @ W[p + "mlp.c_fc.weight"] + W[p + "mlp.c_fc.bias"])
            x = x + h @ W[p + "mlp.c_proj.weight"] + W[p + "mlp.c_proj.bias"]
        x = ln(x, "ln_f")
        return x @ W["wte.weight"].T

    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids) - 1, ctx):
            chunk = ids[s:s + ctx]
            if len(chunk) < 2:
                break
            logits = forward(chunk).double()
            lp = torch.log_softmax(logits, dim=-1)
            tgt = torch.tensor(chunk[1:])
            total += -lp[:-1].gather(1, tgt[:, None]).sum().item()
            count += len(chunk) - 1
    mean = total / count
    print(json.dumps({"tokens": len(ids), "predicted": count, "nll": mean, "ppl": math.exp(mean)}))


if __name__ == "__main__":
    if len(sys.argv) >= 5 and sys.argv[1] == "tokenize":
        vocab_dir = sys.argv[5] if len(sys.argv) > 5 else "../shared/data/gpt2-tokenizer"
        tokenize(sys.argv[2], int(sys.argv[3]), sys.argv[4], vocab_dir)
    elif len(sys.argv) == 5 and sys.argv[1] == "nll":
        nll(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        sys.exit(__doc__)
