"""Tests of bench/kvbench.py: sweep parsing and its errors, grid expansion and run order, the max-batch
search against a fake limit, run/emit/merge against a fake kvhost, and GNU parallel for real when present."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "bench"))
import kvbench  # noqa: E402

FAKE = os.path.join(HERE, "fake_kvhost.py")
GOOD = """
[sweep]
models = m1, m2
lengths = 32, 64
batches = 1,4
repeats = 2
warmup = 1
max_new = 8
[full]
[h2o]
plugins = h2o.so
set = cache.budget=16; h2o.heavy_ratio=0.5
[half]
plugins = h2o.so
budget_ratio = 0.5
[nc]
no_cache = true
max_length = 32
[mini]
plugins = minicache.so
"""


def parse(text):
    return kvbench.parse_sweep_text(text, "s.ini")


class SweepParsing(unittest.TestCase):
    def test_good_file(self):
        s = parse(GOOD)
        self.assertEqual(s["models"], ["m1", "m2"])
        self.assertEqual(s["lengths"], [32, 64])
        self.assertEqual(s["batches"], [1, 4])
        self.assertEqual((s["repeats"], s["warmup"], s["max_new"]), (2, 1, 8))
        self.assertEqual([c["name"] for c in s["configs"]], ["full", "h2o", "half", "nc", "mini"])
        self.assertEqual(s["configs"][1]["sets"], ["cache.budget=16", "h2o.heavy_ratio=0.5"])
        self.assertTrue(s["configs"][3]["no_cache"])

    def assertError(self, text, *needles):
        with self.assertRaises(kvbench.SweepError) as cm:
            parse(text)
        for n in needles:
            self.assertIn(n, str(cm.exception))

    def test_errors_name_file_and_key(self):
        self.assertError("[sweep]\nmodels = a\nlengths = 1\nlenghts = 2\n[x]\n", "s.ini", "[sweep]", "lenghts")
        self.assertError("[sweep]\nmodels = a\nlengths = \n[x]\n", "s.ini", "lengths", "empty")
        self.assertError("[sweep]\nmodels = a\nlengths = 32, 6x4\n[x]\n", "lengths", "6x4")
        self.assertError("[sweep]\nmodels = a\nlengths = 0\n[x]\n", "lengths", ">= 1")
        self.assertError("[sweep]\nmodels = a\nlengths = 8\nrepeats = -1\n[x]\n", "repeats")
        self.assertError("[sweep]\nmodels = a\nlengths = 8\n[x]\nconfig = nowhere/none.ini\n", "[x]", "config",
                         "not found")
        self.assertError("[sweep]\nmodels = a\nlengths = 8\n[x]\nbudget = 3\n", "[x]", "unknown key 'budget'")
        self.assertError("[sweep]\nmodels = a\nlengths = 8\n[x]\nbudget_ratio = 2\n", "budget_ratio")
        self.assertError("[sweep]\nmodels = a\nlengths = 8\n[x]\nset = nodot\n", "[x] set", "nodot")
        self.assertError("[sweep]\nmodels = a\nlengths = 8\n[x]\nno_cache = maybe\n", "no_cache")
        self.assertError("[sweep]\nmodels = a\nlengths = 8\n[x]\nno_cache = true\nplugins = h2o.so\n", "no_cache")
        self.assertError("[sweep]\nmodels = a\nlengths = 8\n", "no configurations")
        self.assertError("[x]\n", "no [sweep]")
        self.assertError("[sweep]\nlengths = 8\n[x]\n", "missing key 'models'")
        self.assertError("[sweep]\nmodels = a\nlengths = 8\nbackends = tpu\n[x]\n", "tpu")
        self.assertError("[sweep]\nmodels = a\nlengths = 8\ncapacity_length = 8\n[x]\n", "capacity_mem_limit")
        self.assertError("[sweep]\nmodels = a\nlengths = 8\nmem_limit = lots\n[x]\n", "mem_limit")
        self.assertError("[sweep]\nmodels = a\nlengths = 8\n[x]\n[x]\n", "s.ini")

    def test_missing_file(self):
        with self.assertRaises(kvbench.SweepError) as cm:
            kvbench.load_sweep("/nonexistent/sweep.ini")
        self.assertIn("/nonexistent/sweep.ini", str(cm.exception))

    def test_shipped_sweeps_and_configs_parse(self):
        d = os.path.join(REPO, "bench", "sweeps")
        for f in sorted(os.listdir(d)):
            s = kvbench.load_sweep(os.path.join(d, f))
            self.assertTrue(s["configs"], f)
        names = set(os.listdir(os.path.join(REPO, "bench", "configs")))
        for need in ("full", "window", "sink", "h2o", "pyramid", "minicache", "int8", "int4", "h2o_int8",
                     "sink_int4"):
            self.assertIn(need + ".ini", names)


class Grid(unittest.TestCase):
    def test_expansion_and_order(self):
        s = parse(GOOD)
        pts = kvbench.grid_points(s)
        self.assertEqual(len(pts), 2 * 2 * 2)
        self.assertEqual(pts[0], {"model": "m1", "backend": "cpu", "batch": 1, "length": 32})
        self.assertEqual(pts[1]["length"], 64)
        nc = s["configs"][3]
        self.assertTrue(kvbench.config_applies(nc, pts[0]))
        self.assertFalse(kvbench.config_applies(nc, pts[1]))

    def test_config_args(self):
        s = parse(GOOD)
        self.assertEqual(kvbench.config_args(s["configs"][0], 64), [])
        self.assertEqual(kvbench.config_args(s["configs"][2], 64),
                         ["--plugins", "h2o.so", "--set", "cache.budget=32"])
        self.assertEqual(kvbench.config_args(s["configs"][2], 1), ["--plugins", "h2o.so", "--set", "cache.budget=1"])
        self.assertEqual(kvbench.config_args(s["configs"][3], 32), ["--no-cache"])


class MaxBatch(unittest.TestCase):
    def test_finds_known_answer(self):
        for limit in (1, 2, 3, 5, 17, 64, 100, 127, 128):
            calls = []

            def fits(b):
                calls.append(b)
                return b <= limit
            best, probes = kvbench.max_feasible(fits, 1, 128)
            self.assertEqual(best, limit, limit)
            self.assertEqual(len(calls), len(set(calls)), "no batch probed twice")
            self.assertLessEqual(len(calls), 2 * 8 + 1)

    def test_nothing_fits_and_everything_fits(self):
        self.assertEqual(kvbench.max_feasible(lambda b: False, 1, 64)[0], 0)
        self.assertEqual(kvbench.max_feasible(lambda b: True, 1, 64)[0], 64)
        self.assertEqual(kvbench.max_feasible(lambda b: True, 1, 100)[0], 100)

    def test_probe_against_fake_kvhost(self):
        # fake limit: batch * (T + max_new) KiB; T=60, max_new=4 -> 64 KiB/seq; 1M -> 16 sequences
        probe = kvbench.CapacityProbe(FAKE, "m", 60, 4, "1M", [])
        best, _ = kvbench.max_feasible(probe, 1, 256)
        self.assertEqual(best, 16)
        self.assertEqual(probe.last_record["batch"], 16)


class Commands(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="kvbench-test-")
        self.sweep = os.path.join(self.dir, "s.ini")
        with open(self.sweep, "w") as f:
            f.write(GOOD.replace("models = m1, m2", "models = m1"))

    def tearDown(self):
        shutil.rmtree(self.dir)

    def records(self, path):
        with open(path) as f:
            return [json.loads(x) for x in f if x.strip()]

    def test_run_interleaves_tags_skips_and_refuses_overwrite(self):
        out = os.path.join(self.dir, "r.jsonl")
        self.assertEqual(kvbench.main(["run", self.sweep, "--kvhost", FAKE, "--out", out]), 0)
        recs = self.records(out)
        # 4 points (T 32/64 x B 1/4); full, h2o, half at each, nc only at T=32; mini skipped (not built)
        self.assertEqual(len(recs), 4 * 3 + 2)
        self.assertNotIn("mini", {r["tags"]["config"] for r in recs})
        # the configs of one point run back to back, before the next point
        first = [(r["tags"]["config"], r["prompt_tokens"][0], r["batch"]) for r in recs[:4]]
        self.assertEqual(first, [("full", 32, 1), ("h2o", 32, 1), ("half", 32, 1), ("nc", 32, 1)])
        half = [r for r in recs if r["tags"]["config"] == "half" and r["prompt_tokens"][0] == 64][0]
        self.assertIn("cache.budget=32", half["sets"])
        self.assertTrue(all(r["tags"]["sweep"] == "s.ini" for r in recs))
        self.assertTrue([r for r in recs if r["tags"]["config"] == "nc"][0]["no_cache"])
        # never overwritten silently
        self.assertEqual(kvbench.main(["run", self.sweep, "--kvhost", FAKE, "--out", out]), 2)
        self.assertEqual(len(self.records(out)), 14)
        self.assertEqual(kvbench.main(["run", self.sweep, "--kvhost", FAKE, "--out", out, "--append"]), 0)
        self.assertEqual(len(self.records(out)), 28)

    def test_merge(self):
        a, b, o = (os.path.join(self.dir, n) for n in ("a.jsonl", "b.jsonl", "o.jsonl"))
        with open(a, "w") as f:
            f.write('{"record":"generate","x":1}\n{"record":"generate","x":2}\n')
        with open(b, "w") as f:
            f.write('{"record":"generate","x":2}\n{"record":"generate","x":3}\n')
        self.assertEqual(kvbench.main(["merge", a, b, "-o", o]), 0)
        self.assertEqual([r["x"] for r in self.records(o)], [1, 2, 3])
        self.assertEqual(kvbench.main(["merge", a, "-o", o]), 2)  # exists, no --append
        with open(b, "a") as f:
            f.write("{broken\n")
        with self.assertRaises(kvbench.SweepError):
            kvbench.merge_files([b], os.path.join(self.dir, "x.jsonl"))

    def test_emit_slurm(self):
        script = os.path.join(self.dir, "job.sbatch")
        self.assertEqual(kvbench.main(["emit", self.sweep, "--slurm", script, "--kvhost", FAKE,
                                       "--out-dir", self.dir]), 0)
        text = open(script).read()
        self.assertIn("#SBATCH --array=0-3", text)
        self.assertIn("$SLURM_ARRAY_TASK_ID", text)
        r = subprocess.run(["bash", "-n", script])
        self.assertEqual(r.returncode, 0)

    def test_emit_parallel_runs_under_gnu_parallel(self):
        outdir = os.path.join(self.dir, "jobs")
        os.makedirs(outdir)
        p = subprocess.run([sys.executable, os.path.join(REPO, "bench", "kvbench.py"), "emit", self.sweep,
                            "--parallel", "--kvhost", FAKE, "--out-dir", outdir], capture_output=True, text=True)
        self.assertEqual(p.returncode, 0, p.stderr)
        lines = p.stdout.strip().splitlines()
        self.assertEqual(len(lines), 4)
        parallel = shutil.which("parallel")
        if not parallel:
            self.skipTest("GNU parallel not installed (apt-get install parallel); emitted commands checked only")
        r = subprocess.run([parallel, "--will-cite", "-j", "2"], input=p.stdout, capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stderr)
        merged = os.path.join(self.dir, "all.jsonl")
        jobs = sorted(os.path.join(outdir, f) for f in os.listdir(outdir))
        self.assertEqual(len(jobs), 4)
        kvbench.main(["merge", *jobs, "-o", merged])
        recs = self.records(merged)
        self.assertEqual(len(recs), 14)
        self.assertEqual(sorted({r["tags"]["job"] for r in recs}), ["0", "1", "2", "3"])


if __name__ == "__main__":
    unittest.main()
