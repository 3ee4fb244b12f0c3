"""Tests of bench/serve/report.py (issue #17's load comparison) against fixtures/serve_load.jsonl; the
expected medians and ratios are worked out by hand in the comments. Standard library only."""
import importlib.util
import io
import os
import sys
import tempfile
import unittest
from contextlib import redirect_stderr, redirect_stdout

HERE = os.path.dirname(os.path.abspath(__file__))
# bench/report.py is also "report" (test_report.py imports it): load this one under its own name
_spec = importlib.util.spec_from_file_location(
    "serve_report", os.path.join(os.path.dirname(os.path.dirname(HERE)), "bench", "serve", "report.py"))
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)

FIXTURE = os.path.join(HERE, "fixtures", "serve_load.jsonl")


class ReportServe(unittest.TestCase):
    def run_report(self, *extra):
        out, err = io.StringIO(), io.StringIO()
        with tempfile.TemporaryDirectory() as d, redirect_stdout(out), redirect_stderr(err):
            rc = report.main(["report.py", FIXTURE, "--out", d, *extra])
            table = open(os.path.join(d, "table.md")).read() if rc == 0 else ""
        return rc, out.getvalue(), err.getvalue(), table

    def test_medians_ranges_and_totals(self):
        rc, text, _, table = self.run_report()
        self.assertEqual(rc, 0)
        self.assertEqual(text, table)
        # kvhost rounds: req/s 0.5, 0.4, 0.6 -> 0.50 (0.40–0.60); tokens/s 30, 26, 34 -> 30; TTFT p50 1000,
        # 1200, 800 -> 1000; p99 2000, 2400, 1600 -> 2000; TPOT p50 250, 270, 230 -> 250; p99 300, 320, 280
        # -> 300; 30 + 24 + 36 = 90 requests, 0 errors
        self.assertIn("| kvhost | 3 | 90 | 0.50 (0.40–0.60) | 30.00 (26.00–34.00) | 1000 (800–1200) | "
                      "2000 (1600–2400) | 250 (230–270) | 300 (280–320) | 0 |", table)
        # llama-server: 0.25, 0.2, 0.3 -> 0.25; 16, 12, 20 -> 16; 3000, 4000, 2000 -> 3000; 5000, 6000,
        # 4000 -> 5000; 500, 550, 450 -> 500; 600, 700, 500 -> 600; 45 requests, 1 error
        self.assertIn("| llama-server | 3 | 45 | 0.25 (0.20–0.30) | 16.00 (12.00–20.00) | 3000 (2000–4000) | "
                      "5000 (4000–6000) | 500 (450–550) | 600 (500–700) | 1 |", table)

    def test_advantage_row(self):
        _, _, _, table = self.run_report()
        # rates kvhost / llama: 0.5 / 0.25 = 2.00x, 30 / 16 = 1.88x (1.875); latencies llama / kvhost:
        # 3000 / 1000 = 3.00x, 5000 / 2000 = 2.50x, 500 / 250 = 2.00x, 600 / 300 = 2.00x
        self.assertIn("| kvhost advantage (medians) | | | 2.00x | 1.88x | 3.00x | 2.50x | 2.00x | 2.00x | |", table)

    def test_since_keeps_one_run_and_bad_lines_are_warned(self):
        rc, _, err, table = self.run_report("--since", "2026-12-05T04:03:00Z")
        self.assertEqual(rc, 0)
        self.assertIn("serve_load.jsonl:4: not a JSON record", err)
        # kvhost rounds 2 and 3 only: req/s median of 0.4 and 0.6 = 0.50, requests 60
        self.assertIn("| kvhost | 2 | 60 | 0.50 (0.40–0.60) |", table)
        self.assertIn("| llama-server | 1 | 18 | 0.30 (0.30–0.30) |", table)

    def test_no_records_is_an_error(self):
        rc, _, err, _ = self.run_report("--since", "2030-01-01T00:00:00Z")
        self.assertEqual(rc, 1)
        self.assertIn("no serve_load records", err)


if __name__ == "__main__":
    unittest.main()
