#!/usr/bin/env python3
"""safetensors_f16.py — writes an F16 copy of a safetensors file whose tensors are F32 (other dtypes are
copied as they are), so a checkpoint travels in half the bytes: bench/make_devcarry.sh uses it to take
the tiny model to a GPU machine under the device tool's 64 MiB limit. Both backends then read the same
fp16 values, which is what a CPU-vs-GPU comparison wants.

  safetensors_f16.py IN.safetensors OUT.safetensors

Standard library only (struct's 'e' format is IEEE half, round to nearest even). A value beyond fp16's
range (|x| > 65504) is an error naming the tensor, not an inf in the output; OUT is written to a
temporary name and renamed, so a failure leaves no partial file.
"""
import json
import os
import struct
import sys


def convert(src, dst):
    with open(src, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise ValueError(f"{src}: too short for a safetensors header")
    n = struct.unpack_from("<Q", data, 0)[0]
    if 8 + n > len(data):
        raise ValueError(f"{src}: header length {n} runs past the end of the file ({len(data)} bytes)")
    header = json.loads(data[8:8 + n])
    base = 8 + n
    out_header, chunks, offset = {}, [], 0
    for name, t in header.items():
        if name == "__metadata__":
            out_header[name] = t
            continue
        lo, hi = t["data_offsets"]
        raw = data[base + lo:base + hi]
        if t["dtype"] == "F32":
            count = len(raw) // 4
            values = struct.unpack(f"<{count}f", raw)
            try:
                raw = struct.pack(f"<{count}e", *values)
            except (OverflowError, struct.error) as e:
                raise ValueError(f"{src}: tensor '{name}' has a value outside fp16's range ({e})") from None
            t = dict(t, dtype="F16")
        out_header[name] = dict(t, data_offsets=[offset, offset + len(raw)])
        chunks.append(raw)
        offset += len(raw)
    head = json.dumps(out_header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format pads the header with spaces to 8-byte alignment
    tmp = dst + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for c in chunks:
            f.write(c)
    os.replace(tmp, dst)


def main(argv):
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[3], file=sys.stderr)
        return 2
    try:
        convert(argv[0], argv[1])
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        print(f"safetensors_f16.py: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
