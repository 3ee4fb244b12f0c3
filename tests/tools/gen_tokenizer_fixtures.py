#!/usr/bin/env python3
"""gen_tokenizer_fixtures.py — writes tests/data/tokenizer/fixtures.json for tests/test_tokenizer.c.

Owns: the expected GPT-2 token ids the C tokenizer is tested against. Does not own: the C code.

Two independent references must agree on every case or the script fails:
  1. Hugging Face `transformers` GPT2Tokenizer (Rust `tokenizers` backend) loaded from the local
     vocab.json / merges.txt (pip install transformers).
  2. A direct port of OpenAI's gpt-2 src/encoder.py (the `regex` module pattern, bytes_to_unicode,
     rank-ordered merges) written below.

Usage: python3 tests/tools/gen_tokenizer_fixtures.py [--shared /work/shared] [--out tests/data/tokenizer]
The fixture holds the texts as hex (exact bytes), so the C test needs no Python.
"""
import argparse
import json
import os
import random
import sys

import regex

EOT = "<|endoftext|>"
PAT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class EncoderPy:
    """Port of OpenAI gpt-2 encoder.py (Encoder.bpe / encode), plus <|endoftext|> splitting."""

    def __init__(self, vocab_path, merges_path):
        with open(vocab_path, encoding="utf-8") as f:
            self.encoder = json.load(f)
        with open(merges_path, encoding="utf-8") as f:
            lines = f.read().split("\n")[1:-1]
        self.ranks = {tuple(l.split()): i for i, l in enumerate(lines)}
        self.byte_encoder = bytes_to_unicode()
        self.cache = {}

    def bpe(self, token):
        if token in self.cache:
            return self.cache[token]
        word = tuple(token)
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            bigram = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if bigram not in self.ranks:
                break
            first, second = bigram
            new, i = [], 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    new.extend(word[i:])
                    break
                new.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new.append(first + second)
                    i += 2
                else:
                    new.append(word[i])
                    i += 1
            word = tuple(new)
        self.cache[token] = word
        return word

    def encode_ordinary(self, text):
        out = []
        for tok in regex.findall(PAT, text):
            tok = "".join(self.byte_encoder[b] for b in tok.encode("utf-8"))
            out.extend(self.encoder[t] for t in self.bpe(tok))
        return out

    def encode(self, text, allow_special):
        if not allow_special:
            return self.encode_ordinary(text)
        out = []
        for i, part in enumerate(text.split(EOT)):
            if i:
                out.append(self.encoder[EOT])
            out.extend(self.encode_ordinary(part))
        return out


def hf_tokenizer(tok_dir):
    from transformers import GPT2Tokenizer  # noqa: import here so --help works without it
    return GPT2Tokenizer.from_pretrained(tok_dir)


def hf_encode(hf, text, allow_special):
    return hf.encode(text, split_special_tokens=not allow_special)


def fnv1a_ids(ids):
    """FNV-1a 64 over the ids as little-endian int32 — the C test computes the same."""
    h = 0xcbf29ce484222325
    for i in ids:
        for b in int(i).to_bytes(4, "little", signed=True):
            h = ((h ^ b) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return "%016x" % h


HAND_CASES = [
    ("empty", ""),
    ("hello", "Hello world"),
    ("sentence", "The quick brown fox jumps over the lazy dog."),
    ("leading_space", " leading space"),
    ("accents", "Café naïve résumé Ångström Œuvre déjà vu"),
    ("german", "Straße Größe Übermäßig"),
    ("cjk", "中文分词测试：你好，世界！日本語のテキスト。한국어 텍스트"),
    ("cyrillic_greek", "Привет, мир! Καλημέρα κόσμε"),
    ("arabic_hebrew", "مرحبا بالعالم שלום עולם"),
    ("emoji", "I ❤️ emoji 😀😃😄 👨‍👩‍👧‍👦 🇫🇷 👍🏽"),
    ("spaces_runs", "a  b   c    d     e"),
    ("trailing_spaces", "trailing   "),
    ("only_spaces", "     "),
    ("tabs", "\tindented\t\ttabs\t"),
    ("newlines", "line1\nline2\n\nline4\n\n\n"),
    ("crlf", "windows\r\nline\r\n"),
    ("mixed_ws", " \t \n \r\n  x  \n\t "),
    ("unicode_ws", "a\u00a0b\u2003c\u3000d\u2028e\u0085f\u202fg"),
    ("contractions", "it's don't they're we've I'm you'll he'd"),
    ("contractions_upper", "IT'S DON'T THEY'RE WE'VE I'M YOU'LL HE'D"),
    ("contractions_glued", "'steve it'sgood don'tknow O'Steve PETER'Sdog I'Mgood WE'LLbe 'Dx 'REd"),
    ("contractions_edge", "'s 's''s 'S 't's 'll've rock'n'roll '"),
    ("quotes", "\"quoted\" 'single' `back` «guillemets» “curly” ‘curly’"),
    ("numbers", "0 1 12 123 1234 12345 3.14159 -42 1,000,000 2nd 10x 0xFF 1e-5"),
    ("unicode_digits", "٣٤٥ ४५६ ⅣⅫ ½ ²³"),
    ("punct", "Hello!!! What??? ...and... (parens) [brackets] {braces} @user #tag $5 %20 ^_^ ~~~"),
    ("code", "int main(void) {\n    return x->y[0] + *p++; // comment\n}\n"),
    ("url", "https://example.com/path?q=1&r=two#frag"),
    ("eot_alone", EOT),
    ("eot_inside", "Hello" + EOT + " world" + EOT + EOT + "end"),
    ("eot_partial", "<|endoftext| <|endoftext|x <endoftext|>"),
    ("control_chars", "a\x01b\x1fc\x7fd\x0be\x0cf"),
    ("nul", "a\x00b\x00\x00c"),
    ("long_word", "a" * 300),
    ("long_digits", "9" * 100),
    ("long_spaces", " " * 100 + "x"),
    ("repeated_pairs", "aaaaaaa bbbbbbbb abababab"),
    ("math", "∑ ∫ √ ≤ ≥ ≠ ∞ π ∂x/∂t"),
    ("combining", "e\u0301 a\u0308 n\u0303"),
    ("supplementary", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚𝟛 𐍈"),
]


def random_cases(n, seed):
    rng = random.Random(seed)
    pools = [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "0123456789",
        " " * 6 + "\t\n\r",
        "'" * 4 + "sStTrRevVmlLdD",
        ".,;:!?-_()[]{}<>|/\\\"@#$%^&*+=~`",
        "éèêëàâäôöûüçñßøåæœ",
        "中文日本語한국어",
        "😀🎉👍❤️🇫🇷",
        "\u00a0\u2003\u3000\u0085",
        "٣४Ⅳ½",
    ]
    out = []
    for k in range(n):
        length = rng.randint(1, 60)
        s = "".join(rng.choice(rng.choice(pools)) for _ in range(length))
        if k % 10 == 0:
            pos = rng.randint(0, len(s))
            s = s[:pos] + EOT + s[pos:]
        out.append(("random_%03d" % k, s))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    here = os.path.dirname(os.path.abspath(__file__))
    repo = os.path.normpath(os.path.join(here, "..", ".."))
    ap.add_argument("--shared", default=os.path.normpath(os.path.join(repo, "..", "shared")))
    ap.add_argument("--out", default=os.path.join(repo, "tests", "data", "tokenizer"))
    args = ap.parse_args()

    tok_dir = os.path.join(repo, "host", "assets")
    vocab, merges = os.path.join(tok_dir, "vocab.json"), os.path.join(tok_dir, "merges.txt")
    ref = EncoderPy(vocab, merges)
    hf = hf_tokenizer(tok_dir)

    cases = list(HAND_CASES)
    for name, rel in [("wiki_test_head", "data/wikitext-2-raw/wiki.test.raw"),
                      ("war_of_the_worlds_head", "data/books/war-of-the-worlds.txt")]:
        with open(os.path.join(args.shared, rel), encoding="utf-8", newline="") as f:
            cases.append((name, f.read()[:2000]))
    cases += random_cases(300, seed=1234)

    out_cases = []
    for name, text in cases:
        for allow in (1, 0):
            if allow == 0 and EOT not in text and name not in ("empty", "hello"):
                continue
            a = hf_encode(hf, text, allow)
            b = ref.encode(text, allow)
            if a != b:
                sys.exit("references disagree on %s (allow_special=%d): %r\nHF  %s\npy  %s" % (name, allow, text, a, b))
            out_cases.append({"name": name, "allow_special": allow, "text": text,
                              "hex": text.encode("utf-8").hex(), "ids": a})

    whole = []
    for name, rel in [("wiki.test.raw", "data/wikitext-2-raw/wiki.test.raw"),
                      ("war-of-the-worlds.txt", "data/books/war-of-the-worlds.txt")]:
        with open(os.path.join(args.shared, rel), encoding="utf-8", newline="") as f:
            text = f.read()
        ids = hf_encode(hf, text, 0)
        if ids != ref.encode(text, 0):
            sys.exit("references disagree on the whole of " + rel)
        whole.append({"shared_path": rel, "bytes": len(text.encode("utf-8")), "n_ids": len(ids),
                      "ids_fnv1a64": fnv1a_ids(ids), "first_ids": ids[:32]})

    doc = {
        "description": "GPT-2 token ids from HF transformers GPT2Tokenizer and a port of OpenAI encoder.py "
                       "(both agree), generated by tests/tools/gen_tokenizer_fixtures.py from host/model/assets. "
                       "'hex' is the exact UTF-8 of 'text'. whole_files: FNV-1a 64 over the ids as int32 LE.",
        "vocab_size": len(ref.encoder),
        "eot": ref.encoder[EOT],
        "cases": out_cases,
        "whole_files": whole,
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "fixtures.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print("wrote %s: %d cases, %d whole files" % (path, len(out_cases), len(whole)))


if __name__ == "__main__":
    main()
