"""Fuzzing of the sweep-file parser (bench/kvbench.py parse_sweep_text), issue 14.

Invariant: for any text, the parser returns a sweep or raises SweepError (a message naming the file and
the key); any other exception is a bug (a traceback instead of a message). Inputs are mutations of the
committed corpus (tests/fuzz/corpus/sweep/: the shipped sweeps plus regressions) built from INI syntax,
the parser's own keys and values that break naive conversions (5000-digit numbers, nan, NUL, surrogates,
non-ASCII digits). The unittest replays the corpus and runs a fixed-seed batch (seconds, in CI);
`python3 tests/bench/test_sweep_fuzz.py --seconds 300` fuzzes for longer, prints execs, and writes any
failing input to tests/fuzz/corpus/sweep/regress-<hash> (then fix the parser and keep the file).
"""
import hashlib
import os
import random
import sys
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "bench"))
import kvbench  # noqa: E402

CORPUS = os.path.join(REPO, "tests", "fuzz", "corpus", "sweep")

TOKENS = (["[", "]", "=", ":", ",", ";", "#", "\n", "\n[sweep]\n", "\n[c]\n", " ", "\t", "%", "%(x)s", "\x00",
           "\ud800", "\u0663", "\uff11", "é", "1", "0", "-1", "1.5", "nan", "inf", "1e999", "9" * 5000,
           "true", "maybe", "256M", "2G", "1.5Ki", "cpu", "cuda", "gpu", "a.b=c", "x;y", "../x", "/abs",
           "\r", "\\", "\"", "'"] + list(kvbench.SWEEP_KEYS) + list(kvbench.CONFIG_KEYS) + list(kvbench.PEERS))


def seeds():
    out = []
    for name in sorted(os.listdir(CORPUS)):
        with open(os.path.join(CORPUS, name), encoding="utf-8", errors="surrogateescape") as f:
            out.append(f.read())
    return out


def mutate(rng, text, pool):
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(6)
        pos = rng.randint(0, len(text))
        if op == 0:
            text = text[:pos] + rng.choice(TOKENS) + text[pos:]
        elif op == 1 and text:
            end = min(len(text), pos + rng.randint(1, 40))
            text = text[:pos] + text[end:]
        elif op == 2:
            other = rng.choice(pool)
            a = rng.randint(0, len(other))
            text = text[:pos] + other[a:a + rng.randint(1, 200)] + text[pos:]
        elif op == 3:
            lines = text.split("\n")
            rng.shuffle(lines)
            text = "\n".join(lines)
        elif op == 4:
            lines = text.split("\n")
            if lines:
                i = rng.randrange(len(lines))
                lines.insert(rng.randrange(len(lines) + 1), lines[i])
            text = "\n".join(lines)
        else:
            key = rng.choice(list(kvbench.SWEEP_KEYS) + list(kvbench.CONFIG_KEYS))
            text = text[:pos] + "\n" + key + " = " + "".join(rng.choice(TOKENS) for _ in range(rng.randint(1, 4))) + \
                "\n" + text[pos:]
    return text


def check(text):
    """None when the parser keeps its contract on text, else a description of the broken contract."""
    try:
        kvbench.parse_sweep_text(text, "fuzz.ini")
    except kvbench.SweepError as e:
        if not str(e).startswith("fuzz.ini"):
            return f"SweepError without the file name: {e}"
    except Exception as e:  # noqa: BLE001 - any other exception is exactly what is being looked for
        return f"{type(e).__name__}: {e}"
    return None


def fuzz(seconds=None, iterations=None, seed=1):
    rng = random.Random(seed)
    pool = seeds()
    start, n, failures = time.time(), 0, []
    while (iterations is None or n < iterations) and (seconds is None or time.time() - start < seconds):
        text = mutate(rng, rng.choice(pool), pool)
        n += 1
        problem = check(text)
        if problem:
            failures.append((text, problem))
            if len(failures) >= 5:
                break
    return n, time.time() - start, failures


class SweepFuzz(unittest.TestCase):
    def test_corpus_replay(self):
        for text, name in zip(seeds(), sorted(os.listdir(CORPUS))):
            self.assertIsNone(check(text), name)

    def test_known_breakers(self):
        # each of these once escaped as a traceback (or would with a naive parser)
        for value in ("9" * 5000, "\u0663", "nan", "1e999", "\x00"):
            for key in ("lengths", "repeats", "mem_limit", "eval_file", "threads"):
                text = f"[sweep]\nmodels = m\nlengths = 8\n{key} = {value}\n[c]\n"
                if key == "lengths":
                    text = f"[sweep]\nmodels = m\nlengths = {value}\n[c]\n"
                self.assertIsNone(check(text), f"{key} = {value[:20]!r}")
        for value in ("9" * 5000, "nan", "-0", "\x00"):
            self.assertIsNone(check(f"[sweep]\nmodels = m\nlengths = 8\n[c]\nbudget_ratio = {value}\n"), value[:20])
            self.assertIsNone(check(f"[sweep]\nmodels = m\nlengths = 8\n[c]\nmax_length = {value}\n"), value[:20])
            self.assertIsNone(check(f"[sweep]\nmodels = m\nlengths = 8\n[c]\nconfig = {value}\n"), value[:20])

    def test_fixed_seed_batch(self):
        n, secs, failures = fuzz(iterations=3000, seed=14)
        msg = "\n".join(f"{p}\n  input: {t[:300]!r}" for t, p in failures)
        self.assertFalse(failures, msg)


def main():
    secs = float(sys.argv[sys.argv.index("--seconds") + 1]) if "--seconds" in sys.argv else 60.0
    n, took, failures = fuzz(seconds=secs, seed=int(time.time()))
    print(f"sweep fuzz: {n} inputs in {took:.0f} s, {len(failures)} failures")
    for text, problem in failures:
        h = hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()
        path = os.path.join(CORPUS, "regress-" + h[:16])
        with open(path, "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write(text)
        print(f"  {problem}\n  saved {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
