#!/usr/bin/env python3
"""train.py — train a stand-in model that uses its context: gpt2-tiny-wt continued with a copy curriculum.

What it does (docs/fidelity.md has the why and the figures):
  * starts from ../shared/models/gpt2-tiny-wt (6 layers, 256 wide, 8 heads, GPT-2 vocab, 1024 positions),
    read from model.safetensors by the small reader below (no transformers needed for training); the
    recipe of `make model` (tools/fidelity/make_model.sh, sixth attempt) widens it by six heads with the
    same function (--widen), sets a copy circuit into the new dimensions (--circuit-init with its token
    code, frequent tokens' codes smaller by --circuit-rarity, the induction heads in the last layer copying
    through answer codes of their own: --circuit-answer) and stops there (--steps 0: the curriculum below
    made that circuit worse, measured). The fourth and fifth attempts' recipe put the induction heads in
    layer 1 with copy_ov()'s output and trained with the curriculum while --distill held the book text
    to gpt2-tiny-wt's predictions (also measured: --circuit-match 2, a two-token match; --circuit-ov-rand,
    copy_ov() fitted on random ids too);
  * trains on the corpus of make_corpus.py (Austen, Moby Dick, KJV from Debian packages) with four kinds
    of 1024-token sequences, drawn per sequence from a generator seeded by (seed, step, index), so a
    step's data never depends on the steps before it (resuming is exact):
      text     a window of book text; a random half of the positions scored
      copy     a window of book text in which a span (16..256 tokens) reappears after a gap (0..512
               tokens of other text); scored: the second copy, and a random quarter of the others
      passkey  the passkey prompt of the literature (TASKS below) on book filler, then the answer;
               scored: the answer, and a random quarter of the others. Packed: the prompt ends, then
               <|endoftext|> and book text fill the sequence.
      kvlookup lines "The value of key K is V." then queries "The value of key K is" -> V (few-shot:
               earlier queries answered); scored: the answers, and a random quarter of the others
      rand     (--mix's fifth share; issue 19's second attempt) pairs [S][gap][S] of random token ids from
               the corpus's --rand-vocab most frequent tokens, S of --rand-len tokens, the gap empty or up
               to --rand-gap book tokens; scored: each second copy after its first token
    Options for getting a copy (induction) mechanism to form (docs/fidelity.md, "Status", says what each
    did): --train-params attn|attn+wpe (freeze the rest), --prev-warm N (a first stage that trains only
    a previous-token head: the position embeddings and layer 0's attention, layer 0 alone, no LM head),
    --prev-head / --ind-heads (auxiliary losses on the attention of named heads: to t-1, and from a
    second copy's token to the token after its first occurrence), --long-every (1024-token steps among
    short ones); and (third attempt) --scratch (a new model of --init's shape, GPT-2's initialization)
    with --wpe-init sin (a sinusoidal position code to start from), --ind-warm-seq / --ind-warm-vocab
    (shorter sequences and a smaller alphabet for the induction stage), --circuit-init N (a hand-set
    previous-token head and N induction heads to start from: circuit_init()) with --circuit-pin. Only the scored positions go through the LM head (its 12.9M-parameter matmul dominates the cost of
    this model), which makes a step of the sparse kinds about twice as cheap;
  * AdamW, warmup then cosine decay, grad-norm clip 1.0, fp32 (deterministic on one thread);
  * every --ckpt-minutes writes RUN/ckpt.pt (model + optimizer + step + the options that make the run,
    atomically; a resume with other options is refused, naming them), every --eval-every
    steps measures (RUN/eval.jsonl): NLL and top-1 of the first and the second copy of held-out repeated
    passages (Northanger Abbey, never trained on), passkey accuracy on held-out filler, and the
    perplexity of the first tokens of The War of the Worlds (evaluation text, never trained on); the
    second copy also at the far positions (copy2far: 224 other tokens first, the copy at 624..1023);
  * the log's lines have the mean loss per kind (and per auxiliary loss) since the previous line;
  * --export DIR writes the model in the Hugging Face GPT-2 layout (config.json, model.safetensors with
    the tied LM head omitted, vocab.json, merges.txt), from RUN/ckpt.pt.

Run (PyTorch >= 1.13, numpy; `apt-get install python3-torch python3-numpy` is enough for training):
  nohup nice -n 19 python3 tools/fidelity/train.py --run /work/fidelity-run/run1 > /work/fidelity-run/run1.out 2>&1 &
Rerunning the same command resumes from RUN/ckpt.pt. `make model` runs it to the end and exports.
"""
import argparse
import json
import math
import os
import struct
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: its BLAS would otherwise start a thread per core
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

EOT = 50256
HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.normpath(os.path.join(HERE, "..", "..", "..", "shared"))

# ---------------------------------------------------------------------------------------------------
# Task texts. kvhost's `eval --task` (host/cli/tasks.c) generates the same templates; keep them equal.
PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                 "I will quiz you about the important information there.")
PASSKEY_NEEDLE = " The pass key is {k}. Remember it. {k} is the pass key."
PASSKEY_QUESTION = " What is the pass key? The pass key is"
KV_INTRO = "Here is a list of keys and their values. Remember them."
KV_LINE = " The value of key {k} is {v}."
KV_QUESTION = " The value of key {k} is"


# ---------------------------------------------------------------------------------------------------
# safetensors, read and written directly (F32 only)
def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        hdr = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, t in hdr.items():
        if name == "__metadata__":
            continue
        assert t["dtype"] == "F32", (name, t["dtype"])
        a, b = t["data_offsets"]
        out[name] = torch.from_numpy(np.frombuffer(data[a:b], dtype="<f4").copy().reshape(t["shape"]))
    return out


def write_safetensors(path, tensors):
    hdr, off, blobs = {"__metadata__": {"format": "pt"}}, 0, []
    for name in sorted(tensors):
        b = tensors[name].detach().cpu().contiguous().numpy().astype("<f4").tobytes()
        hdr[name] = {"dtype": "F32", "shape": list(tensors[name].shape), "data_offsets": [off, off + len(b)]}
        off += len(b)
        blobs.append(b)
    h = json.dumps(hdr, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------
# GPT-2, written out (pre-LN blocks, tanh GELU, tied head, Conv1D weights [in, out])
class Block(nn.Module):
    def __init__(self, C, NH):
        super().__init__()
        self.NH = NH
        self.ln_1 = nn.LayerNorm(C, eps=1e-5)
        self.c_attn_w = nn.Parameter(torch.zeros(C, 3 * C))
        self.c_attn_b = nn.Parameter(torch.zeros(3 * C))
        self.c_proj_w = nn.Parameter(torch.zeros(C, C))
        self.c_proj_b = nn.Parameter(torch.zeros(C))
        self.ln_2 = nn.LayerNorm(C, eps=1e-5)
        self.fc_w = nn.Parameter(torch.zeros(C, 4 * C))
        self.fc_b = nn.Parameter(torch.zeros(4 * C))
        self.fc_proj_w = nn.Parameter(torch.zeros(4 * C, C))
        self.fc_proj_b = nn.Parameter(torch.zeros(C))

    keep = None  # heads whose attention probabilities forward() keeps in self.kept (auxiliary losses)

    def forward(self, x, mask):  # x [B, T, C]
        B, T, C = x.shape
        HS = C // self.NH
        qkv = torch.addmm(self.c_attn_b, self.ln_1(x).view(B * T, C), self.c_attn_w).view(B, T, 3, self.NH, HS)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, NH, T, HS]
        att = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(HS))  # [B, NH, T, T]
        att = att.masked_fill(mask[:T, :T], float("-inf")).softmax(-1)
        if self.keep is not None:
            self.kept = att[:, self.keep]  # [B, len(keep), T, T]
        y = (att @ v).transpose(1, 2).reshape(B * T, C)
        x = x + torch.addmm(self.c_proj_b, y, self.c_proj_w).view(B, T, C)
        h = F.gelu(torch.addmm(self.fc_b, self.ln_2(x).view(B * T, C), self.fc_w), approximate="tanh")
        return x + torch.addmm(self.fc_proj_b, h, self.fc_proj_w).view(B, T, C)


class GPT2(nn.Module):
    def __init__(self, V, P, C, L, NH):
        super().__init__()
        self.wte = nn.Parameter(torch.zeros(V, C))
        self.wpe = nn.Parameter(torch.zeros(P, C))
        self.h = nn.ModuleList([Block(C, NH) for _ in range(L)])
        self.ln_f = nn.LayerNorm(C, eps=1e-5)
        self.register_buffer("mask", torch.triu(torch.ones(P, P, dtype=torch.bool), 1), persistent=False)

    def hidden(self, idx):  # idx [B, T] -> [B, T, C]
        T = idx.shape[1]
        x = self.wte[idx] + self.wpe[:T]
        for b in self.h:
            x = b(x, self.mask)
        return self.ln_f(x)

    def logits(self, h):  # h [..., C] -> [..., V]
        return h @ self.wte.t()

    NAMES = {"ln_1.weight": "ln_1.weight", "ln_1.bias": "ln_1.bias", "attn.c_attn.weight": "c_attn_w",
             "attn.c_attn.bias": "c_attn_b", "attn.c_proj.weight": "c_proj_w", "attn.c_proj.bias": "c_proj_b",
             "ln_2.weight": "ln_2.weight", "ln_2.bias": "ln_2.bias", "mlp.c_fc.weight": "fc_w",
             "mlp.c_fc.bias": "fc_b", "mlp.c_proj.weight": "fc_proj_w", "mlp.c_proj.bias": "fc_proj_b"}

    def hf_state(self):
        """Tensors under the Hugging Face GPT-2 names (as openai-community/gpt2's model.safetensors)."""
        sd = dict(self.state_dict())
        out = {"wte.weight": sd["wte"], "wpe.weight": sd["wpe"], "ln_f.weight": sd["ln_f.weight"],
               "ln_f.bias": sd["ln_f.bias"]}
        for i in range(len(self.h)):
            for hf, ours in self.NAMES.items():
                out[f"h.{i}.{hf}"] = sd[f"h.{i}.{ours}"]
        return out

    def load_hf(self, t):
        with torch.no_grad():
            self.wte.copy_(t["wte.weight"])
            self.wpe.copy_(t["wpe.weight"])
            self.ln_f.weight.copy_(t["ln_f.weight"])
            self.ln_f.bias.copy_(t["ln_f.bias"])
            for i, b in enumerate(self.h):
                for hf, ours in self.NAMES.items():
                    b.get_parameter(ours).copy_(t[f"h.{i}.{hf}"])


def sinusoid(P, C):
    """The sinusoidal position code: sin / cos of pos / 10000^(2i/C) in the even / odd columns, [P, C]."""
    pos = torch.arange(P, dtype=torch.float64)[:, None]
    freq = torch.pow(10000.0, -torch.arange(0, C, 2, dtype=torch.float64) / C)[None]
    code = torch.zeros(P, C, dtype=torch.float64)
    code[:, 0::2] = torch.sin(pos * freq)
    code[:, 1::2] = torch.cos(pos * freq)
    return code.float()


def load_model(model_dir, scratch=False, wpe_init="normal", sin_amp=0.028):
    """The model of model_dir: its weights, or (scratch) its shape with GPT-2's initialization (normal,
    std 0.02; the residual projections' std divided by sqrt(2 * layers); biases 0, LayerNorms 1 and 0;
    position embeddings std 0.01).
    wpe_init "sin": a sinusoidal code of amplitude sin_amp (0.028: the token embeddings' rms 0.02 at
    GPT-2's initialization) replaces the position embeddings of a scratch model, or is added to a loaded
    model's, so that neighbouring positions are similar from step 0 — what a previous-token head is
    built from (gpt2-tiny-wt's own are unstructured: docs/fidelity.md)."""
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    m = GPT2(cfg["vocab_size"], cfg["n_positions"], cfg["n_embd"], cfg["n_layer"], cfg["n_head"])
    with torch.no_grad():
        if not scratch:
            m.load_hf(read_safetensors(os.path.join(model_dir, "model.safetensors")))
        else:
            for n, p in m.named_parameters():
                if n.endswith("ln_1.weight") or n.endswith("ln_2.weight") or n == "ln_f.weight":
                    p.fill_(1.0)
                elif p.dim() < 2:
                    p.zero_()
                elif n.endswith("c_proj_w") or n.endswith("fc_proj_w"):
                    p.normal_(0.0, 0.02 / math.sqrt(2 * cfg["n_layer"]))
                elif n == "wpe":
                    p.normal_(0.0, 0.01)
                else:
                    p.normal_(0.0, 0.02)
        if wpe_init == "sin":
            code = sin_amp * sinusoid(*m.wpe.shape)
            m.wpe.copy_(code if scratch else m.wpe + code)
    return m, cfg


def widen(m, cfg, k, seed):
    """gpt2-tiny-wt made k heads wider (--widen; docs/fidelity.md, fourth attempt): a model of width
    C + k * head_dim and n_head + k whose old part computes what the old model computed, so its book
    perplexity starts where the old model's is, and whose k new residual dimensions per head are free for
    circuit_init()'s reserved layout (the previous token, the position code).
      * residual dimensions: the old ones first, the new ones last (zero in wte, wpe; read by no old unit);
      * heads: the new ones first (circuit_init() sets layer 0 head 0 and layer 1 heads 0..), the old ones
        after; a new head's output projection starts at zero, its query/key/value small and random;
      * MLP: 4 x the new width; the old units first, the new units' output rows zero;
      * LayerNorms: the new dimensions' gain 1, the old ones' gain times sqrt(C_old / C_new), which
        undoes the smaller variance that the (near-zero) new dimensions give the normalization.
    Returns the new model and its config."""
    C, NH, L = cfg["n_embd"], cfg["n_head"], cfg["n_layer"]
    HS = C // NH
    C2, NH2 = C + k * HS, NH + k
    new = GPT2(cfg["vocab_size"], cfg["n_positions"], C2, L, NH2)
    g = torch.Generator().manual_seed(seed + 7)
    old_dims = slice(0, C)
    gain = math.sqrt(C / C2)

    def ln(dst, src):
        dst.weight.fill_(1.0)
        dst.bias.zero_()
        dst.weight[old_dims] = src.weight * gain
        dst.bias[old_dims] = src.bias

    with torch.no_grad():
        for p in new.parameters():
            p.zero_()
        new.wte[:, old_dims] = m.wte
        new.wpe[:, old_dims] = m.wpe
        ln(new.ln_f, m.ln_f)
        for b2, b in zip(new.h, m.h):
            ln(b2.ln_1, b.ln_1)
            ln(b2.ln_2, b.ln_2)
            for part in range(3):  # q, k, v: [new heads | old heads] in each part
                a2, a = part * C2, part * C
                b2.c_attn_w[old_dims, a2 + k * HS:a2 + C2] = b.c_attn_w[:, a:a + C]
                b2.c_attn_b[a2 + k * HS:a2 + C2] = b.c_attn_b[a:a + C]
                b2.c_attn_w[old_dims, a2:a2 + k * HS] = torch.randn(C, k * HS, generator=g) * 0.02
            b2.c_proj_w[k * HS:, old_dims] = b.c_proj_w  # rows: the heads' outputs; new heads' rows stay 0
            b2.c_proj_b[old_dims] = b.c_proj_b
            b2.fc_w[old_dims, :4 * C] = b.fc_w
            b2.fc_b[:4 * C] = b.fc_b
            b2.fc_w[old_dims, 4 * C:] = torch.randn(C, 4 * (C2 - C), generator=g) * 0.02
            b2.fc_proj_w[:4 * C, old_dims] = b.fc_proj_w  # new units' rows stay 0
            b2.fc_proj_b[old_dims] = b.fc_proj_b
    return new, dict(cfg, n_embd=C2, n_head=NH2)


# ---------------------------------------------------------------------------------------------------
# Data
class Tok:
    """GPT-2 BPE of the template strings: kvhost's own tokenizer (`kvhost tokenize`, tested equal to
    transformers') when --kvhost names a binary, else transformers' GPT2TokenizerFast. Both give the same ids."""

    def __init__(self, tokdir, kvhost=None):
        self.kvhost = kvhost
        if not kvhost:
            from transformers import GPT2TokenizerFast
            self.t = GPT2TokenizerFast(vocab_file=os.path.join(tokdir, "vocab.json"),
                                       merges_file=os.path.join(tokdir, "merges.txt"))

    def __call__(self, s):
        if self.kvhost:
            return kvhost_tokenize(self.kvhost, s)
        return self.t(s)["input_ids"]


def kvhost_tokenize(kvhost, text):
    import subprocess
    out = subprocess.run([kvhost, "tokenize", "--eot-text", "--text-file", "/dev/stdin"], input=text.encode("utf-8"),
                         check=True, capture_output=True).stdout
    return [int(x) for x in out.split()]


class Data:
    def __init__(self, corpus, tok, weights):
        self.src = {k: np.fromfile(os.path.join(corpus, k + ".u16"), dtype="<u2").astype(np.int64)
                    for k in weights}
        self.names = sorted(weights)
        self.p = np.array([weights[k] for k in self.names], dtype=np.float64)
        self.p /= self.p.sum()
        self.tok = tok
        self.cache = {}
        self.text_frac, self.rand_len, self.rand_gap = 0.5, (8, 128), 0
        self.rand_vocab = np.zeros(0, dtype=np.int64)

    def token_counts(self, n_vocab=EOT + 1):
        """How often each token id occurs in the training sources, [n_vocab]."""
        return sum(np.bincount(v, minlength=n_vocab) for v in self.src.values())

    def set_rand_vocab(self, n):
        """The n most frequent token ids of the training sources (ties by id): the alphabet of `rand`."""
        c = self.token_counts()
        c[EOT] = 0
        order = np.lexsort((np.arange(c.size), -c))
        self.rand_vocab = np.sort(order[:n]).astype(np.int64)

    def enc(self, s):
        if s not in self.cache:
            self.cache[s] = self.tok(s)
        return self.cache[s]

    def text(self, rng, n):
        src = self.src[self.names[rng.choice(len(self.names), p=self.p)]]
        a = int(rng.integers(0, src.size - n))
        return src[a:a + n]


def number(rng, digits):
    return str(int(rng.integers(10 ** (digits - 1), 10 ** digits)))


def passkey_tokens(enc, filler, rng, length):
    """Passkey prompt of about `length` tokens: intro, filler with the needle at a random depth, question.
    Returns (ids, answer_start, answer_end)."""
    k = number(rng, 5)
    intro, needle = enc(PASSKEY_INTRO), enc(PASSKEY_NEEDLE.format(k=k))
    q, ans = enc(PASSKEY_QUESTION), enc(" " + k + ".")
    n_fill = max(8, length - len(intro) - len(needle) - len(q) - len(ans))
    f = filler(n_fill)
    d = int(rng.integers(0, n_fill + 1))
    ids = intro + list(f[:d]) + needle + list(f[d:]) + q
    a0 = len(ids)
    ids += ans
    return ids, a0, a0 + len(ans) - 1  # the closing "." is not part of the answer


def kvlookup_tokens(enc, rng, n_pairs, n_queries):
    keys = []
    while len(keys) < n_pairs:
        k = number(rng, 4)
        if k not in keys:
            keys.append(k)
    vals = [number(rng, 4) for _ in keys]
    ids = enc(KV_INTRO)
    for k, v in zip(keys, vals):
        ids += enc(KV_LINE.format(k=k, v=v))
    spans = []
    for qi in rng.choice(n_pairs, size=n_queries, replace=n_queries > n_pairs):
        ids += enc(KV_QUESTION.format(k=keys[qi]))
        a = enc(" " + vals[qi] + ".")
        spans.append((len(ids), len(ids) + len(a) - 1))
        ids += a
    return ids, spans


KINDS = ["text", "copy", "passkey", "kvlookup", "rand"]


def rand_pairs(data, rng, T, lo, hi, bookgap):
    """The `rand` kind: T+1 tokens made of pairs [S][gap][S], S a span of lo..hi (log-uniform) token ids
    drawn uniformly from data.rand_vocab (the corpus's most frequent tokens), the gap empty (half the
    pairs) or 1..bookgap tokens of book text. Scored: every token of each second copy after its first
    (the first follows the gap and is not predictable)."""
    ids, score, ind = [], [], []
    while len(ids) < T + 1:
        L = int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))
        S = data.rand_vocab[rng.integers(0, data.rand_vocab.size, size=L)]
        G = 0 if rng.random() < 0.5 or bookgap <= 0 else int(rng.integers(1, bookgap + 1))
        gap = data.text(rng, G) if G else np.zeros(0, dtype=np.int64)
        s1 = len(ids)
        ids += list(S) + list(gap)
        score += [False] * (L + G)
        ids += list(S)
        score += [False] + [True] * (L - 1)
        ind += [(s1 + L + G + i, s1 + i + 1) for i in range(L - 1)]
    ids = np.asarray(ids[:T + 1], dtype=np.int64)
    return ids, np.asarray(score[1:T + 1], dtype=bool), induction(ind, T)  # target t = ids[t+1]


def induction(pairs, T):
    """(query, key) positions where an induction head should look: the query holds a token of a second
    copy, the key the token after the same token's first occurrence (what the query must predict)."""
    a = np.asarray([(q, k) for q, k in pairs if q < T], dtype=np.int64)
    return a.reshape(-1, 2)


def make_sequence(data, rng, T, mix):
    """One training sequence of T+1 tokens and a boolean mask of scored targets (target t = ids[t+1])."""
    kind = KINDS[rng.choice(len(KINDS), p=mix)]
    score = np.zeros(T, dtype=bool)
    bg = rng.random(T) < 0.25  # a random quarter of the other targets
    if kind == "text":
        return kind, data.text(rng, T + 1), rng.random(T) < data.text_frac, induction([], T)
    if kind == "rand":
        ids, sc, ind = rand_pairs(data, rng, T, data.rand_len[0], data.rand_len[1], data.rand_gap)
        return kind, ids, sc, ind
    if kind == "copy":
        w = data.text(rng, T + 1)
        hi = min(256, (T - 16) // 2)  # two copies must fit (T = 1024: 256)
        L = int(round(math.exp(rng.uniform(math.log(16), math.log(hi)))))
        G = int(rng.integers(0, min(512, T + 1 - 2 * L) + 1))
        s1 = int(rng.integers(0, T + 1 - 2 * L - G + 1))
        ids = np.concatenate([w[:s1 + L + G], w[s1:s1 + L], w[s1 + L + G:]])[:T + 1]
        s2 = s1 + L + G
        score[s2:s2 + L - 1] = True  # targets ids[s2+1 .. s2+L-1]: the copy after its first token
        return kind, ids, score | bg, induction([(s2 + i, s1 + i + 1) for i in range(L - 1)], T)
    if kind == "passkey":
        length = int(rng.integers(64, T - 8))
        ids, a0, a1 = passkey_tokens(data.enc, lambda n: data.text(rng, n), rng, length)
        spans = [(a0, a1)]
    else:
        n_pairs = int(rng.integers(4, 48))
        ids, spans = kvlookup_tokens(data.enc, rng, n_pairs, int(rng.integers(1, 8)))
    ids = list(ids)[:T + 1]
    if len(ids) < T + 1:
        ids += [EOT] + list(data.text(rng, T - len(ids)))
    for a0, a1 in spans:
        for p in range(a0, a1):
            if 1 <= p <= T:
                score[p - 1] = True
    return kind, np.asarray(ids, dtype=np.int64), score | bg, induction([], T)


def shape_at(step, a):
    """(batch, seq) of a step: --batch x --seq, but every --long-every-th step 1024-token sequences
    (batch scaled to the same number of tokens) so the copy mechanism is trained at every position."""
    if a.long_every > 0 and step % a.long_every == a.long_every - 1 and a.seq < a.long_seq:
        return max(1, a.batch * a.seq // a.long_seq), a.long_seq
    return a.batch, a.seq


def batch(data, seed, step, B, T, mix):
    xs, ms, kinds, inds = [], [], [], []
    for i in range(B):
        rng = np.random.default_rng([seed, step, i])
        kind, ids, m, ind = make_sequence(data, rng, T, mix)
        xs.append(ids)
        ms.append(m)
        kinds.append(kind)
        inds.append(np.concatenate([np.full((len(ind), 1), i, dtype=np.int64), ind], 1))
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ms)), kinds, torch.from_numpy(np.concatenate(inds))


# ---------------------------------------------------------------------------------------------------
# Measurements
@torch.no_grad()
def measure(model, data, corpus, wotw_ids, n_passages=4, plen=400):
    model.eval()
    out = {}
    # held-out repeated passage: [passage][passage], NLL/top-1 of each copy (targets 1..plen-1 of the
    # first, and the plen targets of the second)
    na = np.fromfile(os.path.join(corpus, "northanger.u16"), dtype="<u2").astype(np.int64)
    n1 = t1 = n2 = t2 = 0.0
    c1 = c2 = 0
    for j in range(n_passages):
        a = 5000 + j * (na.size - 10000) // n_passages
        p = na[a:a + plen]
        x = torch.from_numpy(np.concatenate([p, p]))[None]
        lg = model.logits(model.hidden(x))[0, :-1]
        y = x[0, 1:]
        nll = F.cross_entropy(lg, y, reduction="none")
        top = (lg.argmax(-1) == y).float()
        n1 += nll[:plen - 1].sum().item(); t1 += top[:plen - 1].sum().item(); c1 += plen - 1
        n2 += nll[plen - 1:].sum().item(); t2 += top[plen - 1:].sum().item(); c2 += plen
    out.update(copy1_nll=n1 / c1, copy1_top1=t1 / c1, copy2_nll=n2 / c2, copy2_top1=t2 / c2)
    # the same, at the far positions: 224 tokens of other Northanger text first, so the second copy
    # is at positions 624..1023
    n2 = t2 = 0.0
    c2 = 0
    for j in range(n_passages):
        a = 5000 + j * (na.size - 10000) // n_passages
        p = na[a:a + plen]
        pre = na[a - 1024 + 2 * plen:a] if 1024 - 2 * plen > 0 else na[:0]
        x = torch.from_numpy(np.concatenate([pre, p, p]))[None]
        lg = model.logits(model.hidden(x))[0, :-1]
        y = x[0, 1:]
        nll = F.cross_entropy(lg, y, reduction="none")[-plen:]
        n2 += nll.sum().item(); t2 += (lg.argmax(-1) == y).float()[-plen:].sum().item(); c2 += plen
    out.update(copy2far_nll=n2 / c2, copy2far_top1=t2 / c2)
    # passkey on held-out filler (Northanger Abbey), lengths 256..1024, exact match of the answer
    ok = tot = 0
    for j, length in enumerate([256, 512, 768, 1000] * 3):
        rng = np.random.default_rng([99, j])
        ids, a0, a1 = passkey_tokens(data.enc, lambda n: na[(s := int(rng.integers(0, na.size - n))):s + n],
                                     rng, length)
        x = torch.tensor(ids[:a1])[None]
        pred = model.logits(model.hidden(x))[0].argmax(-1)
        ok += int(all(pred[p - 1].item() == ids[p] for p in range(a0, a1)))
        tot += 1
    out["passkey_acc"] = ok / tot
    # The War of the Worlds: teacher-forced NLL of its first tokens, 1024-token chunks
    if wotw_ids is not None and wotw_ids.size > 1:
        s = c = 0.0
        for a in range(0, wotw_ids.size - 1, 1024):
            x = torch.from_numpy(wotw_ids[a:a + 1024])[None]
            if x.shape[1] < 2:
                break
            lg = model.logits(model.hidden(x))[0, :-1]
            s += F.cross_entropy(lg, x[0, 1:], reduction="sum").item()
            c += x.shape[1] - 1
        out["wotw_nll"] = s / c
        out["wotw_ppl"] = math.exp(s / c)
    model.train()
    return out


def train_prev_head(m, data, T, steps, rng_of, offsets=(1,)):
    """Make layer 0 head j attend to t - offsets[j] (head 0: the previous token; with a two-token match head 1
    also the one before it): Adam (lr 6e-3) on the position embeddings and layer 0's c_attn, layer 0 alone on
    two T-token windows of book text per step (rng_of(step) draws them), loss the sum over the heads of
    -log(attention on t - offset). Returns the final attention of head 0 on t-1 (of each head, for several)."""
    opt = torch.optim.Adam([m.wpe, m.h[0].c_attn_w, m.h[0].c_attn_b], lr=6e-3)
    keep, m.h[0].keep = m.h[0].keep, list(range(len(offsets)))
    for step in range(steps):
        rng = rng_of(step)
        x = torch.from_numpy(np.stack([data.text(rng, T) for _ in range(2)]))
        m.h[0](m.wte[x] + m.wpe[:T], m.mask)
        loss = 0.0
        for j, o in enumerate(offsets):
            t = torch.arange(o, T)
            loss = loss - m.h[0].kept[:, j][:, t, t - o].clamp_min(1e-6).log().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    got = [m.h[0].kept[:, j][:, torch.arange(o, T), torch.arange(o, T) - o].mean().item() for j, o in enumerate(offsets)]
    m.h[0].keep = keep
    return got[0] if len(offsets) == 1 else got


def circuit_init(m, data, n_ind, q_scale, o_scale, seed, code=None, match=1, rarity=0.0, ov_rand=0, answer=None):
    """Hand-set a copy circuit into a model (--circuit-init; docs/fidelity.md, third and fourth attempts), so
    training starts past the plateau in which a small model on little data stays (K-composition):
      * layout of the residual: token embeddings in dimensions 0..C-R-1, C-64..C-33 left free for the
        previous token, the sinusoidal position code in C-32..C-1 (no other dimension of wpe), R = 64;
      * layer 0 head 0 attends to t-1: Adam steps on book text train its query/key and the position
        code (gradients outside the code's dimensions masked, so positions never leak into the
        token dimensions the induction heads read);
      * its value is a random 32-column projection P of the token dimensions (columns centred, so
        LayerNorm's mean subtraction cancels), and its output writes P's values into the free dimensions;
        nothing else of layer 0 writes there;
      * layer 1 heads 0..n_ind-1 are induction heads: query q_scale * P of the current token, key the
        free dimensions (the previous token's P), so the score peaks where the previous token equals the
        current one; value an own random projection of the token dimensions and output its transpose
        times o_scale, so the attended token's embedding direction is added to the residual and the tied
        head raises that token's logit.
    code = (amplitude, query gain, head-0 output gain, key gain), for a --widen model, whose layer 0 rewrites the
    token dimensions (gpt2-tiny-wt: residual std 0.05 per dimension in, 1.3 out), so that a projection of
    them at layer 1 no longer matches the one layer 0 copied: R = 96, and C-96..C-65 hold a fixed random
    code of each token (its wte columns: sixteen +amplitude and sixteen -amplitude entries times the rms
    of its embedding, so that LayerNorm 0 gives every token's code about the same size), which nothing
    writes to. Head 0's value reads the code, its output (times the head-0 gain) writes it into the free
    dimensions; the induction heads' query is the centred code (times the query gain), their key the
    centred free dimensions (times the key gain); their value and output come from copy_ov(). The final LayerNorm's gain is 0 on the reserved dimensions
    (the tied head would otherwise read the code). The old position embeddings stay in the token
    dimensions: the old model reads them.
    match = 2 (--circuit-match 2, with a code; --widen 4): a two-token match. R = 128: the token's code, the
    previous token's (layer 0 head 0), the one before it (head 1, trained onto t-2 with head 0) and the
    position code. The induction query reads the current and the previous token's codes, the key the
    previous and the one-before's, the second pair through a random rotation (so that equal tokens in the
    crossed pairs do not match); each pair's gains are scaled by the measured sizes of the codes at layer
    1, so both matches weigh the same. Meant to fire only where two tokens in a row repeat; measured
    (docs/fidelity.md, fifth attempt), it copies better but does not quiet the heads on ordinary text (two
    codes add two codes' noise) and finds no passkey.
    rarity > 0 (--circuit-rarity): a token whose share of the training sources is above `rarity` gets a
    code sqrt(rarity / share) times smaller, so matches on frequent words score less. ov_rand: copy_ov()'s
    n_rand.
    answer = (size, gain, boost) (--circuit-answer, with a code and match 1; docs/fidelity.md, sixth attempt):
    the induction heads sit in the *last* layer and copy through an answer code of their own instead of
    copy_ov()'s map. R = 96 + 32 * n_ind: after the token's and the previous token's codes come n_ind blocks
    of 32 dimensions in which every token's wte row holds a fixed balanced +-size code (size small, so the
    token's own code barely reaches the logits); head h's value reads block h at the key's position (the
    token to copy) and its output writes it back `gain` times larger; the final LayerNorm's gain on the
    blocks is set so that a full match raises the copied token's logit by `boost` nats through the tied
    head (the inner product of the two codes), and is 0 on the other reserved dimensions as before. No
    layer reads what the heads write before the logits do, so the copy costs the text only where the
    heads match wrongly."""
    C = m.wpe.shape[1]
    H = C // m.h[0].NH
    n_ans = 32 * n_ind if answer else 0
    R = 64 if code is None else 32 * (2 + match) + n_ans
    g = torch.Generator().manual_seed(seed)
    top = 32 * (2 + match) + n_ans  # the layout's first reserved dimension is C - top (without a code, no token code)
    tok, cur, pos = slice(0, C - R), slice(C - top, C - top + 32), slice(C - 32, C)
    prevs = [slice(C - top + 32 * (j + 1), C - top + 32 * (j + 2)) for j in range(match)]  # layer 0 head j writes
    free = prevs[0]
    answer_dims = slice(C - top + 32 * (1 + match), C - 32)  # n_ans dimensions before the position code
    ans = [slice(answer_dims.start + 32 * h, answer_dims.start + 32 * (h + 1)) for h in range(n_ind if answer else 0)]
    L_ind = len(m.h) - 1 if answer else 1  # the induction heads' layer
    with torch.no_grad():
        m.wte[:, C - R:] = 0
        m.wpe[:, C - R:] = 0
        if code is None:
            m.wpe.zero_()
        else:
            rms = m.wte[:, tok].pow(2).mean(1, keepdim=True).sqrt()  # so LayerNorm 0 gives every token's code ~code[0]
            signs = balanced_signs(m.wte.shape[0], g)  # the code sums to 0 (see centre below)
            if rarity > 0:  # frequent tokens' codes smaller: their matches (most false ones) score less
                c = data.token_counts(m.wte.shape[0]).astype(np.float64)
                f = torch.from_numpy(c / c.sum()).float().clamp_min(1e-12)[:, None]
                rms = rms * (rarity / f).sqrt().clamp(max=1.0)
            m.wte[:, cur] = code[0] * rms * signs
            if answer:  # drawn now, written after the previous-token head's training (whose LayerNorm it would change)
                ans_code = torch.cat([balanced_signs(m.wte.shape[0], g) for _ in ans], 1) * answer[0]
            m.ln_f.weight[C - R:] = 0
            m.ln_f.bias[C - R:] = 0
        m.wpe[:, pos] = 0.028 * sinusoid(m.wpe.shape[0], 32)
    mask = torch.zeros(1, C)
    mask[:, pos] = 1
    hook = m.wpe.register_hook(lambda grad: grad * mask)
    # every position: the head must find t-1 wherever training puts a token
    prev = train_prev_head(m, data, m.wpe.shape[0], 60 if code is None else 120,
                           lambda step: np.random.default_rng([seed, 10**6 + step]), tuple(range(1, match + 1)))
    hook.remove()
    if answer:
        with torch.no_grad():
            m.wte[:, answer_dims] = ans_code

    def projection():  # [C, H]: random on the token dimensions, columns centred, zero elsewhere
        p = torch.zeros(C, H)
        p[tok] = torch.randn(C - R, H, generator=g) * 0.02
        p[tok] -= p[tok].mean(0)
        return p

    centre = torch.eye(H) - 1.0 / H
    with torch.no_grad():
        b0, b1 = m.h[0], m.h[L_ind]
        if code is None:
            P = projection()
        else:  # the centring matrix: LayerNorm's mean subtraction adds the residual's mean to every reserved
            # dimension, as large as the small code itself; the code sums to 0, so centring removes just that
            P = torch.zeros(C, H)
            P[cur] = centre
        b0.c_proj_w[:, C - R:] = 0
        b0.c_proj_b[C - R:] = 0
        b0.fc_proj_w[:, C - R:] = 0
        b0.fc_proj_b[C - R:] = 0
        for j in range(match):  # head j copies the code of the token at t-1-j into prevs[j]
            b0.c_attn_w[:, 2 * C + j * H:2 * C + (j + 1) * H] = P
            b0.c_attn_b[2 * C + j * H:2 * C + (j + 1) * H] = 0
            b0.c_proj_w[j * H:(j + 1) * H] = 0
            b0.c_proj_w[j * H:(j + 1) * H, prevs[j]] = torch.eye(H) * (1.0 if code is None else code[2])
        if match > 1:  # the second pair's rotation and the codes' sizes at layer 1 (book text)
            rot = torch.linalg.qr(torch.randn(H, H, generator=g))[0]
            rng = np.random.default_rng([seed, 3 * 10**6])
            x = torch.from_numpy(np.stack([data.text(rng, 512) for _ in range(4)]))
            a1 = b1.ln_1(b0(m.wte[x] + m.wpe[:512], m.mask)).reshape(-1, C)
            size = [a1[:, d] @ centre for d in [cur] + prevs]  # centred, as the query and key read them
            size = [v.pow(2).mean().sqrt().item() for v in size]
        if answer:  # residual size per dimension in front of the heads' layer and of the final LayerNorm
            rng = np.random.default_rng([seed, 4 * 10**6])
            x = torch.from_numpy(np.stack([data.text(rng, 512) for _ in range(2)]))
            hs = m.wte[x] + m.wpe[:512]
            for i, b in enumerate(m.h):
                if i == L_ind:
                    size_in = hs.std(-1).mean().item()
                hs = b(hs, m.mask)
            size_final = hs.std(-1).mean().item()
        elif code is not None:
            Vs, Os = copy_ov(m, data, n_ind * H, C - R, seed, n_rand=ov_rand)
        for h in range(n_ind):
            q, k, v = slice(h * H, (h + 1) * H), slice(C + h * H, C + (h + 1) * H), slice(2 * C + h * H, 2 * C + (h + 1) * H)
            b1.c_attn_w[:, q] = q_scale * P if code is None else code[1] * P
            b1.c_attn_w[:, k] = 0
            b1.c_attn_w[free, k] = torch.eye(H) if code is None else centre * code[3]
            if match > 1:  # previous token (query) against the token two back (key), as large as the first pair
                b1.c_attn_w[prevs[0], q] = code[1] * size[0] / size[1] * centre @ rot
                b1.c_attn_w[prevs[1], k] = code[3] * size[1] / size[2] * centre @ rot
            b1.c_attn_b[q] = 0
            b1.c_attn_b[k] = 0
            if answer:  # value: the centred answer block h (LayerNorm adds the residual's mean; the block sums to 0)
                V, O = torch.zeros(C, H), torch.zeros(H, C)
                V[ans[h]] = centre
                O[:, ans[h]] = torch.eye(H) * answer[1] * size_in  # undoes LayerNorm's 1 / size: writes gain x size
            elif code is None:
                V = projection()
                O = V.t() * o_scale
            else:
                V, O = Vs[:, h * H:(h + 1) * H], Os[h * H:(h + 1) * H] * o_scale
            b1.c_attn_w[:, v] = V
            b1.c_attn_b[v] = 0
            b1.c_proj_w[h * H:(h + 1) * H] = O
        if answer:  # logit of the copied token: gain * size^2 * n_ans * (final gain) / size_final = boost
            m.ln_f.weight[answer_dims] = answer[2] * size_final / (answer[1] * answer[0] ** 2 * n_ans)

    # What --circuit-pin can hold fixed during training: "layout" — no token embedding and nothing of layer
    # 0 but the previous-token head in the reserved dimensions (with a code: the code), the position code,
    # the final LayerNorm's zeros; "attn" — also the
    # previous-token head, the LayerNorms in front of layers 0 and 1 and the induction heads' queries and
    # keys; "all" — also the induction heads' values and outputs. Entries: (parameter, boolean mask of the
    # pinned entries; None: all of it).
    def mask_of(p, *index):
        mk = torch.zeros_like(p, dtype=torch.bool)
        mk[index] = True
        return mk
    b0, b1 = m.h[0], m.h[L_ind]
    qk0 = torch.zeros(3 * C, dtype=torch.bool)
    for part in range(3):
        qk0[part * C:part * C + match * H] = True
    qk1 = torch.zeros(3 * C, dtype=torch.bool)
    for h in range(n_ind):
        qk1[h * H:(h + 1) * H] = True
        qk1[C + h * H:C + (h + 1) * H] = True
    ov1 = torch.zeros(3 * C, dtype=torch.bool)
    for h in range(n_ind):
        ov1[2 * C + h * H:2 * C + (h + 1) * H] = True
    layout = [(m.wte, mask_of(m.wte, slice(None), slice(C - R, None))), (m.wpe, torch.ones_like(m.wpe, dtype=torch.bool)),
              (b0.c_proj_w, mask_of(b0.c_proj_w, slice(match * H, None), slice(C - R, None))),
              (b0.c_proj_b, mask_of(b0.c_proj_b, slice(C - R, None))),
              (b0.fc_proj_w, mask_of(b0.fc_proj_w, slice(None), slice(C - R, None))),
              (b0.fc_proj_b, mask_of(b0.fc_proj_b, slice(C - R, None)))]
    if answer:  # every layer's writes into the reserved dimensions but the circuit's heads' (the last layer's heads
        # read them through query gains of ~1000 and the final LayerNorm's answer gain: a small write is a big change)
        for i, b in enumerate(m.h[1:], 1):
            first = n_ind * H if i == L_ind else 0
            layout += [(b.c_proj_w, mask_of(b.c_proj_w, slice(first, None), slice(C - R, None))),
                       (b.c_proj_b, mask_of(b.c_proj_b, slice(C - R, None))),
                       (b.fc_proj_w, mask_of(b.fc_proj_w, slice(None), slice(C - R, None))),
                       (b.fc_proj_b, mask_of(b.fc_proj_b, slice(C - R, None)))]
    if code is not None:
        layout += [(m.ln_f.weight, mask_of(m.ln_f.weight, slice(C - R, None))),
                   (m.ln_f.bias, mask_of(m.ln_f.bias, slice(C - R, None)))]
    attn = [(b0.c_attn_w, qk0[None].expand(C, -1).clone()), (b0.c_attn_b, qk0.clone()),
            (b0.c_proj_w, mask_of(b0.c_proj_w, slice(0, match * H))),
            (b0.ln_1.weight, None), (b0.ln_1.bias, None), (b1.ln_1.weight, None), (b1.ln_1.bias, None),  # b1: L_ind's
            (b1.c_attn_w, qk1[None].expand(C, -1).clone()), (b1.c_attn_b, qk1.clone())]
    ov = [(b1.c_attn_w, ov1[None].expand(C, -1).clone()), (b1.c_attn_b, ov1.clone()),
          (b1.c_proj_w, mask_of(b1.c_proj_w, slice(0, n_ind * H)))]
    return prev, {"layout": layout, "attn": layout + attn, "all": layout + attn + ov}


def balanced_signs(n, g):
    """n rows of 32 entries, sixteen +1 and sixteen -1 each in a random order (g): a code that sums to 0."""
    signs = torch.ones(n, 32)
    signs[:, 16:] = -1
    return torch.gather(signs, 1, torch.argsort(torch.rand(n, 32, generator=g), 1))


def copy_ov(m, data, rank, n_tok, seed, n_seq=8, T=512, n_rand=0):
    """The induction heads' value and output for a --widen model (circuit_init() with a code): the best
    rank-`rank` linear map from layer 1's LayerNorm-ed input at a position to the embedding of the token
    there (reduced-rank ridge regression on n_seq x T positions of book text; every token's target
    scaled to unit rms, so frequent tokens do not dominate). Added to the residual of the query that
    attends there, it raises that token's logit through the tied head. Returns V [C, rank] (reads the
    token dimensions 0..n_tok-1) and O [rank, C] (writes them). n_rand more sequences of ids drawn uniformly
    from the whole vocabulary make the map copy tokens that book text rarely has (numbers, names)."""
    C = m.wpe.shape[1]
    rng = np.random.default_rng([seed, 2 * 10**6])
    x = torch.from_numpy(np.stack([data.text(rng, T) for _ in range(n_seq)]
                                  + [rng.integers(0, EOT, T) for _ in range(n_rand)]))
    with torch.no_grad():
        h = m.h[0](m.wte[x] + m.wpe[:T], m.mask)
        a = m.h[1].ln_1(h).reshape(-1, C)[:, :n_tok].double()  # [N, n_tok]
        y = m.wte[x.reshape(-1), :n_tok].double()
        y = y / y.pow(2).mean(1, keepdim=True).sqrt()
        w = torch.linalg.solve(a.t() @ a + 1e-2 * a.shape[0] * torch.eye(n_tok, dtype=torch.float64), a.t() @ y)
        _, _, vt = torch.linalg.svd(a @ w, full_matrices=False)  # the fitted outputs' main directions
        vr = vt[:rank].t()  # [n_tok, rank]
        V = torch.zeros(C, rank)
        O = torch.zeros(rank, C)
        V[:n_tok] = (w @ vr).float()
        O[:, :n_tok] = vr.t().float()
    return V, O


class Pins:
    """Entries of parameters held at their values: restored after every optimizer step (so neither the
    gradients nor AdamW's weight decay move them)."""

    def __init__(self, pins):
        self.pins = [(p, mk, p.detach().clone()) for p, mk in pins]

    def restore(self):
        with torch.no_grad():
            for p, mk, v in self.pins:
                if mk is None:
                    p.copy_(v)
                else:
                    p[mk] = v[mk]


def lr_at(step, a):
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    f = (step - a.warmup) / max(1, a.steps - a.prev_warm - a.ind_warm - a.warmup)
    return a.min_lr + 0.5 * (a.lr - a.min_lr) * (1 + math.cos(math.pi * min(1.0, f)))


def export(model, cfg, init_dir, out_dir):
    import shutil
    os.makedirs(out_dir, exist_ok=True)
    write_safetensors(os.path.join(out_dir, "model.safetensors"), model.hf_state())
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    for fn in ("vocab.json", "merges.txt"):
        shutil.copyfile(os.path.join(init_dir, fn), os.path.join(out_dir, fn))


# Options that do not change what a run computes (where it reads and writes, how far it goes this time, how
# often it reports): a checkpoint made with different values of the others is refused on resume.
NOT_RECIPE = {"run", "corpus", "init", "tokenizer", "kvhost", "eval_text", "eval_tokens", "stop_at", "threads",
              "ckpt_minutes", "eval_every", "export", "no_init_measure", "measure_init"}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="run directory: ckpt.pt, log.txt, eval.jsonl")
    ap.add_argument("--corpus", default="/work/fidelity-run/corpus", help="make_corpus.py's output")
    ap.add_argument("--init", default=os.path.join(SHARED, "models", "gpt2-tiny-wt"))
    ap.add_argument("--scratch", action="store_true", help="a new model of --init's shape (GPT-2's initialization) "
                    "instead of --init's weights")
    ap.add_argument("--wpe-init", choices=["normal", "sin"], default="normal",
                    help="position embeddings: as loaded / GPT-2's noise (--scratch), or with a sinusoidal code "
                    "(replacing the noise of --scratch, added to loaded ones)")
    ap.add_argument("--circuit-init", type=int, default=0, help="with --scratch or --widen: hand-set a previous-token head "
                    "(0.0) and this many induction heads (1.0, 1.1, ...) before training (circuit_init())")
    ap.add_argument("--widen", type=int, default=0, help="start from --init made this many heads wider (widen(): "
                    "same function, new residual dimensions for --circuit-init's layout; needs --circuit-init <= N)")
    ap.add_argument("--circuit-code", default="0.1,400,0.1,130", help="--widen with --circuit-init: the token code's "
                    "amplitude (relative to the token's embedding), the induction heads' query gain, head 0's output "
                    "gain and the induction heads' key gain (circuit_init())")
    ap.add_argument("--circuit-match", type=int, choices=[1, 2], default=1, help="--widen with --circuit-init: "
                    "how many tokens in a row the induction heads match (2 needs --widen 4: circuit_init())")
    ap.add_argument("--circuit-rarity", type=float, default=0.0, help="--widen with --circuit-init: tokens more "
                    "frequent than this share of the corpus get a code sqrt(share / this) times smaller (0: off)")
    ap.add_argument("--circuit-ov-rand", type=int, default=0, help="--widen with --circuit-init: also fit the "
                    "induction heads' value/output on this many sequences of random ids (copy_ov(); 0: book text only)")
    ap.add_argument("--circuit-answer", default="", help="--widen with --circuit-init: size,gain,boost: the induction "
                    "heads in the last layer, copying through an answer code of their own (circuit_init(); needs "
                    "--widen 3 + --circuit-init; empty: layer 1 and copy_ov())")
    ap.add_argument("--distill", type=float, default=0.0, help="weight of KL(--init's model || this one) on the "
                    "text sequences' scored targets: keeps the book function of the model it started from")
    ap.add_argument("--circuit-pin", choices=["none", "layout", "attn", "all"], default="none",
                    help="--circuit-init: what of the circuit training may not move (circuit_init())")
    ap.add_argument("--circuit-q", type=float, default=15.0, help="--circuit-init: query scale of the induction heads")
    ap.add_argument("--circuit-o", type=float, default=50.0, help="--circuit-init: output scale of the induction heads")
    ap.add_argument("--sin-amp", type=float, default=0.028, help="amplitude of --wpe-init sin's code")
    ap.add_argument("--tokenizer", default=os.path.join(SHARED, "data", "gpt2-tokenizer"))
    ap.add_argument("--kvhost", help="tokenize with this kvhost binary instead of transformers")
    ap.add_argument("--eval-text", default=os.path.join(SHARED, "data", "books", "war-of-the-worlds.txt"),
                    help="measured (first --eval-tokens tokens), never trained on")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=600, help="length of the schedule (warmup + cosine decay)")
    ap.add_argument("--stop-at", type=int, default=0, help="stop after this step (0: --steps); the schedule "
                    "stays that of --steps, so an intermediate model is reproducible")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--min-lr", type=float, default=6e-5)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--mix", default="0.35,0.35,0.15,0.15", help="shares of text,copy,passkey,kvlookup[,rand]")
    ap.add_argument("--text-frac", type=float, default=0.5, help="share of a text sequence's targets scored")
    ap.add_argument("--rand-vocab", type=int, default=8192, help="rand kind: alphabet = this many most frequent ids")
    ap.add_argument("--rand-len", default="8,128", help="rand kind: span length range (log-uniform)")
    ap.add_argument("--rand-gap", type=int, default=0, help="rand kind: up to this many book tokens between copies")
    ap.add_argument("--train-params", choices=["all", "attn", "attn+wpe"], default="all",
                    help="attn: train only the attention weights (c_attn, c_proj of every block); attn+wpe: and "
                    "the position embeddings (gpt2-tiny-wt's are nearly random: no head can find t-1 with them)")
    ap.add_argument("--prev-head", default="", help="L.H: auxiliary loss making layer L head H attend to t-1")
    ap.add_argument("--ind-heads", default="", help="L.H,...: auxiliary loss making these heads attend, from a "
                    "token of a second copy (copy and rand kinds), to the token after its first occurrence")
    ap.add_argument("--fast-lr-mult", type=float, default=1.0, help="learning-rate multiplier of the position "
                    "embeddings and layer 0's attention (where the previous-token head must form)")
    ap.add_argument("--prev-warm", type=int, default=0, help="first N steps: train only --prev-head's attention "
                    "to t-1 (position embeddings and layer 0-L attention, --prev-warm-lr; layers above untouched)")
    ap.add_argument("--prev-warm-lr", type=float, default=6e-3)
    ap.add_argument("--ind-warm", type=int, default=0, help="after --prev-warm, N steps that train only the "
                    "--ind-heads' attention to their targets on rand sequences (layers up to theirs, no LM head)")
    ap.add_argument("--ind-warm-lr", type=float, default=3e-3)
    ap.add_argument("--ind-warm-seq", type=int, default=0, help="--ind-warm's sequence length (0: --seq)")
    ap.add_argument("--ind-warm-vocab", type=int, default=0, help="--ind-warm's alphabet: every k-th id of the rand "
                    "alphabet, k chosen to leave this many (0: the whole alphabet); a small one leaves the plateau sooner")
    ap.add_argument("--aux-weight", type=float, default=1.0, help="weight of the auxiliary attention losses")
    ap.add_argument("--long-every", type=int, default=0, help="every N-th step uses --long-seq sequences (0: never)")
    ap.add_argument("--long-seq", type=int, default=1024)
    ap.add_argument("--sources", default="austen:0.5,moby:0.2,kjv:0.3", help="book sampling weights")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--bf16", type=int, default=1, help="bfloat16 autocast for the matmuls (fp32 master weights)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ckpt-minutes", type=float, default=5.0)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--export", help="write the HF-layout model here from the run's checkpoint and stop")
    ap.add_argument("--no-init-measure", action="store_true", help="do not measure the initial model (known)")
    ap.add_argument("--measure-init", action="store_true", help="measure the initial model and stop")
    a = ap.parse_args()
    code = answer = None
    if a.widen:  # checked before anything is written into --run
        if a.scratch or a.circuit_init > a.widen:
            sys.exit("train.py: --widen N starts from --init's weights (no --scratch) and has N new heads per "
                     f"layer for --circuit-init's induction heads (got --circuit-init {a.circuit_init})")
        try:
            code = tuple(float(v) for v in a.circuit_code.split(","))
        except ValueError:
            code = ()
        if len(code) != 4:
            sys.exit(f"train.py: --circuit-code wants four numbers a,q,h,k (got {a.circuit_code!r})")
        if not 0 <= a.circuit_rarity < 1 or a.circuit_ov_rand < 0:
            sys.exit(f"train.py: --circuit-rarity is a share of the corpus in [0, 1) and --circuit-ov-rand a count >= 0 "
                     f"(got {a.circuit_rarity}, {a.circuit_ov_rand})")
        if a.widen < 2 + a.circuit_match:
            sys.exit(f"train.py: --circuit-match {a.circuit_match} reserves {2 + a.circuit_match} heads' dimensions: "
                     f"it needs --widen {2 + a.circuit_match} or more (got --widen {a.widen})")
        if a.circuit_answer:
            try:
                answer = tuple(float(v) for v in a.circuit_answer.split(","))
            except ValueError:
                answer = ()
            if len(answer) != 3 or min(answer) <= 0:
                sys.exit(f"train.py: --circuit-answer wants three positive numbers size,gain,boost (got {a.circuit_answer!r})")
            if a.circuit_match != 1 or a.widen < 3 + a.circuit_init:
                sys.exit(f"train.py: --circuit-answer reserves 3 + --circuit-init heads' dimensions (one answer block "
                         f"per induction head) with --circuit-match 1: it needs --widen {3 + a.circuit_init} or more "
                         f"(got --widen {a.widen}, --circuit-match {a.circuit_match})")
    if a.circuit_answer and not (a.widen and a.circuit_init):
        sys.exit("train.py: --circuit-answer sets the induction heads of --circuit-init into the dimensions of --widen: "
                 "it needs both")

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    os.makedirs(a.run, exist_ok=True)
    ckpt_path = os.path.join(a.run, "ckpt.pt")
    log = open(os.path.join(a.run, "log.txt"), "a")

    def say(msg):
        line = time.strftime("%H:%M:%S ") + msg
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()

    model, cfg = load_model(a.init, a.scratch, a.wpe_init, a.sin_amp)
    teacher = None
    if a.distill > 0 and not a.export:  # an export reads the weights only
        teacher, _ = load_model(a.init)
        teacher.requires_grad_(False)
    if a.widen:
        model, cfg = widen(model, cfg, a.widen, a.seed)
    tok = Tok(a.tokenizer, a.kvhost)
    data = Data(a.corpus, tok, {k: float(v) for k, v in (s.split(":") for s in a.sources.split(","))})
    mix = np.array([float(x) for x in a.mix.split(",")] + [0.0] * (len(KINDS) - len(a.mix.split(","))))
    mix /= mix.sum()
    data.text_frac = a.text_frac
    data.rand_len = tuple(int(x) for x in a.rand_len.split(","))
    data.rand_gap = a.rand_gap
    if mix[KINDS.index("rand")] > 0:
        data.set_rand_vocab(a.rand_vocab)
    wotw = None
    if a.eval_text and os.path.exists(a.eval_text):
        wotw = np.asarray(tok(open(a.eval_text, encoding="utf-8").read())[:a.eval_tokens], dtype=np.int64)

    if a.train_params != "all":  # attention (+ positions): token embeddings, MLPs, LayerNorms stay gpt2-tiny-wt's
        for n, p in model.named_parameters():
            p.requires_grad_(".c_attn_" in n or ".c_proj_" in n or (n == "wpe" and a.train_params == "attn+wpe"))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    def heads(spec):  # "L.H,L.H" -> [(L, H)]
        return [tuple(int(v) for v in x.split(".")) for x in spec.split(",") if x]
    prev_head = heads(a.prev_head)[0] if a.prev_head else None
    ind_heads = heads(a.ind_heads)
    keep = {}
    for l, hh in ([prev_head] if prev_head else []) + ind_heads:
        keep.setdefault(l, []).append(hh)
    for l, hs in keep.items():
        model.h[l].keep = hs
    fast = [p for n, p in trainable if n == "wpe" or n.startswith("h.0.c_attn")]  # --fast-lr-mult
    decay = [p for n, p in trainable if p.dim() >= 2 and not any(p is f for f in fast)]
    nodecay = [p for n, p in trainable if p.dim() < 2 and not any(p is f for f in fast)]
    groups = [{"params": decay, "weight_decay": a.wd, "mult": 1.0}, {"params": nodecay, "weight_decay": 0.0, "mult": 1.0}]
    if a.ind_warm > 0:  # stage 1's parameters: positions, layer 0's attention, the induction heads' layers' attention
        names = ["h.0.c_proj"] + [f"h.{l}.{w}" for l, _ in ind_heads for w in ("c_attn", "ln_1")]
        s1 = [p for n, p in model.named_parameters() if any(n.startswith(x) for x in names)
              and not any(p is f for f in fast)]
        for p in s1:
            p.requires_grad_(True)
        for g in groups:
            g["params"] = [p for p in g["params"] if not any(p is q for q in s1)]
        groups.append({"params": s1, "weight_decay": 0.0, "mult": 1.0, "stage1": True})
        trainable += [(n, p) for n, p in model.named_parameters() if any(p is q for q in s1)
                      and not any(p is q for _, q in trainable)]
    if a.fast_lr_mult != 1.0 or a.prev_warm > 0:
        groups.append({"params": fast, "weight_decay": 0.0, "mult": a.fast_lr_mult, "fast": True, "stage1": True})
    else:
        groups[0]["params"] += [p for p in fast if p.dim() >= 2]
        groups[1]["params"] += [p for p in fast if p.dim() < 2]
    opt = torch.optim.AdamW(groups, lr=a.lr, betas=(0.9, 0.95), eps=1e-8)
    step = 0
    pins = None
    def save_ckpt():
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "recipe": recipe},
                   ckpt_path + ".tmp")
        os.replace(ckpt_path + ".tmp", ckpt_path)
        say(f"checkpoint step {step}")

    # (also when resuming: the pinned values come back from the checkpoint; an export of a checkpoint needs
    # its weights only, not a circuit built to be overwritten by them)
    if a.circuit_init and not (a.export and os.path.exists(ckpt_path)):
        prev, pin_sets = circuit_init(model, data, a.circuit_init, a.circuit_q, a.circuit_o, a.seed, code,
                                      a.circuit_match, a.circuit_rarity, a.circuit_ov_rand, answer)
        if a.circuit_match == 1:
            li = len(model.h) - 1 if answer else 1
            say(f"circuit-init: previous-token head 0.0 on t-1 {prev:.3f}, induction heads {li}.0..{li}.{a.circuit_init - 1}"
                + (" with answer codes" if answer else ""))
        else:
            say(f"circuit-init: heads 0.0 / 0.1 on t-1 / t-2 {prev[0]:.3f} / {prev[1]:.3f}, two-token induction heads "
                f"1.0..1.{a.circuit_init - 1}")
        if a.circuit_pin != "none":
            pins = pin_sets[a.circuit_pin]
    # what makes the run the run it is: every option but where it goes, how far and how often it reports
    recipe = {k: v for k, v in vars(a).items() if k not in NOT_RECIPE}
    if os.path.exists(ckpt_path):
        ck = torch.load(ckpt_path)
        if "recipe" in ck and ck["recipe"] != recipe:  # (checkpoints older than this check have none)
            old = ck["recipe"]
            diff = sorted(k for k in set(old) | set(recipe) if old.get(k) != recipe.get(k))
            said = "; ".join(f"--{k.replace('_', '-')} {old.get(k)!r} there, {recipe.get(k)!r} now" for k in diff)
            sys.exit(f"train.py: {ckpt_path} was made with other options ({said}): resuming would mix two runs; "
                     "use another --run directory")
        model.load_state_dict(ck["model"])
        if not a.export:  # the export needs the weights only (and no --train-params that match the run's)
            opt.load_state_dict(ck["opt"])
        step = ck["step"]
        say(f"resumed from {ckpt_path} at step {step}")
    if pins is not None:
        pins = Pins(pins)  # the values to hold: the model's, after a resume the checkpoint's

    if a.export:
        export(model, cfg, a.init, a.export)
        say(f"exported step {step} to {a.export}")
        return
    if a.measure_init or (step == 0 and a.eval_every > 0 and not a.no_init_measure):
        m = measure(model, data, a.corpus, wotw)
        rec = {"step": step, **m}
        say("measure " + json.dumps(rec))
        if step == 0:
            with open(os.path.join(a.run, "eval.jsonl"), "a") as f:
                f.write(json.dumps(rec) + "\n")
        if a.measure_init:
            return

    say(f"config {json.dumps(vars(a), sort_keys=True)}")
    model.train()
    t_ck = time.time()
    t0 = time.time()
    ntok = 0
    run_loss = {}
    stop = a.stop_at if a.stop_at > 0 else a.steps
    while step < stop:
        if step < a.prev_warm:  # stage 0: only the previous-token head (layer 0 alone, no LM head: cheap)
            rng = np.random.default_rng([a.seed, step, 0])
            T = a.long_seq
            x = torch.from_numpy(np.stack([data.text(rng, T) for _ in range(2)]))
            for g in opt.param_groups:
                g["lr"] = a.prev_warm_lr if g.get("fast") else 0.0
            l, hh = prev_head
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(a.bf16)):
                hx = model.wte[x] + model.wpe[:T]
                for b in model.h[:l + 1]:
                    hx = b(hx, model.mask)
            att = model.h[l].kept[:, keep[l].index(hh)].float()
            t = torch.arange(1, T)
            loss = -att[:, t, t - 1].clamp_min(1e-6).log().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % 10 == 0 or step == a.prev_warm:
                say(f"step {step} (previous-token stage) aux-prev {loss.item():.4f} "
                    f"attention on t-1 {att[:, t, t - 1].mean().item():.3f}")
            continue
        if step < a.prev_warm + a.ind_warm:  # stage 1: only the induction heads' attention (and the previous-token
            # head's), on rand sequences, layers 0..the highest induction head alone (no LM head)
            T = a.ind_warm_seq or a.seq
            alphabet = data.rand_vocab
            if a.ind_warm_vocab:
                data.rand_vocab = alphabet[::max(1, alphabet.size // a.ind_warm_vocab)][:a.ind_warm_vocab]
            xs, inds = [], []
            for i in range(4):
                rng = np.random.default_rng([a.seed, step, i])
                ids, _, ii = rand_pairs(data, rng, T, data.rand_len[0], min(data.rand_len[1], T // 3), data.rand_gap)
                xs.append(ids[:T])
                inds.append(np.concatenate([np.full((len(ii), 1), i, dtype=np.int64), ii], 1))
            data.rand_vocab = alphabet
            x, ind = torch.from_numpy(np.stack(xs)), torch.from_numpy(np.concatenate(inds))
            for g in opt.param_groups:
                g["lr"] = a.ind_warm_lr if g.get("stage1") else 0.0
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(a.bf16)):
                hx = model.wte[x] + model.wpe[:T]
                for b in model.h[:max(l for l, _ in ind_heads) + 1]:
                    hx = b(hx, model.mask)
            l, hh = prev_head
            att = model.h[l].kept[:, keep[l].index(hh)].float()
            t = torch.arange(1, T)
            loss = -att[:, t, t - 1].clamp_min(1e-6).log().mean()
            accs = []
            for l, hh in ind_heads:
                att = model.h[l].kept[:, keep[l].index(hh)].float()
                ai = att[ind[:, 0], ind[:, 1], ind[:, 2]]
                loss = loss - ai.clamp_min(1e-6).log().mean()
                accs.append(ai.mean().item())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % 20 == 0 or step == a.prev_warm + a.ind_warm:
                say(f"step {step} (induction stage) loss {loss.item():.4f} attention on the induction targets "
                    + " ".join(f"{v:.3f}" for v in accs))
            if time.time() - t_ck > a.ckpt_minutes * 60:
                save_ckpt()
                t_ck = time.time()
            continue
        B, T = shape_at(step, a)
        x, m, kinds, ind = batch(data, a.seed, step, B, T, mix)
        lr = lr_at(step - a.prev_warm - a.ind_warm, a)
        for g in opt.param_groups:
            g["lr"] = lr * g.get("mult", 1.0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(a.bf16)):
            h = model.hidden(x[:, :-1])  # [B, T, C]
            sel = m.reshape(-1)
            logits = model.logits(h.reshape(-1, h.shape[-1])[sel])  # only the scored positions
        lt = F.cross_entropy(logits.float(), x[:, 1:].reshape(-1)[sel], reduction="none")
        loss = lt.mean()
        aux = {}
        owner = torch.arange(x.shape[0]).repeat_interleave(T)[sel]  # the sequence of each scored target
        if teacher is not None and "text" in kinds:  # keep the text function: KL(teacher || model) on text targets
            on = torch.tensor([kinds[i] == "text" for i in range(x.shape[0])])[owner]
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(a.bf16)):
                th = teacher.hidden(x[:, :-1])
                tl = teacher.logits(th.reshape(-1, th.shape[-1])[sel][on]).float().log_softmax(-1)
            sl = logits[on].float().log_softmax(-1)
            kl = (tl.exp() * (tl - sl)).sum(-1).mean()
            loss = loss + a.distill * kl
            run_loss.setdefault("kl-teacher", []).append(kl.item())
        if prev_head is not None:  # the previous-token head attends to t-1 at every position t >= 1
            l, hh = prev_head
            att = model.h[l].kept[:, keep[l].index(hh)].float()
            t = torch.arange(1, T)
            aux["prev"] = -att[:, t, t - 1].clamp_min(1e-6).log().mean()
        if ind_heads and len(ind):  # induction heads: from a second copy's token to the token after its first
            for l, hh in ind_heads:
                att = model.h[l].kept[:, keep[l].index(hh)].float()
                aux[f"ind{l}.{hh}"] = -att[ind[:, 0], ind[:, 1], ind[:, 2]].clamp_min(1e-6).log().mean()
        for k, v in aux.items():
            loss = loss + a.aux_weight * v
            run_loss.setdefault("aux-" + k, []).append(v.item())
        for i, k in enumerate(kinds):
            li = lt[owner == i]
            if li.numel():
                run_loss.setdefault(k, []).append(li.mean().item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_([p for _, p in trainable], 1.0).item()
        opt.step()
        if pins is not None:
            pins.restore()
        step += 1
        ntok += x.shape[0] * T
        if step % 10 == 0 or step == 1:
            el = time.time() - t0
            per = " ".join(f"{k} {np.mean(v):.3f}" for k, v in sorted(run_loss.items()))
            say(f"step {step} loss {loss.item():.6f} lr {lr:.2e} gnorm {gn:.2f} kinds {','.join(kinds)} "
                f"tok/s {ntok / el:.0f} | mean loss since last line: {per}")
            run_loss = {}
        if a.eval_every > 0 and (step % a.eval_every == 0 or step == stop):
            rec = {"step": step, **measure(model, data, a.corpus, wotw)}
            say("measure " + json.dumps(rec))
            with open(os.path.join(a.run, "eval.jsonl"), "a") as f:
                f.write(json.dumps(rec) + "\n")
        if time.time() - t_ck > a.ckpt_minutes * 60 or step == stop:
            save_ckpt()
            t_ck = time.time()
    if not os.path.exists(ckpt_path):  # nothing to train (--steps 0): the built circuit is the run's result, and
        save_ckpt()                    # --export then reads it instead of building the circuit a second time
    say(f"done at step {step}")


if __name__ == "__main__":
    main()
