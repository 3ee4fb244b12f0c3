"""Tests of bench/report.py: the markdown tables from a fixed small JSON Lines fixture (expected text
written by hand from the fixture's numbers), peer series (fixtures/peer.jsonl: a torch-eager peer beside
the kvhost configurations), the schema check, and plotting when matplotlib is present."""
import copy
import json
import os
import shutil
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "bench"))
import report  # noqa: E402

FIXTURE = os.path.join(HERE, "fixtures", "small.jsonl")
PEER_FIXTURE = os.path.join(HERE, "fixtures", "peer.jsonl")
BATCH_FIXTURE = os.path.join(HERE, "fixtures", "batch.jsonl")  # small.jsonl's full/h2o again at batch 4

GEN_TABLE = """\
| config | T | prefill ms | decode ms/step p50 [p10, p90] | tokens/s | KV held MiB | KV peak MiB | peak RSS MiB | runs |
|---|---:|---:|---:|---:|---:|---:|---:|---:|
| full | 32 | 12.3 | 2.50 [2.25, 3.12] | 400.0 | 1.000 | 1.000 | 80 | 1+3 |
| full | 64 | 20.0 | 3.00 [2.90, 3.50] | 333.3 | 2.000 | 2.000 | 84 | 1+3 |
| h2o | 32 | 13.0 | 2.75 [2.50, 3.00] | 363.6 | 0.500 | 0.500 | 80 | 1+3 |
| h2o | 64 | 21.5 | 3.25 [3.00, 4.00] | 307.7 | 0.750 | 1.000 | 84 | 1+3 |"""

PHASE_TABLE = """\
| config | T | embed | attn_proj | attn_core | mlp | lm_head | plugin_hooks | other | total ms |
|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|
| full | 64 | 0.5 | 10.0 | 5.2 | 20.0 | 8.0 | 0.0 | 1.0 | 70.0 |
| h2o | 64 | 0.5 | 10.0 | 5.2 | 20.0 | 8.0 | 2.2 | 1.0 | 75.2 |"""

CAP_TABLE = """\
| model | config | T | KV cap | max batch | probes (batch:fits) |
|---|---|---:|---|---:|---|
| tiny | full | 256 | 16M | 5 | 1:y, 2:y, 4:y, 8:n, 6:n, 5:y |"""

EVAL_TABLE = """\
| model | config | mode | ctx | ppl | full-cache ppl | KL mean | top-1 agreement |
|---|---|---|---:|---:|---:|---:|---:|
| tiny | h2o | stream | 128 | 35.125 | 34.000 | 0.0123 | 0.938 |"""


class Tables(unittest.TestCase):
    def setUp(self):
        self.records = report.read_records([FIXTURE])
        self.d = report.Data(self.records)

    def test_generate_table(self):
        self.assertEqual(report.table_generate(self.d, "tiny", "cpu", 1), GEN_TABLE)

    def test_phase_table(self):
        self.assertEqual(report.table_phases(self.d, "tiny", "cpu", 1), PHASE_TABLE)

    def test_capacity_and_eval_tables(self):
        self.assertEqual(report.table_capacity(self.d), CAP_TABLE)
        self.assertEqual(report.table_eval(self.d), EVAL_TABLE)

    def test_last_record_wins(self):
        recs = copy.deepcopy(self.records)
        newer = copy.deepcopy(recs[0][1])
        newer["prefill_ms"] = 99.0
        recs.append(("x:1", newer))
        self.assertIn("| full | 32 | 99.0 |", report.table_generate(report.Data(recs), "tiny", "cpu", 1))

    def test_whole_report_contains_tables_and_provenance(self):
        text = report.build_report(self.records, None, "python3 bench/kvbench.py run s.ini --out r.jsonl")
        for t in (GEN_TABLE, PHASE_TABLE, CAP_TABLE, EVAL_TABLE):
            self.assertIn(t, text)
        self.assertIn("- commit: abc123", text)
        self.assertIn("- machine: box (Test CPU, 2 cores)", text)
        self.assertIn("python3 bench/kvbench.py run s.ini --out r.jsonl", text)


PEER_ROWS = """\
| torch | 32 | 15.0 | 3.00 [2.50, 3.50] | 333.3 | - | - | 300 | 1+3 |
| torch | 64 | 25.0 | 4.00 [3.00, 5.00] | 250.0 | - | - | 310 | 1+3 |"""


class Peers(unittest.TestCase):
    def setUp(self):
        self.records = report.read_records([FIXTURE, PEER_FIXTURE])
        self.d = report.Data(self.records)

    def test_peer_rows_follow_the_kvhost_rows(self):
        self.assertEqual(report.table_generate(self.d, "tiny", "cpu", 1), GEN_TABLE + "\n" + PEER_ROWS)

    def test_peer_left_out_of_phases_and_named(self):
        self.assertEqual(report.table_phases(self.d, "tiny", "cpu", 1), PHASE_TABLE)
        self.assertEqual(self.d.peers, {"torch": "torch-eager (torch 1.13.1)"})
        self.assertEqual(self.d.label("torch"), "torch [torch-eager peer]")
        self.assertEqual(self.d.label("h2o"), "h2o")
        text = report.build_report(self.records)
        self.assertIn(GEN_TABLE + "\n" + PEER_ROWS + "\n\nPeers (not kvhost;", text)
        self.assertIn("`torch` = torch-eager (torch 1.13.1)", text)
        self.assertIn("- peers: torch-eager (torch 1.13.1; bench/torch_gpt2.py: eager PyTorch, fp32)", text)
        self.assertNotIn("Peers (not kvhost", report.build_report(report.read_records([FIXTURE])))

    def test_peer_schema(self):
        self.assertEqual(report.check_schema(self.records), [])
        recs = report.read_records([PEER_FIXTURE])
        del recs[0][1]["peer_version"]
        del recs[1][1]["phase_ms"]
        probs = report.check_schema(recs)
        self.assertIn(f"{PEER_FIXTURE}:1 (generate, peer torch-eager): missing field peer_version", probs)
        self.assertIn(f"{PEER_FIXTURE}:2 (generate): missing field phase_ms.embed", probs)

    def test_plots_with_peers(self):
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            self.skipTest("matplotlib not installed (python3-matplotlib): plots not tested")
        out = tempfile.mkdtemp(prefix="report-peer-test-")
        try:
            self.assertEqual(report.main([FIXTURE, PEER_FIXTURE, "--out", out]), 0)
            for f in ("latency-vs-T-tiny-cpu-b1.png", "per-token-vs-T-tiny-cpu-b1.png", "memory-vs-T-tiny-cpu-b1.png",
                      "phases-tiny-cpu-b1.png", "pareto-tiny-cpu-b1.png"):
                self.assertIn(f, os.listdir(out))
        finally:
            shutil.rmtree(out)


THROUGHPUT_TABLE = """\
| config | T | B=1 tokens/s | B=4 tokens/s | B=4 / B=1 |
|---|---:|---:|---:|---:|
| full | 64 | 333.3 | 900.0 | 2.70x |
| h2o | 64 | 307.7 | 800.0 | 2.60x |"""


class Throughput(unittest.TestCase):
    """Throughput against batch size: h2o ran T=32 only at batch 1, so its row (like full's) is at T=64,
    the largest T measured under both batch sizes."""

    def setUp(self):
        self.records = report.read_records([FIXTURE, BATCH_FIXTURE])
        self.d = report.Data(self.records)

    def test_table_at_the_largest_common_length(self):
        self.assertEqual(self.d.batch_sizes("tiny", "cpu"), [1, 4])
        self.assertEqual(report.table_throughput(self.d, "tiny", "cpu"), THROUGHPUT_TABLE)
        text = report.build_report(self.records)
        self.assertIn("## tiny — cpu, throughput against batch size", text)
        self.assertIn(THROUGHPUT_TABLE, text)
        self.assertIn("## tiny — cpu, batch 4", text)

    def test_no_table_with_one_batch_size(self):
        d = report.Data(report.read_records([FIXTURE]))
        self.assertIsNone(d.throughput_points("tiny", "cpu", "full"))
        self.assertEqual(report.table_throughput(d, "tiny", "cpu"), "")
        self.assertNotIn("throughput against batch size", report.build_report(report.read_records([FIXTURE])))

    def test_plot_written(self):
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            self.skipTest("matplotlib not installed (python3-matplotlib): plots not tested")
        out = tempfile.mkdtemp(prefix="report-batch-test-")
        try:
            self.assertEqual(report.main([FIXTURE, BATCH_FIXTURE, "--out", out]), 0)
            files = set(os.listdir(out))
            self.assertIn("throughput-vs-batch-tiny-cpu.png", files)
            self.assertIn("latency-vs-T-tiny-cpu-b4.png", files)
        finally:
            shutil.rmtree(out)


class Schema(unittest.TestCase):
    def test_fixture_is_complete(self):
        self.assertEqual(report.check_schema(report.read_records([FIXTURE])), [])

    def test_missing_fields_are_named(self):
        recs = report.read_records([FIXTURE])
        del recs[0][1]["phase_ms"]["plugin_hooks"]
        del recs[1][1]["decode_step"]
        del recs[4][1]["max_batch"]
        probs = report.check_schema(recs)
        self.assertIn(f"{FIXTURE}:1 (generate): missing field phase_ms.plugin_hooks", probs)
        self.assertIn(f"{FIXTURE}:2 (generate): missing field decode_step.median_ms", probs)
        self.assertIn(f"{FIXTURE}:5 (capacity): missing field max_batch", probs)

    def test_committed_results_have_every_field(self):
        path = os.path.join(REPO, "docs", "results", "bench", "results.jsonl")
        if not os.path.exists(path):
            self.skipTest("no committed docs/results/bench/results.jsonl")
        self.assertEqual(report.check_schema(report.read_records([path])), [])


class Plots(unittest.TestCase):
    def test_plots_written(self):
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            self.skipTest("matplotlib not installed (python3-matplotlib): plots not tested")
        out = tempfile.mkdtemp(prefix="report-test-")
        try:
            self.assertEqual(report.main([FIXTURE, "--out", out]), 0)
            files = set(os.listdir(out))
            for f in ("README.md", "latency-vs-T-tiny-cpu-b1.png", "per-token-vs-T-tiny-cpu-b1.png",
                      "memory-vs-T-tiny-cpu-b1.png", "phases-tiny-cpu-b1.png", "pareto-tiny-cpu-b1.png",
                      "max-batch.png", "perplexity-tiny.png"):
                self.assertIn(f, files)
            with open(os.path.join(out, "README.md")) as fh:
                self.assertIn("](pareto-tiny-cpu-b1.png):", fh.read())
        finally:
            shutil.rmtree(out)


if __name__ == "__main__":
    unittest.main()
