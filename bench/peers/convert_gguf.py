#!/usr/bin/env python3
"""convert_gguf.py — runs llama.cpp's convert_hf_to_gguf.py on an HF GPT-2 directory, for bench/peer_bench.py.

  PYTHON bench/peers/convert_gguf.py LLAMA_DIR HF_DIR OUT.gguf --outtype f32|f16

PYTHON must have numpy, torch, transformers (and sentencepiece, safetensors): the venv of docs/bench.md
"Peer benchmark". LLAMA_DIR's gguf-py folder goes first on the import path (as the converter itself does).

Debian 12's torch is 1.13, older than the converter expects: its dtype tables name torch.float8_e4m3fn,
float8_e5m2, float8_e8m0fnu, uint16/32/64, which 1.13 lacks. For a checkpoint whose tensors are F32 none of
them is ever used (they are only keys of lookup tables), so this wrapper gives each missing name a distinct
placeholder before running the converter unchanged; a tensor of such a type would fail loudly in the
converter, not convert silently. Newer torch needs no placeholder and none is added.
"""
import os
import runpy
import sys


class _MissingDtype:
    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"<torch.{self.name}: not in torch {torch.__version__}>"


def main():
    if len(sys.argv) < 4:
        print(__doc__, file=sys.stderr)
        return 2
    llama, hf, out, rest = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    script = os.path.join(llama, "convert_hf_to_gguf.py")
    if not os.path.isfile(script):
        print(f"convert_gguf.py: no convert_hf_to_gguf.py in {llama}", file=sys.stderr)
        return 1
    global torch
    import torch
    added = []
    for name in ("float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu", "float8_e4m3fnuz", "float8_e5m2fnuz",
                 "uint16", "uint32", "uint64"):
        if not hasattr(torch, name):
            setattr(torch, name, _MissingDtype(name))
            added.append(name)
    if added:
        print(f"convert_gguf.py: torch {torch.__version__} lacks {', '.join(added)}: placeholders only "
              "(unused for an F32 checkpoint)", file=sys.stderr)
    sys.path.insert(0, llama)
    sys.path.insert(1, os.path.join(llama, "gguf-py"))
    sys.argv = [script, hf, "--outfile", out] + rest
    runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
