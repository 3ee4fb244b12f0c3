"""Tests of bench/safetensors_f16.py: F32 tensors become F16 with the values IEEE half rounding gives
(checked against numbers worked out by hand, not against the converter's own struct call), other dtypes
and the metadata pass through, offsets stay contiguous, and a value beyond fp16's range fails naming the
tensor without leaving an output file."""
import json
import os
import shutil
import struct
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "bench"))
import safetensors_f16  # noqa: E402


def write_st(path, tensors, meta=None):
    """tensors: name -> (dtype, shape, raw bytes)."""
    header, blobs, off = {}, [], 0
    if meta:
        header["__metadata__"] = meta
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    head = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def read_st(path):
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack_from("<Q", data)[0]
    return json.loads(data[8:8 + n]), data[8 + n:], n


class F16Copy(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="st16-")
        self.src, self.dst = os.path.join(self.dir, "a.safetensors"), os.path.join(self.dir, "b.safetensors")

    def tearDown(self):
        shutil.rmtree(self.dir)

    def test_values_dtypes_offsets(self):
        # 1 + 2^-11 is halfway between 1 and the next half (1 + 2^-10): ties to even -> 1.0;
        # 1 + 3 * 2^-11 ties between 1 + 2^-10 and 1 + 2^-9 -> the even one, 1 + 2^-9.
        vals = [0.0, -2.5, 1.0 + 2 ** -11, 1.0 + 3 * 2 ** -11, 65504.0, 2 ** -24]
        halves = [0x0000, 0xC100, 0x3C00, 0x3C02, 0x7BFF, 0x0001]
        write_st(self.src, {"w": ("F32", [2, 3], struct.pack("<6f", *vals)),
                            "ids": ("I64", [2], struct.pack("<2q", 7, -1))}, meta={"format": "pt"})
        safetensors_f16.convert(self.src, self.dst)
        h, body, n = read_st(self.dst)
        self.assertEqual(n % 8, 0, "header padded to 8 bytes")
        self.assertEqual(h["__metadata__"], {"format": "pt"})
        self.assertEqual(h["w"], {"dtype": "F16", "shape": [2, 3], "data_offsets": [0, 12]})
        self.assertEqual(h["ids"], {"dtype": "I64", "shape": [2], "data_offsets": [12, 28]})
        self.assertEqual(list(struct.unpack_from("<6H", body, 0)), halves)
        self.assertEqual(struct.unpack_from("<2q", body, 12), (7, -1))
        self.assertEqual(len(body), 28)

    def test_out_of_range_names_tensor_and_leaves_no_file(self):
        write_st(self.src, {"ok": ("F32", [1], struct.pack("<f", 1.0)),
                            "big": ("F32", [1], struct.pack("<f", 70000.0))})
        with self.assertRaisesRegex(ValueError, "tensor 'big'"):
            safetensors_f16.convert(self.src, self.dst)
        self.assertEqual(os.listdir(self.dir), ["a.safetensors"])

    def test_truncated_header(self):
        with open(self.src, "wb") as f:
            f.write(struct.pack("<Q", 1000) + b"{}")
        self.assertEqual(safetensors_f16.main([self.src, self.dst]), 1)
        self.assertFalse(os.path.exists(self.dst))


if __name__ == "__main__":
    unittest.main()
