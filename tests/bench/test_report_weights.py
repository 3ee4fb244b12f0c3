"""Tests of bench/report_weights.py (issue #21's weight-format report) against fixtures/weights_bench.jsonl,
whose expected figures are worked out by hand in the comments below. Standard library only."""
import io
import os
import sys
import unittest
from contextlib import redirect_stderr, redirect_stdout

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(HERE)), "bench"))
import report_weights  # noqa: E402

FIXTURE = os.path.join(HERE, "fixtures", "weights_bench.jsonl")


class ReportWeights(unittest.TestCase):
    def run_report(self):
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            rc = report_weights.main(["report_weights.py", FIXTURE])
        self.assertEqual(rc, 0)
        return out.getvalue(), err.getvalue()

    def test_speed_rows(self):
        text, _ = self.run_report()
        # fp32 decode 10, 12, 11 -> 11; prefill 512 tokens in 5.0 s and 4.0 s -> 102.4 and 128 tok/s -> 115.2
        self.assertIn("| fp32 | 1 | 11.00 (10.00–12.00) | 1.00x | 115.20 (102.40–128.00) | 1.00x | 1400 | 1400 | 100 | 0.50 |", text)
        # w8 decode 30, 36, 33 -> 33 = 3.00x; prefill 128, 128 -> 128 = 1.11x
        self.assertIn("| w8 | 1 | 33.00 (30.00–36.00) | 3.00x | 128.00 (128.00–128.00) | 1.11x | 380 | 380 | 100 | 0.50 |", text)

    def test_quality_rows(self):
        text, _ = self.run_report()
        # ppl 402 against 400: +0.500 %
        self.assertIn("| book.txt | w8 | 402.000 | +0.500 % | 1.50e-05 | 1.50e-04 | 99.00 % |", text)
        self.assertIn("| book.txt | fp32 | 400.000 | +0.000 % |", text)

    def test_bad_line_is_reported_not_fatal(self):
        _, err = self.run_report()
        self.assertIn("weights_bench.jsonl:15: not JSON, skipped", err)


if __name__ == "__main__":
    unittest.main()
