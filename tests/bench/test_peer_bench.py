"""Tests of bench/peer_bench.py (issue #22's side-by-side peer benchmark), standard-library Python only:
the summary table from fixtures/peer_bench.jsonl (medians, ranges, ratios to llama.cpp F32, bandwidth shares
and load written by hand from the fixture's numbers), the per-round order, llama-bench output parsing, the
weight-byte count, and one end-to-end `run` against fake kvhost / llama-bench / membw executables with a
missing transformers Python (skipped with a note, no records for it)."""
import json
import os
import stat
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "bench"))
import peer_bench  # noqa: E402

FIXTURE = os.path.join(HERE, "fixtures", "peer_bench.jsonl")

# fixture: decode128 kvhost 5,7,6 -> 6, llama.cpp F32 4,3,5 -> 4 (1.50x); 1e9 weight bytes per token, so
# kvhost moves 6.00 GB/s, llama.cpp 4.00; probe 10,12,11 -> 11 GB/s: 55% and 36%.
# prefill512 kvhost 30, (failed), 20 -> 25 over 2 runs; llama.cpp 50,40,45 -> 45; 25/45 = 0.56x.
MEDIANS = """\
| threads | test | kvhost | llama.cpp F32 |
|---|---|---|---|
| 1 | decode, 128 + 128 | 6.00 | 4.00 |
| 1 | prefill, 512 tokens | 25.0 | 45.0 |"""

ROWS = """\
| kvhost | 1 | decode, 128 + 128 | 3 | 6.00 | 5.00-7.00 | 1.50x | 6.00 | 55% | 1.00, 1.50 | 0.20, 0.30 |
| kvhost | 1 | prefill, 512 tokens | 2 | 25.0 | 20.0-30.0 | 0.56x | — | — | 0.60, 0.80 | 0.20, 0.30 |
| llama.cpp F32 | 1 | decode, 128 + 128 | 3 | 4.00 | 3.00-5.00 | 1.00x | 4.00 | 36% | 0.20, 0.20 | 0.00, 0.00 |
| llama.cpp F32 | 1 | prefill, 512 tokens | 3 | 45.0 | 40.0-50.0 | 1.00x | — | — | 0.20, 0.20 | 0.00, 0.00 |"""

PROBE = """\
| threads | n | median GB/s | range |
|---|---|---|---|
| 1 | 3 | 11.00 | 10.00-12.00 |"""


class Summary(unittest.TestCase):
    def setUp(self):
        self.table = peer_bench.summarize(peer_bench.load_jsonl([FIXTURE]))

    def test_medians(self):
        self.assertIn(MEDIANS, self.table)

    def test_every_series(self):
        self.assertIn(ROWS, self.table)

    def test_probe(self):
        self.assertIn(PROBE, self.table)

    def test_labels_skips_failures(self):
        self.assertIn("**seeded random weights**", self.table)
        self.assertIn("- transformers: **skipped** — no Python /nope", self.table)
        self.assertIn("- llama.cpp F32: llama.cpp 0c1e57098 (build 0), `m-f32.gguf`, llama-bench defaults", self.table)
        self.assertIn("- round 1: kvhost prefill512 t=1: kvhost: out of memory", self.table)

    def test_median(self):
        self.assertEqual(peer_bench.median([3, 1, 2]), 2)
        self.assertEqual(peer_bench.median([4, 1, 2, 3]), 2.5)
        self.assertIsNone(peer_bench.median([]))

    def test_run_id_selects(self):
        self.assertNotIn("kvhost", peer_bench.summarize(peer_bench.load_jsonl([FIXTURE]), run_id="other").split(
            "## Medians")[1])


class Pieces(unittest.TestCase):
    def test_round_order(self):
        jobs = [(s, t, th) for s in "ab" for t in ("decode128", "prefill512") for th in (1, 2)]
        r0 = peer_bench.plan_round(jobs, 0, 1)
        self.assertEqual(sorted(r0), sorted(jobs))              # every job once
        self.assertEqual(r0, peer_bench.plan_round(jobs, 0, 1))  # seeded
        self.assertNotEqual(r0, peer_bench.plan_round(jobs, 1, 1))  # rounds differ

    def test_llama_bench_output(self):
        jl = '{"build_commit":"abc","avg_ts":5.5,"n_gen":128}\n{"build_commit":"abc","avg_ts":7.25,"n_gen":128}\n'
        self.assertEqual(peer_bench.parse_llama_bench(jl)["avg_ts"], 7.25)
        self.assertEqual(peer_bench.parse_llama_bench('[{"avg_ts":1.0},{"avg_ts":2.0}]')["avg_ts"], 2.0)
        with self.assertRaises(ValueError):
            peer_bench.parse_llama_bench("llama-bench: error\n")

    def test_weight_bytes(self):
        # gpt2-medium: matrices 50257*1024 + 24*(4*1024^2 + 2*1024*4096) = 353,453,056;
        # vectors 1024 + 24*(9*1024 + 4096) + 2*1024 = 322,560
        b = peer_bench.weight_bytes(dict(vocab_size=50257, n_embd=1024, n_layer=24))
        self.assertEqual(b["fp32"], 4 * (353453056 + 322560))
        self.assertEqual(b["f16"], 2 * 353453056 + 4 * 322560)

    def test_kvhost_specs(self):
        self.assertEqual(peer_bench.parse_kvhost_specs(["b/kvhost", "new=x/kvhost"], ["sx:A=1,B=2"]),
                         [("kvhost", "b/kvhost", {}), ("new", "x/kvhost", {}), ("sx", "b/kvhost", {"A": "1", "B": "2"})])
        with self.assertRaises(SystemExit):
            peer_bench.parse_kvhost_specs(["k"], ["nocolon"])


FAKE_KVHOST = r'''#!/usr/bin/env python3
import json, sys
a = sys.argv[1:]
if a == ["--version"]:
    print("kvhost 9.9 (fake)"); sys.exit(0)
o = {a[i]: a[i + 1] for i in range(1, len(a) - 1) if a[i].startswith("--") and not a[i + 1].startswith("--")}
n, m = int(o["--prompt-tokens"]), int(o["--max-new"])
rec = {"record": "generate", "commit": "fake", "prefill_ms": n * 10.0, "decode_tokens_per_s": 1000.0 / n,
       "weight_bytes_per_token": 123, "first_tokens": [1]}
open(o["--json"], "a").write(json.dumps(rec) + "\n")
'''

FAKE_LLAMA = r'''#!/usr/bin/env python3
import json, sys
a = sys.argv[1:]
if a == ["--help"]:
    print("  -d, --n-depth <n>"); sys.exit(0)
o = {a[i]: a[i + 1] for i in range(len(a) - 1) if a[i].startswith("-") and not a[i + 1].startswith("-")}
ts = 2000.0 / int(o["-d"]) if o["-n"] != "0" else 100.0
print(json.dumps({"build_commit": "f00", "build_number": 1, "n_prompt": int(o["-p"]), "n_gen": int(o["-n"]),
                  "n_depth": int(o.get("-d", 0)), "avg_ts": ts}))
'''

FAKE_MEMBW = '#!/bin/sh\necho "{\\"record\\":\\"membw\\",\\"threads\\":$OMP_NUM_THREADS,\\"read_gb_per_s\\":10.0}"\n'


class EndToEnd(unittest.TestCase):
    def test_run_with_fakes(self):
        with tempfile.TemporaryDirectory() as d:
            def exe(name, text):
                p = os.path.join(d, name)
                with open(p, "w") as f:
                    f.write(text)
                os.chmod(p, os.stat(p).st_mode | stat.S_IEXEC)
                return p
            kv, lb, mb = exe("kvhost", FAKE_KVHOST), exe("llama-bench", FAKE_LLAMA), exe("membw", FAKE_MEMBW)
            model, gguf = os.path.join(d, "model"), os.path.join(d, "gguf")
            os.makedirs(model)
            os.makedirs(gguf)
            with open(os.path.join(model, "config.json"), "w") as f:
                json.dump(dict(vocab_size=100, n_embd=8, n_layer=1, n_head=2, n_positions=1024), f)
            open(os.path.join(model, "model.safetensors"), "w").close()
            open(os.path.join(model, "RANDOM_WEIGHTS.txt"), "w").close()
            open(os.path.join(gguf, "model-f32.gguf"), "w").close()   # cached conversion: newer than the model
            out = os.path.join(d, "out")
            p = subprocess.run([sys.executable, os.path.join(REPO, "bench", "peer_bench.py"), "run",
                                "--out-dir", out, "--kvhost", kv, "--llama-bench", lb, "--llama-dir", d,
                                "--gguf-dir", gguf, "--membw", mb, "--model", model,
                                "--peer-python", os.path.join(d, "no-python"), "--series",
                                "kvhost,llama-f32,transformers", "--tests", "decode128,prefill512",
                                "--threads", "1,2", "--rounds", "2", "--warmup", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            self.assertEqual(p.returncode, 0, p.stderr)
            self.assertIn("peer_bench: note: skipping transformers: no Python", p.stderr)
            recs = peer_bench.load_jsonl([os.path.join(out, "results.jsonl")])
            runs = [r for r in recs if r["record"] == "peer_run"]
            self.assertEqual(len(runs), 2 * 2 * 2 * 2)                      # series x tests x threads x rounds
            self.assertEqual({r["series"] for r in runs}, {"kvhost", "llama.cpp F32"})
            self.assertEqual(len([r for r in recs if r["record"] == "membw"]), 2 * 2)
            start = recs[0]
            self.assertEqual(start["record"], "peer_bench_start")
            self.assertIn("transformers", start["skipped"])
            self.assertTrue(start["random_weights"])
            by = {(r["series"], r["test"], r["threads"], r["round"]): r for r in runs}
            k = by[("kvhost", "decode128", 2, 1)]
            self.assertAlmostEqual(k["tokens_per_s"], 1000.0 / 128)
            self.assertEqual(k["weight_bytes_per_token"], 123)                # kvhost's own figure
            self.assertIn("--threads 2", k["command"])
            self.assertAlmostEqual(by[("kvhost", "prefill512", 1, 0)]["tokens_per_s"], 512 / 5.12)
            l = by[("llama.cpp F32", "decode128", 1, 0)]
            self.assertAlmostEqual(l["tokens_per_s"], 2000.0 / 128)
            self.assertIn("-p 0 -n 128 -d 128", l["command"])
            self.assertIn("--no-warmup", l["command"])
            self.assertEqual(l["weight_bytes_per_token"], peer_bench.weight_bytes(
                dict(vocab_size=100, n_embd=8, n_layer=1))["fp32"])
            self.assertEqual(by[("llama.cpp F32", "prefill512", 2, 1)]["tokens_per_s"], 100.0)
            for r in runs:
                for f in ("load1_before", "load1_after", "other_cpu_cores", "time_utc", "tool_version"):
                    self.assertIn(f, r)
            with open(os.path.join(out, "table.md")) as f:
                table = f.read()
            self.assertIn("| 2 | decode, 128 + 128 | 7.81 | 15.6 |", table)
            self.assertIn("| kvhost | 1 | decode, 128 + 128 | 2 | 7.81 | 7.81-7.81 | 0.50x |", table)


if __name__ == "__main__":
    unittest.main()
