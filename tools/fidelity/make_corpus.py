#!/usr/bin/env python3
"""make_corpus.py — the training corpus of gpt2-tiny-copy, assembled deterministically from Debian packages.

Sources (all public domain texts, shipped by Debian packages; install them with
`apt-get install r-cran-janeaustenr r-cran-tokenizers bible-kjv`):

  austen   r-cran-janeaustenr   Emma, Mansfield Park, Persuasion, Pride and Prejudice, Sense and Sensibility
  moby     r-cran-tokenizers    Moby Dick (the package's `mobydick` data set)
  kjv      bible-kjv(-text)     The King James Bible (`bible -l0 gen1:1-rev22:21`)

Held out (written, never trained on):
  northanger  r-cran-janeaustenr  Northanger Abbey: the held-out book of the copy measurements. It is in
              neither this corpus nor gpt2-tiny-wt's (whose Austen was Pride and Prejudice, Emma,
              Persuasion and Sense and Sensibility).
The War of the Worlds (../shared/data/books) and WikiText are evaluation texts and are read by nothing here.

Output (OUT, default /work/fidelity-run/corpus):
  texts/NAME.txt       the extracted text of each source (UTF-8, books joined by a blank line)
  NAME.u16             its GPT-2 BPE ids, little-endian uint16, books separated by <|endoftext|> (50256)
  manifest.json        package names and versions, sha256 of every text and id file, token counts

Tokenizer: GPT-2 BPE: `--kvhost build/kvhost` uses kvhost's own tokenizer (`kvhost tokenize`, tested equal
to transformers'), else transformers' GPT2TokenizerFast from vocab.json + merges.txt (default
../shared/data/gpt2-tokenizer; pip install transformers==4.44.2). Both give the same ids (checked: the
manifest's ids_sha256 are the same either way).
Deterministic: the same package versions give byte-identical files (the manifest's hashes say so).
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys

import numpy as np

EOT = 50256
AUSTEN_TRAIN = ["emma", "mansfieldpark", "persuasion", "prideprejudice", "sensesensibility"]
AUSTEN_HELDOUT = ["northangerabbey"]


def sh(cmd):
    return subprocess.run(cmd, check=True, capture_output=True).stdout


def pkg_version(pkg):
    try:
        return sh(["dpkg-query", "-W", "-f=${Version}", pkg]).decode()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None


def r_lines(package, dataset):
    """One R data set of a character vector, as text: elements joined by newlines."""
    code = (f'suppressMessages(library({package})); x <- get(data("{dataset}", package="{package}")); '
            'x[is.na(x)] <- ""; writeLines(enc2utf8(x), con=stdout(), useBytes=TRUE)')
    return sh(["Rscript", "--vanilla", "-e", code]).decode("utf-8")


def austen(book):
    code = (f'suppressMessages(library(janeaustenr)); x <- {book}; x[is.na(x)] <- ""; '
            'writeLines(enc2utf8(x), con=stdout(), useBytes=TRUE)')
    return sh(["Rscript", "--vanilla", "-e", code]).decode("utf-8")


def kjv():
    return sh(["bible", "-l0", "gen1:1-rev22:21"]).decode("utf-8")


def strip_gutenberg(text):
    """The text between Project Gutenberg's START and END markers (the licence header/footer removed)."""
    text = text.lstrip("\ufeff")
    s = text.find("*** START OF")
    if s >= 0:
        text = text[text.index("\n", s) + 1:]
    ends = [e for e in (text.find("*** END OF"), text.find("End of Project Gutenberg"),
                        text.find("End of the Project Gutenberg")) if e >= 0]
    if ends:
        text = text[:min(ends)]
    return text


def sha256(b):
    return hashlib.sha256(b).hexdigest()


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/work/fidelity-run/corpus")
    ap.add_argument("--tokenizer", default=os.path.join(here, "..", "..", "..", "shared", "data", "gpt2-tokenizer"))
    ap.add_argument("--kvhost", help="tokenize with this kvhost binary instead of transformers")
    a = ap.parse_args()

    pkgs = {p: pkg_version(p) for p in ["r-cran-janeaustenr", "r-cran-tokenizers", "bible-kjv", "bible-kjv-text"]}
    missing = [p for p, v in pkgs.items() if v is None]
    if missing:
        sys.exit("make_corpus: missing Debian packages %s\nHINT: apt-get install r-cran-janeaustenr "
                 "r-cran-tokenizers bible-kjv" % ", ".join(missing))
    if a.kvhost:
        def tok(text):
            out = subprocess.run([a.kvhost, "tokenize", "--eot-text", "--text-file", "/dev/stdin"],
                                 input=text.encode("utf-8"), check=True, capture_output=True).stdout
            return {"input_ids": [int(x) for x in out.split()]}
    else:
        from transformers import GPT2TokenizerFast
        tok = GPT2TokenizerFast(vocab_file=os.path.join(a.tokenizer, "vocab.json"),
                                merges_file=os.path.join(a.tokenizer, "merges.txt"))

    sources = {
        "austen": ("r-cran-janeaustenr", [austen(b) for b in AUSTEN_TRAIN], AUSTEN_TRAIN),
        "moby": ("r-cran-tokenizers", [r_lines("tokenizers", "mobydick")], ["mobydick"]),
        "kjv": ("bible-kjv-text", [kjv()], ["kjv"]),
        "northanger": ("r-cran-janeaustenr", [austen(b) for b in AUSTEN_HELDOUT], AUSTEN_HELDOUT),
    }
    os.makedirs(os.path.join(a.out, "texts"), exist_ok=True)
    man = {"packages": pkgs, "tokenizer": {
        f: sha256(open(os.path.join(a.tokenizer, f), "rb").read()) for f in ("vocab.json", "merges.txt")},
        "train": ["austen", "moby", "kjv"], "heldout": ["northanger"], "sources": {}}
    for name, (pkg, docs, parts) in sources.items():
        docs = [strip_gutenberg(d).strip() + "\n" for d in docs]
        text = "\n".join(docs)
        tb = text.encode("utf-8")
        with open(os.path.join(a.out, "texts", name + ".txt"), "wb") as f:
            f.write(tb)
        ids = []
        for d in docs:
            if ids:
                ids.append(EOT)
            ids.extend(tok(d)["input_ids"])
        arr = np.asarray(ids, dtype="<u2")
        ab = arr.tobytes()
        with open(os.path.join(a.out, name + ".u16"), "wb") as f:
            f.write(ab)
        man["sources"][name] = {"package": pkg, "parts": parts, "chars": len(text), "bytes": len(tb),
                                "tokens": int(arr.size), "text_sha256": sha256(tb), "ids_sha256": sha256(ab)}
        print(f"{name:12s} {pkg:20s} {len(text):9d} chars {arr.size:9d} tokens", flush=True)
    with open(os.path.join(a.out, "manifest.json"), "w") as f:
        json.dump(man, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
