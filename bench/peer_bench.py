#!/usr/bin/env python3
"""peer_bench.py — kvhost beside llama.cpp and transformers on the CPU, same weights, interleaved rounds.

Issue #22's side-by-side benchmark. One Hugging Face GPT-2 checkpoint (seeded random weights at gpt2-medium
shapes by default, bench/peers/make_hf_gpt2.py) is run by
  kvhost        `kvhost generate --model DIR --prompt-tokens N --max-new M --json` (fp32; --kvhost may repeat,
                and --kvhost-variant adds runs of the first binary under extra environment variables)
  llama.cpp     `llama-bench -o jsonl` on the checkpoint converted to GGUF F32 and F16 by its
                convert_hf_to_gguf.py (bench/peers/convert_gguf.py; the GGUF files are cached in --gguf-dir)
  transformers  bench/peers/hf_cpu_bench.py: GPT2LMHeadModel, eager attention, fp32 (the peer Python)
at batch 1, every thread count in --threads, on three tests:
  decode128   decode tokens/s after a 128-token prompt, 128 new tokens (llama-bench: -p 0 -n 128 -d 128)
  decode896   decode tokens/s after an 896-token prompt, 128 new tokens (llama-bench: -p 0 -n 128 -d 896)
  prefill512  prefill tokens/s of a 512-token prompt (llama-bench: -p 512 -n 0; kvhost: 512 / prefill_ms)
kvhost and transformers decode: the first new token comes from the prefill and the other M-1 steps are
timed (kvhost's decode_tokens_per_s); llama-bench times its M single-token evaluations at depth N.

Method: --rounds R (default 5). Each round first runs the bandwidth probe (bench/membw.c, OMP_NUM_THREADS=T
for each T), then every (series, test, threads) once, in an order shuffled per round (seeded by --seed);
one process per run, each with --warmup untimed runs of its own (llama-bench: its warm-up run; 0 turns both
off). Around every run: the 1-minute load average before and after, and the CPU time other processes used
during it ("other CPU", in cores: /proc/stat busy time minus this run's own CPU time, over wall time).

Output (--out-dir DIR): DIR/results.jsonl (appended: one `peer_bench_start` record per invocation, one
`membw` record per probe, one `peer_run` record per run, with tool, version/commit, test, threads, prompt
and generated lengths, tokens/s, weight bytes read per decoded token, load, timestamp, and the tool's raw
figures), then DIR/table.md (`summarize`) and DIR/peers.png (`plot`, needs matplotlib) from all of it.

A peer that cannot run here (no llama-bench, no converter, no Python with transformers) is skipped with one
printed note, recorded in the start record's "skipped"; no placeholder records are written.

Building the peers on a Debian 12 machine (2 cores: ~15 min for llama.cpp), outside the repository:
  apt-get update && apt-get install -y python3-torch python3-numpy python3-venv python3-matplotlib cmake g++
  python3 -m venv --system-site-packages /work/peers/venv
  /work/peers/venv/bin/pip install 'transformers==4.44.*' sentencepiece safetensors
  /work/peers/venv/bin/pip download --no-deps --no-binary :all: llama-cpp-python -d /work/peers/src
  bench/peers/build_llama_cpp.sh /work/peers/src/llama_cpp_python-*.tar.gz /work/peers/llama.cpp
  (or: bench/peers/build_llama_cpp.sh DIR_WITH_THE_PUBLIC_LLAMA_CPP_SOURCE /work/peers/llama.cpp)
Then:
  /usr/bin/python3 bench/peer_bench.py run --kvhost build/kvhost --out-dir docs/results/peers
  (defaults: --model /work/peers/models/gpt2-medium-seed1234, made on first use; --llama-dir
  $KVH_LLAMA_DIR or /work/peers/llama.cpp; --peer-python $KVH_PEER_PYTHON or /work/peers/venv/bin/python;
  --gguf-dir /work/peers/gguf; --rounds 5 --threads 1,2; about 15-20 min a round on 2 cores)
  python3 bench/peer_bench.py summarize DIR/results.jsonl          # the table again (stdlib only)
  /usr/bin/python3 bench/peer_bench.py plot DIR/results.jsonl --out DIR/peers.png
"""
import argparse
import datetime
import json
import os
import platform
import random
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

TESTS = {  # name: (kind, prompt tokens, generated tokens, label)
    "decode128": ("decode", 128, 128, "decode, 128 + 128"),
    "decode896": ("decode", 896, 128, "decode, 896 + 128"),
    "prefill512": ("prefill", 512, 0, "prefill, 512 tokens"),
}
TEST_ORDER = list(TESTS)
REF_SERIES = "llama.cpp F32"
# --series names of llama.cpp -> (label, GGUF type). q4_0 is made from the F32 GGUF by llama-quantize.
LLAMA_TYPES = {"llama-f32": ("llama.cpp F32", "f32"), "llama-f16": ("llama.cpp F16", "f16"),
               "llama-q8_0": ("llama.cpp Q8_0", "q8_0"), "llama-q4_0": ("llama.cpp Q4_0", "q4_0")}


def note(msg):
    print(f"peer_bench: note: {msg}", file=sys.stderr, flush=True)


def utc_now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------- statistics (also used by the tests)

def median(xs):
    s = sorted(xs)
    n = len(s)
    if n == 0:
        return None
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


# ---------------------------------------------------------------- load measurement

def _cpu_busy_s():
    """Busy seconds of all CPUs since boot from /proc/stat (user+nice+system+irq+softirq; not idle, iowait, steal)."""
    try:
        with open("/proc/stat") as f:
            parts = f.readline().split()
        v = [int(x) for x in parts[1:]]
        busy = v[0] + v[1] + v[2] + v[5] + v[6]
        return busy / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _children_cpu_s():
    import resource
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def measured(cmd, env=None, timeout=None):
    """Runs cmd; returns (CompletedProcess, load dict)."""
    la0 = os.getloadavg()[0]
    b0, c0, t0 = _cpu_busy_s(), _children_cpu_s(), time.monotonic()
    p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout)
    wall = time.monotonic() - t0
    b1, c1 = _cpu_busy_s(), _children_cpu_s()
    other = None
    if b0 is not None and b1 is not None and wall > 0:
        other = max(0.0, ((b1 - b0) - (c1 - c0)) / wall)
    return p, {"load1_before": round(la0, 2), "load1_after": round(os.getloadavg()[0], 2),
               "other_cpu_cores": None if other is None else round(other, 3), "wall_s": round(wall, 2)}


# ---------------------------------------------------------------- series

class Series:
    """One column of the comparison: a tool with a fixed configuration."""
    tool = None

    def __init__(self, name):
        self.name = name
        self.version = None

    def command(self, test, threads, warmup, tmp):
        raise NotImplementedError

    def parse(self, test, p, tmp):
        """-> (tokens_per_s, extra fields dict)."""
        raise NotImplementedError


class Kvhost(Series):
    tool = "kvhost"

    def __init__(self, name, path, model, env=None, args=()):
        super().__init__(name)
        self.path, self.model, self.extra_env, self.extra_args = path, model, env or {}, list(args)

    def probe(self):
        if not (os.path.isfile(self.path) and os.access(self.path, os.X_OK)):
            return f"no executable {self.path}"
        p = subprocess.run([self.path, "--version"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env=self.env())
        self.version = " | ".join(x.strip() for x in p.stdout.strip().splitlines())
        return None

    def env(self):
        e = dict(os.environ)
        e.update(self.extra_env)
        return e

    def command(self, test, threads, warmup, tmp):
        kind, n, m, _ = TESTS[test]
        self.json = os.path.join(tmp, "kvhost.jsonl")
        if os.path.exists(self.json):
            os.unlink(self.json)
        return [self.path, "generate", "--model", self.model, "--prompt-tokens", str(n),
                "--max-new", str(m if kind == "decode" else 1), "--threads", str(threads),
                "--warmup", str(warmup), "--repeats", "1", "--quiet", "--json", self.json] + self.extra_args

    def parse(self, test, p, tmp):
        with open(self.json) as f:
            rec = json.loads(f.read().strip().splitlines()[-1])
        kind, n, _, _ = TESTS[test]
        if kind == "decode":
            tps = rec["decode_tokens_per_s"]
        else:
            tps = n / (rec["prefill_ms"] / 1e3)
        return tps, {"tool_commit": rec.get("commit"), "weight_bytes_per_token": rec.get("weight_bytes_per_token"),
                     "raw": {k: rec.get(k) for k in ("prefill_ms", "decode_tokens_per_s", "decode_step", "device",
                                                     "kernels", "peak_rss_bytes", "first_tokens")}}


class LlamaBench(Series):
    tool = "llama.cpp"

    def __init__(self, name, path, gguf, extra_args=()):
        super().__init__(name)
        self.path, self.gguf, self.extra_args = path, gguf, list(extra_args)

    def command(self, test, threads, warmup, tmp):
        kind, n, m, _ = TESTS[test]
        cmd = [self.path, "-m", self.gguf, "-t", str(threads), "-r", "1", "-o", "jsonl"]
        if kind == "prefill":
            cmd += ["-p", str(n), "-n", "0"]
        else:
            cmd += ["-p", "0", "-n", str(m), "-d", str(n)]
        if warmup == 0:
            cmd += ["--no-warmup"]
        return cmd + self.extra_args

    def parse(self, test, p, tmp):
        rec = parse_llama_bench(p.stdout)
        commit = rec.get("build_commit")
        self.version = f"llama.cpp {commit} (build {rec.get('build_number')})"
        return rec["avg_ts"], {"tool_commit": commit, "raw": {k: rec.get(k) for k in (
            "n_prompt", "n_gen", "n_depth", "n_threads", "type_k", "type_v", "flash_attn", "n_batch", "n_ubatch",
            "model_type", "model_size", "avg_ns", "avg_ts", "samples_ts", "cpu_info", "backends")}}


def llama_source_version(llama_dir, llama_bench):
    """'llama.cpp COMMIT (ORIGIN)' from the PEER_SOURCE file build_llama_cpp.sh writes; None when absent
    (each run's record then names llama-bench's own build_commit)."""
    for d in (llama_dir, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(llama_bench))))):
        try:
            with open(os.path.join(d, "PEER_SOURCE")) as f:
                kv = dict(line.rstrip("\n").split("=", 1) for line in f if "=" in line)
            return f"llama.cpp {kv.get('commit', 'unknown')} ({kv.get('origin', '?')})"
        except OSError:
            continue
    return None


def parse_llama_bench(text):
    """The last JSON object of llama-bench's -o jsonl (or -o json) output."""
    text = text.strip()
    if text.startswith("["):
        return json.loads(text)[-1]
    recs = [json.loads(line) for line in text.splitlines() if line.strip().startswith("{")]
    if not recs:
        raise ValueError("no JSON record in llama-bench output")
    return recs[-1]


class Transformers(Series):
    tool = "transformers"

    def __init__(self, name, python, model):
        super().__init__(name)
        self.python, self.model = python, model
        self.script = os.path.join(HERE, "peers", "hf_cpu_bench.py")

    def probe(self):
        if not shutil.which(self.python):
            return f"no Python {self.python}"
        p = subprocess.run([self.python, self.script, "check"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
        if p.returncode != 0:
            return (p.stderr.strip().splitlines() or ["check failed"])[-1]
        self.version = json.loads(p.stdout)["tool_version"]
        return None

    def command(self, test, threads, warmup, tmp):
        kind, n, m, _ = TESTS[test]
        return [self.python, self.script, "run", "--model", self.model, "--test", kind, "--prompt-tokens", str(n),
                "--gen-tokens", str(m), "--threads", str(threads), "--warmup", str(warmup)]

    def parse(self, test, p, tmp):
        rec = json.loads(p.stdout.strip().splitlines()[-1])
        return rec["tokens_per_s"], {"raw": {k: rec.get(k) for k in ("prefill_ms", "decode_steps",
                                                                     "step_median_ms", "impl")}}


# ---------------------------------------------------------------- preparing the peers

def ensure_model(model, seed):
    if os.path.isfile(os.path.join(model, "model.safetensors")):
        return
    py = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    note(f"writing the random-weight checkpoint {model} (bench/peers/make_hf_gpt2.py, seed {seed})")
    subprocess.run([py, os.path.join(HERE, "peers", "make_hf_gpt2.py"), model, "--seed", str(seed)], check=True)


def ensure_gguf(llama_dir, python, model, gguf_dir, outtype):
    """Path of MODEL's GGUF of OUTTYPE in gguf_dir, converting once; raises RuntimeError with the reason."""
    out = os.path.join(gguf_dir, f"{os.path.basename(os.path.normpath(model))}-{outtype}.gguf")
    if os.path.isfile(out) and os.path.getmtime(out) >= os.path.getmtime(os.path.join(model, "model.safetensors")):
        return out
    if not os.path.isfile(os.path.join(llama_dir, "convert_hf_to_gguf.py")):
        raise RuntimeError(f"no convert_hf_to_gguf.py in {llama_dir}")
    if not shutil.which(python):
        raise RuntimeError(f"no Python {python} for the converter")
    os.makedirs(gguf_dir, exist_ok=True)
    tmp = out + ".tmp"
    if outtype == "q4_0":  # the converter writes up to q8_0; Q4_0 is llama-quantize's
        quant = os.path.join(llama_dir, "build", "bin", "llama-quantize")
        if not os.access(quant, os.X_OK):
            raise RuntimeError(f"no {quant} (cmake --build {llama_dir}/build --target llama-quantize)")
        f32 = ensure_gguf(llama_dir, python, model, gguf_dir, "f32")
        note(f"quantizing {f32} to {out} (GGUF Q4_0)")
        p = subprocess.run([quant, f32, tmp, "Q4_0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if p.returncode != 0 or not os.path.isfile(tmp):
            raise RuntimeError("llama-quantize failed: " + " | ".join(p.stdout.strip().splitlines()[-3:]))
        os.replace(tmp, out)
        return out
    note(f"converting {model} to {out} (GGUF {outtype.upper()})")
    p = subprocess.run([python, os.path.join(HERE, "peers", "convert_gguf.py"), llama_dir, model, tmp,
                        "--outtype", outtype], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if p.returncode != 0 or not os.path.isfile(tmp):
        raise RuntimeError("convert_hf_to_gguf.py failed: " + " | ".join(p.stdout.strip().splitlines()[-3:]))
    os.replace(tmp, out)
    return out


def weight_bytes(cfg):
    """Bytes of weights one decoded token reads: every matrix and vector once, one row of wte (embedding) and of
    wpe, the tied LM head (wte again, counted once as kvhost does). fp32: 4 bytes each; f16: llama.cpp's F16 GGUF,
    2-byte matrices (wte included) and fp32 vectors."""
    V, C, L = cfg["vocab_size"], cfg["n_embd"], cfg["n_layer"]
    F = cfg.get("n_inner") or 4 * C
    mats = V * C + L * (4 * C * C + 2 * C * F)
    vecs = C + L * (9 * C + F) + 2 * C
    return {"fp32": 4 * (mats + vecs), "f32": 4 * (mats + vecs), "f16": 2 * mats + 4 * vecs,
            "q8_0": mats * 34 // 32 + 4 * vecs, "q4_0": mats * 18 // 32 + 4 * vecs}


def build_membw(path):
    if os.path.isfile(path) and os.path.getmtime(path) >= os.path.getmtime(os.path.join(HERE, "membw.c")):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    subprocess.run(["gcc", "-O3", "-march=native", "-fopenmp", os.path.join(HERE, "membw.c"), "-o", path],
                   check=True)
    return path


def repo_commit():
    try:
        c = subprocess.run(["git", "-C", REPO, "rev-parse", "--short=12", "HEAD"], stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout.strip()
        return c + ("-dirty" if dirty else "") if c else None
    except OSError:
        return None


def machine():
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"host": socket.gethostname(), "cpu": cpu, "cores": os.cpu_count()}


def parse_kvhost_specs(specs, variants):
    """--kvhost [LABEL=]PATH (repeatable) and --kvhost-variant LABEL:VAR=VAL[,VAR=VAL] -> [(label, path, env)]."""
    out = []
    for i, s in enumerate(specs):
        label, path = s.split("=", 1) if "=" in s else ("kvhost" if i == 0 else f"kvhost#{i + 1}", s)
        out.append((label, path, {}))
    for v in variants:
        if ":" not in v:
            raise SystemExit(f"peer_bench: --kvhost-variant {v!r}: expected LABEL:VAR=VAL[,VAR=VAL]")
        label, envs = v.split(":", 1)
        env = {}
        for kv in envs.split(","):
            if "=" not in kv:
                raise SystemExit(f"peer_bench: --kvhost-variant {v!r}: {kv!r} is not VAR=VAL")
            k, val = kv.split("=", 1)
            env[k.strip()] = val.strip()
        out.append((label, out[0][1], env))
    return out


def plan_round(jobs, rnd, seed):
    """The jobs of round rnd in their run order: a seeded shuffle per round."""
    order = list(jobs)
    random.Random(seed * 1000003 + rnd).shuffle(order)
    return order


# ---------------------------------------------------------------- run

def cmd_run(a):
    tests = [t.strip() for t in a.tests.split(",") if t.strip()]
    for t in tests:
        if t not in TESTS:
            raise SystemExit(f"peer_bench: unknown test {t!r} (known: {', '.join(TESTS)})")
    threads = [int(t) for t in a.threads.split(",")]
    want = {s.strip() for s in a.series.split(",") if s.strip()}
    known = {"kvhost", "transformers"} | set(LLAMA_TYPES)
    unknown = want - known
    if unknown:
        raise SystemExit(f"peer_bench: unknown series {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})")
    ensure_model(a.model, a.seed_weights)
    random_weights = os.path.isfile(os.path.join(a.model, "RANDOM_WEIGHTS.txt"))
    series, skipped = [], {}

    if "kvhost" in want:
        for label, path, env in parse_kvhost_specs(a.kvhost or [os.path.join(REPO, "build", "kvhost")],
                                                   a.kvhost_variant):
            s = Kvhost(label, path, a.model, env)
            why = s.probe()
            if why:
                note(f"skipping {label}: {why}")
                skipped[label] = why
            else:
                s.env_vars = env
                series.append(s)
        for spec in a.kvhost_args:
            if ":" not in spec:
                raise SystemExit(f"peer_bench: --kvhost-args {spec!r}: expected LABEL:ARGS")
            label, args = spec.split(":", 1)
            s = Kvhost(label, series[0].path if series else os.path.join(REPO, "build", "kvhost"), a.model,
                       args=shlex.split(args))
            why = s.probe()
            if why:
                note(f"skipping {label}: {why}")
                skipped[label] = why
            else:
                s.env_vars = {"args": args}
                series.append(s)

    llama_wanted = [w for w in LLAMA_TYPES if w in want]
    if llama_wanted:
        lb = a.llama_bench or os.path.join(a.llama_dir, "build", "bin", "llama-bench")
        why = None
        if not (os.path.isfile(lb) and os.access(lb, os.X_OK)):
            why = f"no llama-bench at {lb} (build it: bench/peers/build_llama_cpp.sh)"
        else:
            helptext = subprocess.run([lb, "--help"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True).stdout
            if "--n-depth" not in helptext:
                why = f"{lb} has no -d/--n-depth (decode at a context depth); use a newer llama.cpp"
        if why:
            for w in llama_wanted:
                skipped[LLAMA_TYPES[w][0]] = why
            note(f"skipping llama.cpp: {why}")
        else:
            for w in llama_wanted:
                label, outtype = LLAMA_TYPES[w]
                try:
                    g = ensure_gguf(a.llama_dir, a.peer_python, a.model, a.gguf_dir, outtype)
                except RuntimeError as e:
                    note(f"skipping {label}: {e}")
                    skipped[label] = str(e)
                    continue
                s = LlamaBench(label, lb, g, shlex.split(a.llama_args))
                s.gguf_type = outtype
                s.version = llama_source_version(a.llama_dir, lb)
                series.append(s)

    if "transformers" in want:
        s = Transformers("transformers", a.peer_python, a.model)
        why = s.probe()
        if why:
            note(f"skipping transformers: {why}")
            skipped["transformers"] = why
        else:
            series.append(s)

    if not series:
        raise SystemExit("peer_bench: nothing to run")
    membw = build_membw(a.membw or os.path.join(a.work, "membw"))

    # Weight bytes read per decoded token (for the bandwidth columns): from the checkpoint's shapes, fp32 or
    # llama.cpp F16 (2-byte matrices, fp32 vectors); kvhost's records carry kvhost's own figure instead.
    with open(os.path.join(a.model, "config.json")) as f:
        wbytes = weight_bytes(json.load(f))

    os.makedirs(a.out_dir, exist_ok=True)
    out = os.path.join(a.out_dir, "results.jsonl")
    run_id = utc_now()
    start = {"record": "peer_bench_start", "run_id": run_id, "time_utc": run_id, "commit": repo_commit(),
             "machine": machine(), "model_dir": os.path.abspath(a.model), "random_weights": random_weights,
             "llama_args": a.llama_args, "rounds": a.rounds, "threads": threads, "tests": tests, "warmup": a.warmup, "seed": a.seed,
             "series": {s.name: {"tool": s.tool, "version": s.version,
                                 "env": getattr(s, "env_vars", None) or None,
                                 "gguf": getattr(s, "gguf", None)} for s in series},
             "skipped": skipped}

    def emit(rec):
        with open(out, "a") as f:
            f.write(json.dumps(rec) + "\n")

    emit(start)
    jobs = [(s, t, th) for s in series for t in tests for th in threads]
    print(f"peer_bench: {len(series)} series x {len(tests)} tests x {len(threads)} thread counts = {len(jobs)} runs "
          f"a round, {a.rounds} rounds -> {out}", file=sys.stderr)
    failures = 0
    with tempfile.TemporaryDirectory(prefix="peer_bench-") as tmp:
        for rnd in range(a.rounds):
            for th in threads:
                env = dict(os.environ, OMP_NUM_THREADS=str(th))
                p, load = measured([membw], env=env)
                try:
                    gbs = json.loads(p.stdout.strip().splitlines()[-1])["read_gb_per_s"]
                except (ValueError, IndexError, KeyError):
                    gbs = None
                emit({"record": "membw", "run_id": run_id, "round": rnd, "threads": th, "read_gb_per_s": gbs,
                      "time_utc": utc_now(), **load})
                print(f"  round {rnd + 1}: membw {th} thread(s): {gbs} GB/s", file=sys.stderr)
            for slot, (s, t, th) in enumerate(plan_round(jobs, rnd, a.seed)):
                kind, n, m, _ = TESTS[t]
                cmd = s.command(t, th, a.warmup, tmp)
                env = s.env() if isinstance(s, Kvhost) else dict(os.environ, OMP_NUM_THREADS=str(th))
                rec = {"record": "peer_run", "run_id": run_id, "round": rnd, "slot": slot, "series": s.name,
                       "tool": s.tool, "tool_version": s.version, "test": t, "kind": kind, "threads": th,
                       "batch": 1, "prompt_tokens": n, "gen_tokens": m, "time_utc": utc_now()}
                try:
                    p, load = measured(cmd, env=env, timeout=a.timeout)
                except subprocess.TimeoutExpired:
                    p, load = None, {}
                rec.update(load)
                rec["command"] = " ".join(cmd)
                if p is None or p.returncode != 0:
                    err = "timed out" if p is None else (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
                    rec.update(tokens_per_s=None, error=err)
                    failures += 1
                    print(f"  FAILED {s.name} {t} t={th}: {err}", file=sys.stderr)
                else:
                    try:
                        tps, extra = s.parse(t, p, tmp)
                    except (ValueError, KeyError, IndexError, OSError) as e:
                        tps, extra = None, {"error": f"unparsable output: {e}"}
                        failures += 1
                    rec["tool_version"] = s.version
                    rec["tokens_per_s"] = tps
                    rec.update(extra)
                    if not rec.get("weight_bytes_per_token"):
                        gtype = getattr(s, "gguf_type", "f32")
                        rec["weight_bytes_per_token"] = wbytes.get(gtype, wbytes["fp32"])
                    print(f"  round {rnd + 1} [{slot + 1}/{len(jobs)}] {s.name:<16} {t:<10} t={th}: "
                          f"{tps if tps is None else round(tps, 2)} tok/s  (load {load.get('load1_before')}, "
                          f"other CPU {load.get('other_cpu_cores')})", file=sys.stderr)
                emit(rec)
    table = summarize(load_jsonl([out]), run_id=None if a.all_runs else run_id)
    with open(os.path.join(a.out_dir, "table.md"), "w") as f:
        f.write(table)
    print(table)
    try:
        plot(load_jsonl([out]), os.path.join(a.out_dir, "peers.png"), run_id=None if a.all_runs else run_id)
    except ImportError:
        note("no matplotlib here: no plot (run `/usr/bin/python3 bench/peer_bench.py plot ...` where it exists)")
    return 1 if failures else 0


# ---------------------------------------------------------------- summary

def load_jsonl(paths):
    recs = []
    for p in paths:
        with open(p) as f:
            for i, line in enumerate(f, 1):
                line = line.strip()
                if line:
                    try:
                        recs.append(json.loads(line))
                    except ValueError as e:
                        raise SystemExit(f"peer_bench: {p}:{i}: not JSON: {e}")
    return recs


def select_run(recs, run_id):
    """Records of one invocation (run_id), or all when run_id is None."""
    return [r for r in recs if run_id is None or r.get("run_id") == run_id]


def series_order(names):
    def key(n):
        if n.startswith("kvhost"):
            return (0, n)
        if n.startswith("llama.cpp"):
            return (1, n)
        return (2, n)
    return sorted(names, key=key)


def fmt(x, d=2):
    if x is None:
        return "—"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.{d}f}"


def cells(recs):
    """{(series, test, threads): [tokens/s...]}, {(series, test, threads): [records]} from successful runs."""
    vals, rows = {}, {}
    for r in recs:
        if r.get("record") != "peer_run" or r.get("tokens_per_s") is None:
            continue
        k = (r["series"], r["test"], r["threads"])
        vals.setdefault(k, []).append(r["tokens_per_s"])
        rows.setdefault(k, []).append(r)
    return vals, rows


def summarize(recs, run_id=None):
    recs = select_run(recs, run_id)
    starts = [r for r in recs if r.get("record") == "peer_bench_start"]
    vals, rows = cells(recs)
    bw = {}
    for r in recs:
        if r.get("record") == "membw" and r.get("read_gb_per_s") is not None:
            bw.setdefault(r["threads"], []).append(r["read_gb_per_s"])
    failed = [r for r in recs if r.get("record") == "peer_run" and r.get("tokens_per_s") is None]
    names = series_order({k[0] for k in vals})
    tests = [t for t in TEST_ORDER if any(k[1] == t for k in vals)]
    threads = sorted({k[2] for k in vals})
    out = ["# Peer benchmark: kvhost, llama.cpp, transformers (CPU, batch 1, fp32 unless named)", ""]
    if starts:
        s0 = starts[0]
        m = s0.get("machine", {})
        rounds = sorted({r["round"] for r in recs if r.get("record") == "peer_run"})
        out.append(f"Model: `{s0.get('model_dir')}`"
                   + (" — **seeded random weights**: speed only, text is meaningless" if s0.get("random_weights")
                      else "") + ".")
        out.append(f"Machine: {m.get('cpu')}, {m.get('cores')} cores (host {m.get('host')}); "
                   f"commit {s0.get('commit')}; {len(rounds)} round(s), started {s0.get('time_utc')}"
                   + (f" ({len(starts)} invocations pooled)" if len(starts) > 1 else "") + ".")
        vers = {}
        for s in starts:
            for name, info in s.get("series", {}).items():
                vers.setdefault(name, dict(info))
        for r in recs:  # a version first known from the tool's own output
            if r.get("record") == "peer_run" and r.get("tool_version") and r.get("series") in vers \
                    and not vers[r["series"]].get("version"):
                vers[r["series"]]["version"] = r["tool_version"]
        for name in series_order(vers):
            info = vers[name]
            extra = f", env {info['env']}" if info.get("env") else ""
            extra += f", `{os.path.basename(info['gguf'])}`" if info.get("gguf") else ""
            if info.get("tool") == "llama.cpp":
                extra += f", llama-bench args `{s0.get('llama_args')}`" if s0.get("llama_args") else \
                    ", llama-bench defaults (F16 KV cache, flash attention auto)"
            out.append(f"- {name}: {info.get('version')}{extra}")
        for s in starts:
            for name, why in s.get("skipped", {}).items():
                out.append(f"- {name}: **skipped** — {why}")
    out.append("")
    out.append("## Medians (tokens/s)")
    out.append("")
    out.append("| threads | test | " + " | ".join(names) + " |")
    out.append("|---|---|" + "---|" * len(names))
    for th in threads:
        for t in tests:
            row = [fmt(median(vals[(n, t, th)])) if (n, t, th) in vals else "—" for n in names]
            out.append(f"| {th} | {TESTS[t][3]} | " + " | ".join(row) + " |")
    out.append("")
    out.append("## Every series")
    out.append("")
    out.append("n: successful runs; range: min-max over rounds; x F32: median / llama.cpp F32's median at the same "
               "test and threads; weight GB/s: weight bytes read per decoded token x median tokens/s; "
               "% of probe: that / the median measured read bandwidth at the same thread count; load: 1-minute "
               "load average before the runs (median, max); other CPU: cores busy with other processes during "
               "the runs (median, max).")
    out.append("")
    out.append("| series | threads | test | n | median tok/s | range | x F32 | weight GB/s | % of probe "
               "| load (med, max) | other CPU (med, max) |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for n in names:
        for th in threads:
            for t in tests:
                k = (n, t, th)
                if k not in vals:
                    continue
                v = vals[k]
                med = median(v)
                ref = vals.get((REF_SERIES, t, th))
                ratio = f"{med / median(ref):.2f}x" if ref else "—"
                gbs = pct = "—"
                wb = [r.get("weight_bytes_per_token") for r in rows[k] if r.get("weight_bytes_per_token")]
                if TESTS[t][0] == "decode" and wb:
                    g = median(wb) * med / 1e9
                    gbs = f"{g:.2f}"
                    if bw.get(th):
                        pct = f"{100 * g / median(bw[th]):.0f}%"
                loads = [r["load1_before"] for r in rows[k] if r.get("load1_before") is not None]
                others = [r["other_cpu_cores"] for r in rows[k] if r.get("other_cpu_cores") is not None]
                ld = f"{median(loads):.2f}, {max(loads):.2f}" if loads else "—"
                ot = f"{median(others):.2f}, {max(others):.2f}" if others else "—"
                out.append(f"| {n} | {th} | {TESTS[t][3]} | {len(v)} | {fmt(med)} | {fmt(min(v))}-{fmt(max(v))} "
                           f"| {ratio} | {gbs} | {pct} | {ld} | {ot} |")
    out.append("")
    out.append("## Read bandwidth probe (bench/membw.c, one per round and thread count)")
    out.append("")
    out.append("| threads | n | median GB/s | range |")
    out.append("|---|---|---|---|")
    for th in sorted(bw):
        out.append(f"| {th} | {len(bw[th])} | {median(bw[th]):.2f} | {min(bw[th]):.2f}-{max(bw[th]):.2f} |")
    if failed:
        out.append("")
        out.append(f"Failed runs ({len(failed)}, not in the figures):")
        for r in failed:
            out.append(f"- round {r.get('round')}: {r.get('series')} {r.get('test')} t={r.get('threads')}: "
                       f"{r.get('error')}")
    out.append("")
    return "\n".join(out)


def plot(recs, path, run_id=None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    recs = select_run(recs, run_id)
    vals, _ = cells(recs)
    names = series_order({k[0] for k in vals})
    groups = [(t, th) for th in sorted({k[2] for k in vals}) for t in TEST_ORDER
              if any(k[1] == t and k[2] == th for k in vals)]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [2, 1]})
    w = 0.8 / max(1, len(names))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, kind in zip(axes, ("decode", "prefill")):
        gs = [g for g in groups if TESTS[g[0]][0] == kind]
        for i, n in enumerate(names):
            xs, ys, lo, hi = [], [], [], []
            for j, (t, th) in enumerate(gs):
                v = vals.get((n, t, th))
                if not v:
                    continue
                m = median(v)
                xs.append(j + (i - (len(names) - 1) / 2) * w)
                ys.append(m)
                lo.append(m - min(v))
                hi.append(max(v) - m)
            if xs:
                ax.bar(xs, ys, w, yerr=[lo, hi], capsize=2, label=n, color=colors[i % len(colors)])
        ax.set_xticks(range(len(gs)))
        ax.set_xticklabels([f"{TESTS[t][3]}\n{th} thread{'s' if th > 1 else ''}" for t, th in gs], fontsize=8)
        ax.set_ylabel("tokens/s (median; bars: min-max over rounds)")
        ax.set_title(f"{kind}, batch 1")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("kvhost vs llama.cpp vs transformers on the CPU (same GPT-2 Medium-shaped weights)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"peer_bench: wrote {path}", file=sys.stderr)


def cmd_summarize(a):
    table = summarize(load_jsonl(a.jsonl), run_id=a.run_id)
    if a.out:
        with open(a.out, "w") as f:
            f.write(table)
    else:
        sys.stdout.write(table)
    return 0


def cmd_plot(a):
    plot(load_jsonl(a.jsonl), a.out, run_id=a.run_id)
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="measure (see the module help)")
    r.add_argument("--out-dir", required=True, help="results.jsonl (appended), table.md, peers.png")
    r.add_argument("--kvhost", action="append", metavar="[LABEL=]PATH",
                   help="kvhost binary (repeatable; default build/kvhost)")
    r.add_argument("--kvhost-args", action="append", default=[], metavar="LABEL:ARGS",
                   help="one more kvhost series: the first binary with extra generate arguments, e.g. "
                   "'kvhost w8:--plugins w8.so'")
    r.add_argument("--kvhost-variant", action="append", default=[], metavar="LABEL:VAR=VAL[,VAR=VAL]",
                   help="one more kvhost series: the first binary under these environment variables")
    r.add_argument("--model", default=os.environ.get("KVH_PEER_MODEL", "/work/peers/models/gpt2-medium-seed1234"),
                   help="HF GPT-2 directory (written by bench/peers/make_hf_gpt2.py when missing)")
    r.add_argument("--seed-weights", type=int, default=1234, help="seed of the random weights if written")
    r.add_argument("--llama-dir", default=os.environ.get("KVH_LLAMA_DIR", "/work/peers/llama.cpp"),
                   help="llama.cpp tree built by bench/peers/build_llama_cpp.sh")
    r.add_argument("--llama-bench", default=os.environ.get("KVH_LLAMA_BENCH"),
                   help="llama-bench binary (default LLAMA_DIR/build/bin/llama-bench)")
    r.add_argument("--llama-args", default="", help="extra llama-bench arguments, e.g. '-ctk f32 -ctv f32' "
                   "(its KV cache is F16 by default)")
    r.add_argument("--gguf-dir", default=os.environ.get("KVH_GGUF_DIR", "/work/peers/gguf"))
    r.add_argument("--peer-python", default=os.environ.get("KVH_PEER_PYTHON", "/work/peers/venv/bin/python"),
                   help="Python with torch + transformers (converter and transformers peer)")
    r.add_argument("--series", default="kvhost,llama-f32,llama-f16,transformers")
    r.add_argument("--tests", default=",".join(TEST_ORDER))
    r.add_argument("--threads", default="1,2")
    r.add_argument("--rounds", type=int, default=5)
    r.add_argument("--warmup", type=int, default=1, help="untimed runs inside each run (0: none)")
    r.add_argument("--seed", type=int, default=1, help="seed of the per-round order")
    r.add_argument("--timeout", type=float, default=1800, help="seconds before a run counts as failed")
    r.add_argument("--membw", help="membw binary (default: built from bench/membw.c into --work)")
    r.add_argument("--work", default=os.environ.get("KVH_BENCH_DIR", "/tmp/kvh-bench"))
    r.add_argument("--all-runs", action="store_true", help="table and plot over every run in results.jsonl")
    s = sub.add_parser("summarize", help="markdown table from JSON Lines")
    s.add_argument("jsonl", nargs="+")
    s.add_argument("--out")
    s.add_argument("--run-id", help="only the invocation with this run_id (default: every record)")
    p = sub.add_parser("plot", help="grouped bars per test x threads (needs matplotlib)")
    p.add_argument("jsonl", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--run-id")
    a = ap.parse_args(argv)
    return {"run": cmd_run, "summarize": cmd_summarize, "plot": cmd_plot}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
