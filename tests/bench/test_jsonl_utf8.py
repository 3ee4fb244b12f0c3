"""Tests of the bench tools over record files whose bytes are not all UTF-8 or not all records (issue 14):
kvbench.py merge, report.py and report_eval.py (report_quant.py shares bench/jsonl.py) read such a file without a traceback, read bad bytes as U+FFFD (kvhost's own repair rule) and name FILE:LINE in a
warning; a line that is not a record is skipped by the reports (named), refused by merge (named)."""
import contextlib
import io
import json
import os
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "bench"))
import jsonl  # noqa: E402
import kvbench  # noqa: E402
import report  # noqa: E402
import report_eval  # noqa: E402

# Raw bytes as an older kvhost wrote them from `--tag k=$'\xff'`, a model directory name or a version.
BAD_LINES = [
    b'{"record":"generate","tags":{"config":"a\xffb"},"x":1}\n',
    b'{"record":"generate","model":{"name":"dir-\xc3(\xed\xa0\x80"},"x":2}\n',
    b'{"record":"generate","plugins":{"instances":[{"version":"1.0-\xfe"}]},"x":3}\n',
]
GOOD_LINE = '{"record":"generate","tags":{"config":"caf\u00e9"},"x":4}\n'.encode()


class Utf8(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.dir = self.tmp.name
        self.bad = os.path.join(self.dir, "bad.jsonl")
        with open(self.bad, "wb") as f:
            f.write(b"".join(BAD_LINES) + GOOD_LINE)

    def tearDown(self):
        self.tmp.cleanup()

    def run_quiet(self, fn, *args):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            out = fn(*args)
        return out, err.getvalue()

    def test_lines_replace_like_python_and_kvhost(self):
        got, err = self.run_quiet(lambda: list(jsonl.lines(self.bad, "t")))
        want = [line.decode("utf-8", "replace").strip() for line in BAD_LINES + [GOOD_LINE]]
        self.assertEqual([t for _, t in got], want)
        for n in (1, 2, 3):
            self.assertIn(f"t: {self.bad}:{n}: invalid UTF-8", err)
        self.assertNotIn(f"{self.bad}:4:", err)

    def test_merge_writes_valid_utf8(self):
        out = os.path.join(self.dir, "all.jsonl")
        n, err = self.run_quiet(kvbench.merge_files, [self.bad], out)
        self.assertEqual(n, 4)
        with open(out, "rb") as f:
            data = f.read()
        text = data.decode("utf-8")  # strict: raises if any byte is still invalid
        recs = [json.loads(line) for line in text.splitlines()]
        self.assertEqual(recs[0]["tags"]["config"], "a\ufffdb")
        self.assertEqual(recs[3]["tags"]["config"], "caf\u00e9")
        self.assertIn(f"{self.bad}:1: invalid UTF-8 (byte 0xff at column 41)", err)

    def test_merge_names_a_line_that_is_not_json(self):
        with open(self.bad, "ab") as f:
            f.write(b'{"record":"generate","x":5,"torn\n')
        with self.assertRaises(kvbench.SweepError) as cm:
            self.run_quiet(kvbench.merge_files, [self.bad], os.path.join(self.dir, "x.jsonl"))
        self.assertIn(f"{self.bad}:5: not a JSON record", str(cm.exception))

    def test_merge_names_an_unreadable_file(self):
        with self.assertRaises(kvbench.SweepError) as cm:
            kvbench.merge_files([os.path.join(self.dir, "nope.jsonl")], os.path.join(self.dir, "x.jsonl"))
        self.assertIn("nope.jsonl: cannot read", str(cm.exception))

    def test_report_reads_and_skips_torn_lines(self):
        with open(self.bad, "ab") as f:
            f.write(b'{"record":"generate","x":5,"torn\n[1,2]\n')
        recs, err = self.run_quiet(report.read_records, [self.bad])
        self.assertEqual([r["x"] for _, r in recs], [1, 2, 3, 4])
        self.assertEqual(recs[1][0], f"{self.bad}:2")
        self.assertIn(f"report: {self.bad}:5: not a JSON record", err)
        self.assertIn(f"report: {self.bad}:6: not a JSON object; skipped", err)

    def test_report_eval_reads_invalid_utf8(self):
        path = os.path.join(self.dir, "eval.jsonl")
        with open(path, "wb") as f:
            f.write(b'{"record":"eval","mode":"stream","tags":{"policy":"h2o","budget":"64"},'
                    b'"text_file":"/data/t\xffext.txt","ppl":12.5}\n')
        (runs, mc), err = self.run_quiet(report_eval.load, path)
        self.assertEqual(list(runs), [("t\ufffdext.txt", "h2o", 64)])
        self.assertIn(f"{path}:1: invalid UTF-8", err)


if __name__ == "__main__":
    unittest.main()
