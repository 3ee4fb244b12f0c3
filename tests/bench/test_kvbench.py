"""Tests of bench/kvbench.py: sweep parsing and its errors, grid expansion and run order, the max-batch
search against a fake limit, run/emit/merge against a fake kvhost, GNU parallel for real when present, and
peers (sections, records in the kvhost schema, skipping) against a fake peer — no torch needed."""
import contextlib
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "bench"))
import kvbench  # noqa: E402
import report  # noqa: E402

FAKE = os.path.join(HERE, "fake_kvhost.py")
FAKE_PEER = os.path.join(HERE, "fake_peer.py")
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
        shared = os.path.isdir(os.path.join(REPO, "..", "shared"))
        parsed = 0
        for f in sorted(os.listdir(d)):
            try:
                s = kvbench.load_sweep(os.path.join(d, f))
            except kvbench.SweepError as e:
                # a sweep naming data under ../shared cannot be checked on a machine without it
                if not shared and "file not found" in str(e) and "shared" in str(e):
                    print(f"note: {f} skipped: ../shared is absent ({e})")
                    continue
                raise
            self.assertTrue(s["configs"], f)
            parsed += 1
        self.assertGreater(parsed, 0)
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

    def test_guided_search_finds_known_answer_for_any_guess(self):
        for limit in (1, 2, 7, 100, 127, 128):
            for g in (1, 2, limit - 3, limit - 1, limit, limit + 1, limit + 5, 3 * limit, 500, None):
                calls = []

                def fits(b):
                    calls.append(b)
                    return b <= limit
                best, probes = kvbench.max_feasible(fits, 1, 128, lambda: g)
                self.assertEqual(best, limit, (limit, g))
                self.assertEqual(len(calls), len(set(calls)), ("no batch probed twice", limit, g, calls))
                self.assertEqual(probes, [(b, b <= limit) for b in calls])
                if g == limit and limit < 128:
                    self.assertEqual(calls, [1, limit, limit + 1] if limit > 1 else [1, 2], "a right guess: 2 probes")
                if g == 500 and limit == 128:
                    self.assertEqual(calls, [1, 128], "a guess above hi is clamped to hi")

    def test_guided_search_nothing_fits(self):
        self.assertEqual(kvbench.max_feasible(lambda b: False, 1, 64, lambda: 10), (0, [(1, False)]))

    def test_size_bytes(self):
        self.assertEqual(kvbench.size_bytes("2G"), 2 << 30)
        self.assertEqual(kvbench.size_bytes("1.5MiB"), 3 << 19)
        self.assertEqual(kvbench.size_bytes("4096"), 4096)
        with self.assertRaises(ValueError):
            kvbench.size_bytes("2 lots")

    def test_predicted_probe_against_fake_kvhost(self):
        # 64 KiB per sequence, 1M cap -> 16; batch 1's peak predicts it, so 3 probes in all
        probe = kvbench.CapacityProbe(FAKE, "m", 60, 4, "1M", [])
        best, probes = kvbench.max_feasible(probe, 1, 256, lambda: kvbench.linear_guess(probe, 1))
        self.assertEqual(best, 16)
        self.assertEqual(probes, [(1, True), (16, True), (17, False)])

    def test_capacity_refuses_bad_sizes_and_reports_failed_probes(self):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = kvbench.main(["capacity", "--kvhost", FAKE, "--model", "m", "--mem-limit", "banana", "--predict"])
        self.assertEqual(rc, 2)
        self.assertIn("--mem-limit 'banana': expected a size", err.getvalue())
        err = io.StringIO()
        with contextlib.redirect_stderr(err):  # the fake refuses 1020 + 8 > 1024 positions: not a memory limit
            rc = kvbench.main(["capacity", "--kvhost", FAKE, "--model", "m", "--mem-limit", "1M",
                               "--prompt-tokens", "1020", "--max-new", "8"])
        self.assertEqual(rc, 1)
        self.assertIn("capacity probe at batch 1 failed", err.getvalue())
        self.assertIn("exceeds n_positions", err.getvalue())

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


PEER_SWEEP = """
[sweep]
models = random:gpt2, m1
lengths = 32, 1020
batches = 1, 2
backends = cpu
repeats = 2
warmup = 1
max_new = 8
threads = 2
capacity_length = 32
capacity_mem_limit = 1M
eval_file = {eval_file}
[full]
[torch]
peer = torch-eager
[torch-small]
peer = torch-eager
max_length = 32
models = m1
"""


class PeerSections(unittest.TestCase):
    def assertError(self, text, *needles):
        with self.assertRaises(kvbench.SweepError) as cm:
            parse(text)
        for n in needles:
            self.assertIn(n, str(cm.exception))

    def test_parse(self):
        s = parse("[sweep]\nmodels = a, b\nlengths = 8\nbackends = cpu, cuda\n[full]\n[torch]\npeer = torch-eager\n"
                  "[hf]\npeer = transformers\nmodels = b\nmax_length = 64\n")
        self.assertEqual([c["peer"] for c in s["configs"]], [None, "torch-eager", "transformers"])
        self.assertEqual(s["configs"][2]["models"], ["b"])
        self.assertEqual(s["configs"][2]["max_length"], 64)
        pts = kvbench.grid_points(s)
        cpu_a = [p for p in pts if p["backend"] == "cpu" and p["model"] == "a"][0]
        cuda_b = [p for p in pts if p["backend"] == "cuda" and p["model"] == "b"][0]
        torch, hf = s["configs"][1], s["configs"][2]
        self.assertTrue(kvbench.config_applies(torch, cpu_a))
        self.assertFalse(kvbench.config_applies(torch, cuda_b))   # torch-eager is the CPU peer
        self.assertTrue(kvbench.config_applies(hf, cuda_b))
        self.assertFalse(kvbench.config_applies(hf, cpu_a))       # transformers only on cuda
        self.assertEqual(kvbench.plugin_files(torch), [])

    def test_errors(self):
        base = "[sweep]\nmodels = a\nlengths = 8\n[full]\n"
        self.assertError(base + "[p]\npeer = vllm\n", "s.ini", "[p]", "vllm", "unknown peer", "torch-eager")
        self.assertError(base + "[p]\npeer = torch-eager\nconfig = ../configs/full.ini\n", "[p]", "'config'",
                         "takes only")
        self.assertError(base + "[p]\npeer = torch-eager\nplugins = h2o.so\n", "[p]", "'plugins'")
        self.assertError(base + "[p]\npeer = torch-eager\nbudget_ratio = 0.5\n", "[p]", "'budget_ratio'")
        self.assertError(base + "[p]\npeer = transformers\n", "[p]", "transformers", "cuda", "backends")
        self.assertError("[sweep]\nmodels = a\nlengths = 8\nbackends = cuda\n[full]\n[p]\npeer = torch-eager\n",
                         "[p]", "torch-eager", "cpu")
        self.assertError(base + "[p]\npeer = torch-eager\nmodels = zz\n", "[p]", "zz")

    def test_latency_stats_like_kvhost(self):
        # kvhost (host/util/metrics.c): percentile at rank q*(n-1), linear between neighbours
        st = kvbench.latency_stats([4.0, 1.0, 3.0, 2.0, 10.0])
        self.assertEqual(st["n"], 5)
        self.assertAlmostEqual(st["median_ms"], 3.0)
        self.assertAlmostEqual(st["p10_ms"], 1.4)   # rank 0.4: 1 + 0.4 * (2 - 1)
        self.assertAlmostEqual(st["p90_ms"], 7.6)   # rank 3.6: 4 + 0.6 * (10 - 4)
        self.assertAlmostEqual(st["mean_ms"], 4.0)
        self.assertEqual((st["min_ms"], st["max_ms"]), (1.0, 10.0))


class PeerRuns(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="kvbench-peer-test-")
        self.sweep = os.path.join(self.dir, "p.ini")
        evf = os.path.join(self.dir, "text.txt")
        with open(evf, "w") as f:
            f.write("hello\n")
        with open(self.sweep, "w") as f:
            f.write(PEER_SWEEP.format(eval_file=evf))
        self.work = os.path.join(self.dir, "work")
        self.log = os.path.join(self.dir, "peer.log")
        self.env = dict(os.environ)
        os.environ["FAKE_PEER_LOG"] = self.log
        os.environ.pop("FAKE_PEER_FAIL", None)
        os.environ.pop("KVBENCH_TORCH_PEER", None)

    def tearDown(self):
        os.environ.clear()
        os.environ.update(self.env)
        shutil.rmtree(self.dir)

    def run_sweep(self, *extra):
        out = os.path.join(self.dir, "r.jsonl")
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = kvbench.main(["run", self.sweep, "--kvhost", FAKE, "--out", out, "--work", self.work,
                               "--no-eval", *extra])
        recs = []
        if os.path.exists(out):
            with open(out) as f:
                recs = [json.loads(x) for x in f if x.strip()]
        return rc, recs, err.getvalue()

    def peer_calls(self):
        if not os.path.exists(self.log):
            return []
        with open(self.log) as f:
            return [json.loads(x) for x in f]

    def test_peer_records_beside_kvhost_with_every_schema_field(self):
        rc, recs, err = self.run_sweep("--torch-peer", shlex.join([sys.executable, FAKE_PEER]))
        self.assertEqual(rc, 0, err)
        gen = [r for r in recs if r["record"] == "generate"]
        order = [(r["model"]["name"], r["batch"], r["prompt_tokens"][0], r["tags"]["config"]) for r in gen]
        # T=1020 + max_new 8 passes n_positions: kvhost and the peer both skip it with a note
        self.assertEqual(order, [
            ("random:gpt2", 1, 32, "full"), ("random:gpt2", 1, 32, "torch"),
            ("random:gpt2", 2, 32, "full"), ("random:gpt2", 2, 32, "torch"),
            ("m1", 1, 32, "full"), ("m1", 1, 32, "torch"), ("m1", 1, 32, "torch-small"),
            ("m1", 2, 32, "full"), ("m1", 2, 32, "torch"), ("m1", 2, 32, "torch-small")])
        self.assertIn("note: skipping [torch] peer torch-eager m1 T=1020 B=2 cpu: fake_peer.py: --prompt-tokens 1020 "
                      "+ --max-new 8 exceeds n_positions 1024", err)
        peers = [r for r in gen if r.get("peer")]
        self.assertEqual(report.check_schema([(f"r:{i}", r) for i, r in enumerate(peers)]), [])
        for r in peers:
            for f in report.GENERATE_FIELDS:
                self.assertTrue(report.has(r, f), f)
            self.assertEqual(r["peer"], "torch-eager")
            self.assertEqual(r["peer_version"], "fake 9.9")
            self.assertIsNone(r["kv_bytes_peak"])
            self.assertIsNone(r["kv_bytes_held"])
            self.assertEqual(set(r["phase_ms"]), set(report.PHASES))
            self.assertTrue(all(v is None for v in r["phase_ms"].values()))
            self.assertEqual(r["tags"]["sweep"], "p.ini")
            self.assertEqual(r["threads"], 2)
            self.assertEqual((r["warmup_runs"], r["repeats"]), (1, 2))
            self.assertEqual(r["prompt_tokens"], [32] * r["batch"])
            # steps 1,2,3,4 ms in each of 2 repeats, pooled: sorted 1,1,2,2,3,3,4,4
            ds = r["decode_step"]
            self.assertEqual(ds["n"], 8)
            self.assertAlmostEqual(ds["median_ms"], 2.5)
            self.assertAlmostEqual(ds["p10_ms"], 1.0)
            self.assertAlmostEqual(ds["p90_ms"], 4.0)
            self.assertAlmostEqual(r["decode_tokens_per_s"], 8 * r["batch"] / 0.020)
            self.assertAlmostEqual(r["prefill_ms"], 10.0)
            self.assertAlmostEqual(r["total_ms"], 20.0)
        # only kvhost configurations get capacity records
        self.assertEqual({r["tags"]["config"] for r in recs if r["record"] == "capacity"}, {"full"})
        # the peer ran the same shapes as kvhost
        calls = [c for c in self.peer_calls() if c[0] == "peer"]
        self.assertEqual(len(calls), len(peers) + 4)  # + [torch] at T=1020 (2 models x 2 batches), skipped
        calls = [c for c in calls if dict(zip(c[1::2], c[2::2]))["--prompt-tokens"] == "32"]
        opts = dict(zip(calls[0][1::2], calls[0][2::2]))
        self.assertEqual((opts["--prompt-tokens"], opts["--max-new"], opts["--warmup"], opts["--repeats"],
                          opts["--threads"], opts["--batch"]), ("32", "8", "1", "2", "2", "1"))
        # random:gpt2 -> one checkpoint written once into --work, loaded at every point; m1 loaded directly
        makes = [c for c in self.peer_calls() if c[0] == "make-checkpoint"]
        self.assertEqual(len(makes), 1)
        self.assertEqual(makes[0][2:], ["--preset", "gpt2", "--seed", "1234"])
        ck = os.path.join(self.work, "gpt2-seed1234")
        self.assertTrue(os.path.isfile(os.path.join(ck, "config.json")))
        dirs = [dict(zip(c[1::2], c[2::2]))["--model-dir"] for c in calls]
        self.assertEqual(dirs, [ck, ck, "m1", "m1", "m1", "m1"])
        self.assertEqual([r["model"]["name"] for r in peers], ["random:gpt2"] * 2 + ["m1"] * 4)
        self.assertTrue(peers[0]["model"]["random_weights"])
        # a second run reuses the checkpoint
        os.remove(os.path.join(self.dir, "r.jsonl"))
        self.run_sweep("--torch-peer", shlex.join([sys.executable, FAKE_PEER]))
        self.assertEqual(len([c for c in self.peer_calls() if c[0] == "make-checkpoint"]), 1)

    def test_peer_that_cannot_run_is_skipped_with_one_note(self):
        os.environ["FAKE_PEER_FAIL"] = "1"
        os.environ["KVBENCH_TORCH_PEER"] = shlex.join([sys.executable, FAKE_PEER])  # the env override
        rc, recs, err = self.run_sweep()
        self.assertEqual(rc, 0, err)
        self.assertFalse([r for r in recs if r.get("peer")])
        self.assertEqual(len([r for r in recs if r["record"] == "generate"]), 4)  # kvhost [full] only
        notes = [ln for ln in err.splitlines() if "skipping peer" in ln]
        self.assertEqual(len(notes), 1, err)
        self.assertIn("[torch]", notes[0])
        self.assertIn("No module named 'torch'", notes[0])
        self.assertFalse([c for c in self.peer_calls() if c[0] != "check"])   # nothing else attempted
        self.assertFalse(os.path.exists(self.work))

    def test_peer_failure_counts_and_writes_nothing(self):
        bad = os.path.join(self.dir, "bad_peer.py")
        with open(bad, "w") as f:
            f.write("import sys, json\nif sys.argv[1] == 'check':\n    print(json.dumps({'peer_version': 'x'}))\n"
                    "    sys.exit(0)\nif sys.argv[1] == 'make-checkpoint':\n    import os; os.makedirs(sys.argv[2]);"
                    " [open(os.path.join(sys.argv[2], n), 'w').close() for n in ('config.json', 'model.safetensors')]"
                    "\n    sys.exit(0)\nprint('no record here')\n")
        rc, recs, err = self.run_sweep("--torch-peer", shlex.join([sys.executable, bad]))
        self.assertEqual(rc, 1)
        self.assertIn("FAILED [torch] peer torch-eager", err)
        self.assertIn("no complete peer_run JSON line", err)
        self.assertFalse([r for r in recs if r.get("peer")])

    def test_emit_carries_peer_options(self):
        p = subprocess.run([sys.executable, os.path.join(REPO, "bench", "kvbench.py"), "emit", self.sweep,
                            "--parallel", "--kvhost", FAKE, "--out-dir", self.dir, "--work", self.work,
                            "--torch-peer", "py fake.py"], capture_output=True, text=True)
        self.assertEqual(p.returncode, 0, p.stderr)
        first = shlex.split(p.stdout.splitlines()[0])
        self.assertEqual(first[-4:], ["--work", self.work, "--torch-peer", "py fake.py"])

    def test_validate_counts_peer_runs(self):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            self.assertEqual(kvbench.main(["validate", self.sweep]), 0)
        # 8 points; full: 8, torch: 8, torch-small: m1 x T=32 x B 1,2 = 2
        self.assertIn("1 configurations, 2 peers, 8 grid points, 8 kvhost runs, 10 peer runs", out.getvalue())


if __name__ == "__main__":
    unittest.main()
