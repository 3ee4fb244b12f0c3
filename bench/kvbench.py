#!/usr/bin/env python3
"""kvbench.py — the sweep driver: runs named kvhost configurations over models x lengths x batches x
backends and appends one JSON Lines record per run.

Owns: the sweep file format and its validation, grid expansion, the run order (every configuration of one
grid point runs back to back in the same script run), the tags each record gets, skipping configurations
whose plugins are not built, the peers (PyTorch eager, HF transformers) run beside kvhost at each point and
their records in kvhost's schema, emitting the sweep as independent jobs (GNU parallel, Slurm job array),
merging result files, and the max-batch search (`capacity`). Does not own: measuring (kvhost generate
writes the records) or plotting (bench/report.py).

Standard library only (CI may have python3 without numpy).

  kvbench.py run SWEEP.ini --kvhost build/kvhost --out results.jsonl [--append] [--work DIR]
  kvbench.py job SWEEP.ini INDEX --kvhost build/kvhost --out job.jsonl     (one grid point)
  kvbench.py emit SWEEP.ini --parallel|--slurm --kvhost K --out-dir DIR
  kvbench.py merge a.jsonl b.jsonl -o all.jsonl
  kvbench.py capacity --kvhost K --mem-limit 16M --prompt-tokens 256 [--predict] [--plugins ...] [--json OUT]
  kvbench.py validate SWEEP.ini
"""
import argparse
import configparser
import fractions
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import jsonl  # bench/jsonl.py: reading record files whatever their bytes

SWEEP_KEYS = {
    "models": "comma list of model specs (checkpoint directories or random:gpt2-medium)",
    "lengths": "comma list of prompt lengths T (synthetic prompts, --prompt-tokens)",
    "batches": "comma list of batch sizes",
    "backends": "comma list of backends (cpu, cuda)",
    "repeats": "timed runs per configuration and point (>= 1)",
    "warmup": "untimed runs first (>= 0)",
    "max_new": "tokens generated per sequence (>= 1)",
    "threads": "CPU threads (>= 1; default: kvhost's default)",
    "mem_limit": "KV cache cap passed as --mem-limit (e.g. 256M)",
    "capacity_length": "prompt length T of the max-batch search (enables it)",
    "capacity_mem_limit": "KV cap of the max-batch search (e.g. 16M; required with capacity_length)",
    "capacity_max_batch": "upper end of the max-batch search (default 256)",
    "capacity_models": "comma list of models for the max-batch search (default: all models)",
    "eval_file": "text file for perplexity (kvhost eval; enables it; relative to the sweep file, cwd or repo)",
    "eval_tokens": "tokens of eval_file evaluated (default 512)",
    "eval_ctx": "eval chunk length (default 256)",
    "eval_mode": "teacher, stream or both (default stream: through the cache under the plugins)",
    "eval_models": "comma list of models evaluated (default: all models)",
    "eval_threads": "CPU threads of the eval runs (default: threads)",
}
CONFIG_KEYS = {
    "config": "INI run file for kvhost --config (path relative to the sweep file or the repo)",
    "plugins": "comma list for kvhost --plugins",
    "set": "';'-separated SECTION.KEY=VALUE overrides (kvhost --set)",
    "budget_ratio": "cache.budget = max(1, floor(T * ratio)) at each length T",
    "no_cache": "true: the recompute baseline (kvhost --no-cache)",
    "max_length": "skip this configuration at lengths above this",
    "models": "comma list: run this configuration only on these models",
    "peer": "run a peer instead of kvhost: torch-eager (CPU, bench/torch_gpt2.py) or transformers (GPU, "
            "bench/hf_gpu_bench.py)",
}
PEER_KEYS = ("peer", "max_length", "models")
# peer kind -> the backend it runs on, its script, the env variable / option overriding its command
PEERS = {
    "torch-eager": {"backend": "cpu", "script": "torch_gpt2.py", "env": "KVBENCH_TORCH_PEER",
                    "needs": "torch and numpy (Debian: python3-torch)"},
    "transformers": {"backend": "cuda", "script": "hf_gpu_bench.py", "env": "KVBENCH_TRANSFORMERS_PEER",
                     "needs": "torch with CUDA and transformers"},
}
PHASES = ["embed", "attn_proj", "attn_core", "mlp", "lm_head", "plugin_hooks", "other"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SweepError(Exception):
    """A problem with a sweep file; the message names the file and the key."""


def _ints(path, section, key, text, lo):
    vals = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if not re.fullmatch(r"[0-9]+", part):
            raise SweepError(f"{path}: [{section}] {key} = {text}: '{part}' is not a whole number")
        if len(part) > 18:  # int() of thousands of digits raises ValueError (Python's digit limit)
            raise SweepError(f"{path}: [{section}] {key} = {text[:40]}...: '{part[:20]}...' has {len(part)} digits, "
                             "more than any count or length here needs")
        v = int(part)
        if v < lo:
            raise SweepError(f"{path}: [{section}] {key} = {text}: {v} must be >= {lo}")
        vals.append(v)
    if not vals:
        raise SweepError(f"{path}: [{section}] {key} is empty: give at least one value")
    return vals


def _words(path, section, key, text):
    vals = [p.strip() for p in text.split(",") if p.strip()]
    if not vals:
        raise SweepError(f"{path}: [{section}] {key} is empty: give at least one value")
    return vals


def _bool(path, section, key, text):
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise SweepError(f"{path}: [{section}] {key} = {text}: expected true or false")


def _size(path, section, key, text):
    try:
        size_bytes(text)  # the one grammar of sizes (kvhost --mem-limit's)
    except ValueError:
        raise SweepError(f"{path}: [{section}] {key} = {text}: expected a size such as 256M or 2G") from None
    return text.strip()


def _resolve(path, rel):
    if os.path.isabs(rel):
        return rel
    for base in (os.path.dirname(os.path.abspath(path)), os.getcwd(), REPO):
        cand = os.path.normpath(os.path.join(base, rel))
        if os.path.exists(cand):
            return cand
    return None


def parse_sweep_text(text, path="<sweep>"):
    """Parses and validates a sweep file's text. Returns a dict; raises SweepError naming file and key."""
    cp = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";", "#"),
                                   default_section="__none__")
    try:
        cp.read_string(text, source=path)
    except configparser.Error as e:
        raise SweepError(f"{path}: {e}".replace("\n", " ")) from None
    if not cp.has_section("sweep"):
        raise SweepError(f"{path}: no [sweep] section (it names the axes: models, lengths, batches, ...)")
    sw = cp["sweep"]
    for k in sw:
        if k not in SWEEP_KEYS:
            raise SweepError(f"{path}: [sweep] unknown key '{k}' (known keys: {', '.join(SWEEP_KEYS)})")
    for req in ("models", "lengths"):
        if req not in sw:
            raise SweepError(f"{path}: [sweep] missing key '{req}' ({SWEEP_KEYS[req]})")
    s = {
        "path": path,
        "models": _words(path, "sweep", "models", sw["models"]),
        "lengths": _ints(path, "sweep", "lengths", sw["lengths"], 1),
        "batches": _ints(path, "sweep", "batches", sw.get("batches", "1"), 1),
        "backends": _words(path, "sweep", "backends", sw.get("backends", "cpu")),
        "repeats": _ints(path, "sweep", "repeats", sw.get("repeats", "3"), 1)[0],
        "warmup": _ints(path, "sweep", "warmup", sw.get("warmup", "1"), 0)[0],
        "max_new": _ints(path, "sweep", "max_new", sw.get("max_new", "16"), 1)[0],
        "threads": _ints(path, "sweep", "threads", sw["threads"], 1)[0] if "threads" in sw else None,
        "mem_limit": _size(path, "sweep", "mem_limit", sw["mem_limit"]) if "mem_limit" in sw else None,
        "capacity": None,
        "configs": [],
    }
    for b in s["backends"]:
        if b not in ("cpu", "cuda", "auto"):
            raise SweepError(f"{path}: [sweep] backends: unknown backend '{b}' (cpu, cuda, auto)")
    if "capacity_length" in sw:
        if "capacity_mem_limit" not in sw:
            raise SweepError(f"{path}: [sweep] capacity_length needs capacity_mem_limit (the KV cap to search under)")
        s["capacity"] = {
            "length": _ints(path, "sweep", "capacity_length", sw["capacity_length"], 1)[0],
            "mem_limit": _size(path, "sweep", "capacity_mem_limit", sw["capacity_mem_limit"]),
            "max_batch": _ints(path, "sweep", "capacity_max_batch", sw.get("capacity_max_batch", "256"), 1)[0],
            "models": _words(path, "sweep", "capacity_models", sw["capacity_models"])
            if "capacity_models" in sw else list(s["models"]),
        }
    elif "capacity_mem_limit" in sw:
        raise SweepError(f"{path}: [sweep] capacity_mem_limit without capacity_length")
    s["eval"] = None
    if "eval_file" in sw:
        f = _resolve(path, sw["eval_file"])
        if not f or not os.path.isfile(f):
            raise SweepError(f"{path}: [sweep] eval_file = {sw['eval_file']}: file not found")
        mode = sw.get("eval_mode", "stream").strip()
        if mode not in ("teacher", "stream", "both"):
            raise SweepError(f"{path}: [sweep] eval_mode = {mode}: expected teacher, stream or both")
        s["eval"] = {"file": f, "mode": mode,
                     "tokens": _ints(path, "sweep", "eval_tokens", sw.get("eval_tokens", "512"), 2)[0],
                     "ctx": _ints(path, "sweep", "eval_ctx", sw.get("eval_ctx", "256"), 2)[0],
                     "threads": _ints(path, "sweep", "eval_threads", sw["eval_threads"], 1)[0]
                     if "eval_threads" in sw else None,
                     "models": _words(path, "sweep", "eval_models", sw["eval_models"])
                     if "eval_models" in sw else list(s["models"])}
    elif any(k.startswith("eval_") for k in sw):
        raise SweepError(f"{path}: [sweep] eval_* keys without eval_file")
    for name in cp.sections():
        if name == "sweep":
            continue
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
            raise SweepError(f"{path}: [{name}]: configuration names use letters, digits, _ . + -")
        sec = cp[name]
        for k in sec:
            if k not in CONFIG_KEYS:
                raise SweepError(f"{path}: [{name}] unknown key '{k}' (known keys: {', '.join(CONFIG_KEYS)})")
        c = {"name": name, "config": None, "plugins": None, "sets": [], "budget_ratio": None,
             "no_cache": False, "max_length": None, "models": None, "peer": None}
        if "peer" in sec:
            kind = sec["peer"].strip()
            if kind not in PEERS:
                raise SweepError(f"{path}: [{name}] peer = {kind}: unknown peer (known: {', '.join(PEERS)})")
            extra = [k for k in sec if k not in PEER_KEYS]
            if extra:
                raise SweepError(f"{path}: [{name}] peer = {kind} takes only {', '.join(PEER_KEYS)}: '{extra[0]}' "
                                 f"is a kvhost configuration key (a peer runs plain GPT-2 with its own full KV cache)")
            want = PEERS[kind]["backend"]
            if want not in s["backends"]:
                raise SweepError(f"{path}: [{name}] peer = {kind} runs on backend {want}, but [sweep] backends = "
                                 f"{', '.join(s['backends'])} has no {want}")
            c["peer"] = kind
        if "config" in sec:
            resolved = _resolve(path, sec["config"])
            if not resolved or not os.path.isfile(resolved):
                raise SweepError(f"{path}: [{name}] config = {sec['config']}: file not found "
                                 f"(relative paths are tried from the sweep file's folder, the current folder and the repo)")
            c["config"] = resolved
        if "plugins" in sec:
            c["plugins"] = ",".join(_words(path, name, "plugins", sec["plugins"]))
        if "set" in sec:
            for a in sec["set"].split(";"):
                a = a.strip()
                if not a:
                    continue
                if not re.fullmatch(r"[A-Za-z0-9_-]+\.[a-z0-9_]+=\S+", a):
                    raise SweepError(f"{path}: [{name}] set: '{a}' is not SECTION.KEY=VALUE")
                c["sets"].append(a)
        if "budget_ratio" in sec:
            try:
                r = float(sec["budget_ratio"])
            except ValueError:
                raise SweepError(f"{path}: [{name}] budget_ratio = {sec['budget_ratio']}: expected a number") from None
            if not (0 < r <= 1):
                raise SweepError(f"{path}: [{name}] budget_ratio = {sec['budget_ratio']}: must be in (0, 1]")
            c["budget_ratio"] = r
        if "no_cache" in sec:
            c["no_cache"] = _bool(path, name, "no_cache", sec["no_cache"])
        if "max_length" in sec:
            c["max_length"] = _ints(path, name, "max_length", sec["max_length"], 1)[0]
        if "models" in sec:
            c["models"] = _words(path, name, "models", sec["models"])
            for m in c["models"]:
                if m not in s["models"]:
                    raise SweepError(f"{path}: [{name}] models: '{m}' is not in [sweep] models")
        if c["no_cache"] and (c["config"] or c["plugins"] or c["budget_ratio"]):
            raise SweepError(f"{path}: [{name}] no_cache = true takes no config, plugins or budget_ratio")
        s["configs"].append(c)
    if not s["configs"]:
        raise SweepError(f"{path}: no configurations: add a section per configuration, e.g. [full] (empty = plain cache)")
    return s


def load_sweep(path):
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise SweepError(f"{path}: cannot read sweep file: {e.strerror}") from None
    return parse_sweep_text(text, path)


def grid_points(sweep):
    """The grid points in run order: (model, backend, batch, length)."""
    return [{"model": m, "backend": be, "batch": b, "length": t}
            for m in sweep["models"] for be in sweep["backends"]
            for b in sweep["batches"] for t in sweep["lengths"]]


def config_applies(c, point):
    if c.get("peer") and point["backend"] != PEERS[c["peer"]]["backend"]:
        return False
    if c["max_length"] is not None and point["length"] > c["max_length"]:
        return False
    if c["models"] is not None and point["model"] not in c["models"]:
        return False
    return True


def config_args(c, length):
    """kvhost arguments that select configuration c at prompt length `length`."""
    args = []
    if c["no_cache"]:
        args.append("--no-cache")
    if c["config"]:
        args += ["--config", c["config"]]
    if c["plugins"]:
        args += ["--plugins", c["plugins"]]
    sets = list(c["sets"])
    if c["budget_ratio"] is not None:
        sets = [x for x in sets if not x.startswith("cache.budget=")]
        sets.append(f"cache.budget={max(1, int(length * c['budget_ratio']))}")
    for x in sets:
        args += ["--set", x]
    return args


def generate_argv(kvhost, sweep, c, point, out, job_id):
    argv = [kvhost, "generate", "--model", point["model"], "--backend", point["backend"],
            "--prompt-tokens", str(point["length"]), "--max-new", str(sweep["max_new"]),
            "--batch", str(point["batch"]), "--warmup", str(sweep["warmup"]), "--repeats", str(sweep["repeats"]),
            "--quiet", "--json", out]
    if sweep["threads"]:
        argv += ["--threads", str(sweep["threads"])]
    if sweep["mem_limit"]:
        argv += ["--mem-limit", sweep["mem_limit"]]
    argv += config_args(c, point["length"])
    argv += ["--tag", f"config={c['name']}", "--tag", f"sweep={os.path.basename(sweep['path'])}",
             "--tag", f"job={job_id}"]
    return argv


def plugin_files(c):
    """The plugin names a configuration needs (from plugins= and the sections of its INI file)."""
    names = []
    if c["plugins"]:
        names += [os.path.basename(p).removesuffix(".so") for p in c["plugins"].split(",")]
    if c["config"]:
        cp = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";", "#"),
                                       default_section="__none__", strict=False)
        cp.read(c["config"])
        for sec in cp.sections():
            if sec in ("model", "cache"):
                continue
            names.append(os.path.basename(cp[sec].get("plugin", sec)).removesuffix(".so"))
    return names


def available_plugins(kvhost):
    """Names from `kvhost plugins list` (first column); None when the list cannot be read."""
    try:
        p = subprocess.run([kvhost, "plugins", "list"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if p.returncode != 0:
        return None
    return {line.split()[0] for line in p.stdout.splitlines() if line.strip()}


def missing_plugins(c, available):
    if available is None:
        return []
    return [n for n in plugin_files(c) if n not in available]


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def run_point(kvhost, sweep, point, out, job_id, available, dry=False, peers=None):
    """Runs every applicable configuration (kvhost or peer) at one grid point, back to back, in sweep-file
    order. Returns (ok, failed, skipped)."""
    ok = failed = skipped = 0
    for c in sweep["configs"]:
        if not config_applies(c, point):
            continue
        if c["peer"]:
            if peers is None:
                peers = PeerRunner()
            r = peers.run(sweep, c, point, out, job_id, dry)
            ok, failed, skipped = ok + (r == "ok"), failed + (r == "failed"), skipped + (r == "skipped")
            continue
        miss = missing_plugins(c, available)
        if miss:
            log(f"kvbench: note: skipping [{c['name']}]: plugin(s) not built: {', '.join(m + '.so' for m in miss)}")
            skipped += 1
            continue
        argv = generate_argv(kvhost, sweep, c, point, out, job_id)
        desc = f"[{c['name']}] {point['model']} T={point['length']} B={point['batch']} {point['backend']}"
        if dry:
            print(shlex.join(argv))
            continue
        log(f"kvbench: {desc}")
        p = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if p.returncode != 0:
            lines = [ln for ln in p.stderr.splitlines() if ln.startswith("kvhost")] or p.stderr.splitlines()[-1:]
            msg = lines[-1] if lines else f"exit status {p.returncode}"
            if "n_positions" in msg:
                log(f"kvbench: note: skipping {desc}: {msg}")
                skipped += 1
            else:
                log(f"kvbench: FAILED {desc}: {msg}")
                failed += 1
        else:
            ok += 1
    return ok, failed, skipped


# ---- peers -----------------------------------------------------------------------------------------

def latency_stats(ms):
    """The decode_step object of a kvhost record, computed the way kvhost does (host/util/metrics.c: percentiles
    by linear interpolation between the two nearest ranks)."""
    s = sorted(ms)
    n = len(s)
    if n == 0:
        return {"n": 0, "median_ms": 0.0, "p10_ms": 0.0, "p90_ms": 0.0, "mean_ms": 0.0, "min_ms": 0.0, "max_ms": 0.0}

    def pct(q):
        rank = q * (n - 1)
        lo = int(rank)
        if lo >= n - 1:
            return s[-1]
        return s[lo] + (s[lo + 1] - s[lo]) * (rank - lo)
    return {"n": n, "median_ms": pct(0.5), "p10_ms": pct(0.1), "p90_ms": pct(0.9), "mean_ms": sum(s) / n,
            "min_ms": s[0], "max_ms": s[-1]}


def machine_info():
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        cores = os.sysconf("SC_NPROCESSORS_ONLN")
    except (ValueError, OSError, AttributeError):
        cores = os.cpu_count() or 0
    return {"host": socket.gethostname(), "cpu": cpu, "cores": cores}


def repo_commit():
    """The commit of the scripts that ran the peer, as kvhost writes its own (12 hex digits, -dirty)."""
    try:
        h = subprocess.run(["git", "-C", REPO, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                           timeout=30)
        if h.returncode != 0:
            return "unknown"
        d = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=30)
        return h.stdout.strip() + ("-dirty" if d.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def kvhost_model_name(spec):
    """The model.name kvhost records for a spec: random:NAME (seed dropped) or the directory's basename."""
    if spec.startswith("random:"):
        return "random:" + spec[len("random:"):].split(":")[0]
    return os.path.basename(os.path.realpath(spec).rstrip("/"))


def random_spec(spec):
    """(preset, seed) of a random:NAME[:SEED] spec (seed 1234 = kvhost's default), or None."""
    if not spec.startswith("random:"):
        return None
    parts = spec[len("random:"):].split(":")
    seed = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 1234
    return parts[0], seed


def peer_record(raw, sweep, c, point, job_id, commit, machine, model_dir=None):
    """A generate record in kvhost's schema from a peer's `peer_run` line. Fields a peer does not measure
    (KV bytes, phases, plugin stack, kvhost version) are null; `peer` and `peer_version` say who ran it."""
    B, T = point["batch"], point["length"]
    steps = raw["step_ms"]
    R = max(1, len(raw["prefill_ms"]))
    spec = point["model"]
    model = {"name": kvhost_model_name(spec), "source": spec, "random_weights": spec.startswith("random:")}
    model.update(raw.get("model", {}))
    if model_dir:
        model["peer_checkpoint"] = model_dir
    return {
        "record": "generate", "peer": c["peer"], "peer_version": raw["peer_version"],
        "peer_impl": raw.get("peer_impl"), "kvhost_version": None, "commit": commit,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine, "model": model,
        "backend": point["backend"], "device": raw.get("device"), "threads": raw.get("threads"),
        "no_cache": False, "cache_budget": None, "cache_slack": None, "cache_prefill_chunk": None, "plugins": None,
        "batch": B,
        "tags": {"config": c["name"], "sweep": os.path.basename(sweep["path"]), "job": str(job_id)},
        "prompt_tokens": [T] * B, "generated_tokens": raw.get("generated_tokens", [sweep["max_new"]] * B),
        "first_tokens": raw.get("first_tokens", []),
        "prefill_ms": sum(raw["prefill_ms"]) / R, "decode_step": latency_stats(steps),
        "decode_tokens_per_s": len(steps) * B / (sum(steps) / 1e3) if sum(steps) > 0 else 0.0,
        "warmup_runs": raw.get("warmup_runs", sweep["warmup"]), "repeats": raw.get("repeats", sweep["repeats"]),
        "repeat_tokens_per_s": raw.get("repeat_tokens_per_s", []), "weight_bytes_per_token": None,
        "kv_bytes_held": None, "kv_bytes_peak": None, "kv_live_bytes": None, "kv_live_tokens": None,
        "policy_bytes": None, "policy_bytes_peak": None,
        "max_live_per_head": None, "peak_rss_bytes": raw.get("peak_rss_bytes"),
        "peak_device_bytes": raw.get("peak_device_bytes"),
        "phase_ms": {p: None for p in PHASES}, "total_ms": sum(raw["total_ms"]) / R,
        "sampling": {"temperature": 0, "top_k": 0, "top_p": 1, "seed": None},
    }


def default_work_dir():
    return os.environ.get("KVH_BENCH_DIR") or os.path.join(tempfile.gettempdir(), "kvh-bench")


class PeerRunner:
    """Runs peers for run_point: finds a command that can run each peer kind (once per kind; a kind that
    cannot run is skipped with one note), writes the Hugging Face checkpoint of each random: model once
    (torch-eager), runs the peer and appends its record. commands: {kind: argv prefix} overrides."""

    def __init__(self, work=None, commands=None):
        self.work = work or default_work_dir()
        self.commands = dict(commands or {})
        self.ready = {}        # kind -> (argv prefix, version) or None (cannot run)
        self.checkpoints = {}  # (preset, seed) -> dir
        self.commit = None
        self.machine = None

    def candidates(self, kind):
        if kind in self.commands and self.commands[kind]:
            return [self.commands[kind]]
        env = os.environ.get(PEERS[kind]["env"])
        if env:
            return [shlex.split(env)]
        script = os.path.join(REPO, "bench", PEERS[kind]["script"])
        pythons = [sys.executable]
        if os.path.exists("/usr/bin/python3") and os.path.realpath("/usr/bin/python3") != os.path.realpath(
                sys.executable):
            pythons.append("/usr/bin/python3")  # Debian's python3-torch lives there, not in a venv or pyenv
        return [[py, script] for py in pythons]

    def resolve(self, kind, name):
        if kind in self.ready:
            return self.ready[kind]
        why = []
        for cmd in self.candidates(kind):
            try:
                p = subprocess.run(cmd + ["check"], capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.TimeoutExpired) as e:
                why.append(f"{shlex.join(cmd)}: {e}")
                continue
            if p.returncode == 0:
                try:
                    info = json.loads(p.stdout.strip().splitlines()[-1])
                    self.ready[kind] = (cmd, info.get("peer_version", "?"))
                    log(f"kvbench: peer {kind}: {info.get('peer_version', '?')} via {shlex.join(cmd)}")
                    return self.ready[kind]
                except (json.JSONDecodeError, IndexError):
                    why.append(f"{shlex.join(cmd)} check: no JSON line on stdout")
                    continue
            last = (p.stderr.strip().splitlines() or [f"exit status {p.returncode}"])[-1]
            why.append(last)
        self.ready[kind] = None
        log(f"kvbench: note: skipping peer [{name}] ({kind}) everywhere in this run: it cannot run here: "
            f"{'; '.join(why)} (needs {PEERS[kind]['needs']}); no records written for it")
        return None

    def checkpoint(self, cmd, spec):
        """The HF directory torch loads for a model spec: the spec itself for a directory; for random:NAME[:SEED]
        a checkpoint of NAME's shapes written once into the work dir (seeded random weights, not kvhost's own)."""
        rs = random_spec(spec)
        if rs is None:
            return spec
        if rs in self.checkpoints:
            return self.checkpoints[rs]
        d = os.path.join(self.work, f"{rs[0]}-seed{rs[1]}")
        if not (os.path.isfile(os.path.join(d, "config.json")) and os.path.isfile(os.path.join(d, "model.safetensors"))):
            os.makedirs(self.work, exist_ok=True)
            tmp = f"{d}.tmp-{os.getpid()}"
            log(f"kvbench: writing the {rs[0]} checkpoint (seed {rs[1]}) for the torch peer: {d} (once)")
            p = subprocess.run(cmd + ["make-checkpoint", tmp, "--preset", rs[0], "--seed", str(rs[1])],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if p.returncode != 0:
                shutil.rmtree(tmp, ignore_errors=True)
                raise RuntimeError(f"make-checkpoint {rs[0]} failed: "
                                   f"{(p.stderr.strip().splitlines() or ['?'])[-1]}")
            try:
                os.rename(tmp, d)  # atomic: parallel jobs racing on the same checkpoint keep one
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
        self.checkpoints[rs] = d
        return d

    def argv(self, cmd, sweep, c, point, model_dir):
        a = list(cmd) + ["peer"]
        rs = random_spec(point["model"])
        if model_dir:
            a += ["--model-dir", model_dir]
        else:
            a += ["--preset", rs[0], "--seed", str(rs[1])]
        a += ["--batch", str(point["batch"]), "--prompt-tokens", str(point["length"]),
              "--max-new", str(sweep["max_new"]), "--warmup", str(sweep["warmup"]), "--repeats", str(sweep["repeats"])]
        if sweep["threads"]:
            a += ["--threads", str(sweep["threads"])]
        return a

    def run(self, sweep, c, point, out, job_id, dry=False):
        """Returns 'ok', 'failed' or 'skipped'."""
        kind = c["peer"]
        desc = f"[{c['name']}] peer {kind} {point['model']} T={point['length']} B={point['batch']} {point['backend']}"
        if dry:
            cmd = self.candidates(kind)[0]
            print(shlex.join(self.argv(cmd, sweep, c, point, point["model"])))
            return "ok"
        got = self.resolve(kind, c["name"])
        if got is None:
            return "skipped"
        cmd = got[0]
        try:
            # torch-eager loads a checkpoint directory; transformers builds random: presets itself
            model_dir = self.checkpoint(cmd, point["model"]) if kind == "torch-eager" or not \
                point["model"].startswith("random:") else None
        except RuntimeError as e:
            log(f"kvbench: FAILED {desc}: {e}")
            return "failed"
        argv = self.argv(cmd, sweep, c, point, model_dir)
        log(f"kvbench: {desc}")
        p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if p.returncode != 0:
            msg = (p.stderr.strip().splitlines() or [f"exit status {p.returncode}"])[-1]
            if "n_positions" in msg:
                log(f"kvbench: note: skipping {desc}: {msg}")
                return "skipped"
            log(f"kvbench: FAILED {desc}: {msg}")
            return "failed"
        raw = None
        for line in reversed(p.stdout.splitlines()):
            if line.strip().startswith("{"):
                try:
                    cand = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if cand.get("record") == "peer_run":
                    raw = cand
                    break
        need = ("peer_version", "prefill_ms", "total_ms", "step_ms")
        if raw is None or any(k not in raw for k in need):
            log(f"kvbench: FAILED {desc}: no complete peer_run JSON line on its stdout (needs {', '.join(need)})")
            return "failed"
        if self.commit is None:
            self.commit, self.machine = repo_commit(), machine_info()
        append_record(out, peer_record(raw, sweep, c, point, job_id, self.commit, self.machine, model_dir))
        return "ok"


# ---- max batch search ------------------------------------------------------------------------------

def max_feasible(fits, lo=1, hi=256, guess=None):
    """Largest b in [lo, hi] with fits(b) True, assuming fits is monotone (True up to some b, then False).
    Returns (b, probes) with b = lo - 1 when even lo does not fit. Doubles from lo, then bisects.

    guess: None, or a function called after lo fits that returns the likely answer (or None). The search
    then starts there and gallops (steps 1, 2, 4, ... up or down) until it brackets the answer, then
    bisects: a right guess costs two probes after lo (guess fits, guess + 1 does not), whatever its size,
    where doubling from 1 to a batch of 800 costs about twenty. That matters where a probe is expensive
    (a GPU run at a batch of hundreds)."""
    probes = []

    def probe(b):
        r = bool(fits(b))
        probes.append((b, r))
        return r

    if not probe(lo):
        return lo - 1, probes
    g = guess() if guess else None
    if g is not None:
        return _gallop_from(probe, lo, hi, min(hi, max(lo, int(g)))), probes
    good, bad = lo, None
    b = lo
    while bad is None:
        if b >= hi:
            return hi, probes
        b = min(hi, b * 2)
        if probe(b):
            good = b
        else:
            bad = b
    return _bisect(probe, good, bad), probes


def _bisect(probe, good, bad):
    """The largest fitting batch between good (fits) and bad (does not)."""
    while bad - good > 1:
        mid = (good + bad) // 2
        if probe(mid):
            good = mid
        else:
            bad = mid
    return good


def _gallop_from(probe, lo, hi, g):
    """max_feasible's guided search: lo is known to fit; brackets the answer by steps of 1, 2, 4, ... from g,
    then bisects."""
    good, bad = lo, None
    if g > lo and not probe(g):
        bad, step = g, 1
        while True:  # walk down from the failing guess
            b = max(lo, bad - step)
            if b <= good:
                break
            if probe(b):
                good = b
                break
            bad, step = b, step * 2
    else:
        good, step = g, 1
        while True:  # walk up from the fitting guess
            if good >= hi:
                return hi
            b = min(hi, good + step)
            if not probe(b):
                bad = b
                break
            good, step = b, step * 2
    return _bisect(probe, good, bad)


def size_bytes(text):
    """'2G' / '512M' / '1.5GiB' / '4096' -> bytes (powers of 1024, as kvhost --mem-limit reads them)."""
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([kKmMgG]?)(?:i?[bB])?", text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a size such as 256M or 2G")
    # exact (no float: a size of any length is a size; kvhost says whether it is too large)
    return int(fractions.Fraction(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()])


def linear_guess(probe, batch):
    """The max batch under probe.mem_limit if KV bytes grow linearly with the batch, from the peak KV bytes
    of the last run (at `batch`); None when that run recorded none."""
    peak = (probe.last_record or {}).get("kv_bytes_peak")
    if not peak:
        return None
    return size_bytes(probe.mem_limit) * batch // peak


class CapacityProbe:
    """fits(B) for max_feasible: runs kvhost generate at batch B under --mem-limit; 'memory limit' in the
    error means it does not fit, any other failure is an error."""

    def __init__(self, kvhost, model, length, max_new, mem_limit, extra, backend="cpu", threads=None):
        self.kvhost, self.model, self.length, self.max_new = kvhost, model, length, max_new
        self.mem_limit, self.extra, self.backend, self.threads = mem_limit, extra, backend, threads
        self.last_record = None

    def __call__(self, batch):
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "probe.jsonl")
            argv = [self.kvhost, "generate", "--model", self.model, "--backend", self.backend,
                    "--prompt-tokens", str(self.length), "--max-new", str(self.max_new), "--batch", str(batch),
                    "--mem-limit", self.mem_limit, "--quiet", "--json", out] + self.extra
            if self.threads:
                argv += ["--threads", str(self.threads)]
            p = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if p.returncode == 0:
                self.last_record = next((r for _, r in jsonl.records(out, "kvbench capacity")), None)
                return True
            if "memory limit" in p.stderr:
                return False
            raise RuntimeError(f"capacity probe at batch {batch} failed: {p.stderr.strip().splitlines()[-1:]}")


def capacity_record(probe, best, probes, config_name, max_batch):
    rec = {"record": "capacity"}
    base = probe.last_record or {}
    for k in ("kvhost_version", "commit", "time_utc", "machine", "model", "backend", "device", "threads",
              "no_cache", "cache_budget", "cache_slack", "cache_prefill_chunk", "plugins"):
        if k in base:
            rec[k] = base[k]
    rec.update({"prompt_tokens": probe.length, "max_new": probe.max_new, "mem_limit": probe.mem_limit,
                "max_batch": best, "search_max_batch": max_batch, "probes": [[b, r] for b, r in probes],
                "tags": {"config": config_name}})
    if not probe.last_record:
        rec["note"] = "even batch 1 does not fit under the memory limit"
    return rec


def run_eval(kvhost, sweep, out, available):
    """Perplexity of every configuration (kvhost eval), one record per configuration and model."""
    ev = sweep["eval"]
    failed = 0
    for model in ev["models"]:
        for c in sweep["configs"]:
            if c["no_cache"] or c["peer"] or (c["models"] is not None and model not in c["models"]) or \
                    missing_plugins(c, available):
                continue
            argv = [kvhost, "eval", "--model", model, "--text-file", ev["file"], "--max-tokens", str(ev["tokens"]),
                    "--ctx", str(ev["ctx"]), "--mode", ev["mode"], "--json", out,
                    "--tag", f"config={c['name']}", "--tag", f"sweep={os.path.basename(sweep['path'])}"]
            threads = ev["threads"] or sweep["threads"]
            if threads:
                argv += ["--threads", str(threads)]
            argv += config_args(c, ev["ctx"])
            log(f"kvbench: eval [{c['name']}] {model} ctx={ev['ctx']} {ev['mode']}")
            p = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if p.returncode != 0:
                log(f"kvbench: FAILED eval [{c['name']}] {model}: {p.stderr.strip().splitlines()[-1:]}")
                failed += 1
    return failed


def append_record(path, rec):
    line = json.dumps(rec, separators=(",", ":")) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def run_capacity(kvhost, sweep, out, available):
    cap = sweep["capacity"]
    for model in cap["models"]:
        for c in sweep["configs"]:
            if c["no_cache"] or c["peer"] or (c["models"] is not None and model not in c["models"]):
                continue
            if missing_plugins(c, available):
                continue
            log(f"kvbench: capacity [{c['name']}] {model} T={cap['length']} under {cap['mem_limit']}")
            probe = CapacityProbe(kvhost, model, cap["length"], sweep["max_new"], cap["mem_limit"],
                                  config_args(c, cap["length"]) + ["--tag", f"config={c['name']}"],
                                  sweep["backends"][0], sweep["threads"])
            try:
                best, probes = max_feasible(probe, 1, cap["max_batch"])
            except RuntimeError as e:
                log(f"kvbench: FAILED capacity [{c['name']}] {model}: {e}")
                continue
            rec = capacity_record(probe, best, probes, c["name"], cap["max_batch"])
            append_record(out, rec)
            log(f"kvbench:   max batch {best}")


# ---- commands --------------------------------------------------------------------------------------

def check_out(path, append):
    if os.path.exists(path) and not append:
        raise SweepError(f"{path} exists: results are appended, never overwritten; pass --append to add to it "
                         f"or choose a new file")


def peer_runner(a):
    commands = {}
    if getattr(a, "torch_peer", None):
        commands["torch-eager"] = shlex.split(a.torch_peer)
    if getattr(a, "transformers_peer", None):
        commands["transformers"] = shlex.split(a.transformers_peer)
    return PeerRunner(getattr(a, "work", None), commands)


def cmd_run(a):
    sweep = load_sweep(a.sweep)
    check_out(a.out, a.append)
    kvhost = os.path.abspath(a.kvhost)
    peers = peer_runner(a)
    available = available_plugins(kvhost)
    if available is None:
        log(f"kvbench: note: '{kvhost} plugins list' failed; not checking plugins before running")
    totals = [0, 0, 0]
    if a.only:
        a.no_capacity, a.no_eval = a.only != "capacity", a.only != "eval"
    for i, point in enumerate(grid_points(sweep) if not a.only else []):
        r = run_point(kvhost, sweep, point, a.out, i, available, peers=peers)
        totals = [x + y for x, y in zip(totals, r)]
    if sweep["capacity"] and not a.no_capacity:
        run_capacity(kvhost, sweep, a.out, available)
    if sweep["eval"] and not a.no_eval:
        totals[1] += run_eval(kvhost, sweep, a.out, available)
    log(f"kvbench: {totals[0]} generate runs recorded in {a.out}, {totals[1]} failed, {totals[2]} skipped")
    return 1 if totals[1] else 0


def cmd_job(a):
    sweep = load_sweep(a.sweep)
    points = grid_points(sweep)
    if not (0 <= a.index < len(points)):
        raise SweepError(f"job index {a.index}: the sweep has jobs 0..{len(points) - 1}")
    kvhost = os.path.abspath(a.kvhost)
    ok, failed, skipped = run_point(kvhost, sweep, points[a.index], a.out, a.index, available_plugins(kvhost),
                                    peers=peer_runner(a))
    return 1 if failed else 0


def cmd_emit(a):
    sweep = load_sweep(a.sweep)
    n = len(grid_points(sweep))
    me = os.path.abspath(__file__)
    sw = os.path.abspath(a.sweep)
    kvhost = os.path.abspath(a.kvhost)
    outdir = os.path.abspath(a.out_dir)
    extra = []  # peer options travel with every job
    if a.work:
        extra += ["--work", os.path.abspath(a.work)]
    if a.torch_peer:
        extra += ["--torch-peer", a.torch_peer]
    if a.transformers_peer:
        extra += ["--transformers-peer", a.transformers_peer]
    if a.parallel:
        for i in range(n):
            print(shlex.join(["python3", me, "job", sw, str(i), "--kvhost", kvhost,
                              "--out", os.path.join(outdir, f"job-{i:04d}.jsonl")] + extra))
        return 0
    script = f"""#!/bin/bash
# Slurm job array for {os.path.basename(sw)}: one grid point (all its configurations) per task.
# Submit: sbatch {a.slurm}   then merge: python3 {me} merge {outdir}/job-*.jsonl -o all.jsonl
#SBATCH --job-name=kvbench
#SBATCH --array=0-{n - 1}
#SBATCH --cpus-per-task={sweep['threads'] or 2}
#SBATCH --output={outdir}/slurm-%A_%a.log
set -euo pipefail
mkdir -p {shlex.quote(outdir)}
i=$SLURM_ARRAY_TASK_ID
exec python3 {shlex.quote(me)} job {shlex.quote(sw)} "$i" --kvhost {shlex.quote(kvhost)} \\
    --out "{outdir}/job-$(printf %04d "$i").jsonl" {shlex.join(extra)}
"""
    with open(a.slurm, "w", encoding="utf-8") as f:
        f.write(script)
    os.chmod(a.slurm, 0o755)
    log(f"kvbench: wrote {a.slurm} ({n} array tasks)")
    return 0


def merge_files(inputs, out):
    """Concatenates JSON Lines files (each line checked as JSON, duplicates by content dropped; invalid
    UTF-8 is written out as U+FFFD, see bench/jsonl.py)."""
    seen = set()
    n = 0
    lines = []
    for path in inputs:
        try:
            for lineno, line in jsonl.lines(path, "kvbench merge"):  # invalid UTF-8 -> U+FFFD, warned
                try:
                    json.loads(line)
                except json.JSONDecodeError as e:
                    raise SweepError(f"{path}:{lineno}: not a JSON record: {e.msg}") from None
                if line in seen:
                    continue
                seen.add(line)
                lines.append(line)
                n += 1
        except OSError as e:
            raise SweepError(f"{path}: cannot read: {e.strerror}") from None
    with open(out, "a", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")
    return n


def cmd_merge(a):
    check_out(a.o, a.append)
    n = merge_files(a.inputs, a.o)
    log(f"kvbench: {n} records from {len(a.inputs)} files -> {a.o}")
    return 0


def cmd_capacity(a):
    try:
        size_bytes(a.mem_limit)
    except ValueError:
        raise SweepError(f"capacity: --mem-limit {a.mem_limit!r}: expected a size such as 256M or 2G") from None
    extra = []
    if a.config:
        extra += ["--config", a.config]
    if a.plugins:
        extra += ["--plugins", a.plugins]
    for s in a.set or []:
        extra += ["--set", s]
    probe = CapacityProbe(os.path.abspath(a.kvhost), a.model, a.prompt_tokens, a.max_new, a.mem_limit, extra,
                          a.backend, a.threads)
    guess = (lambda: linear_guess(probe, 1)) if a.predict else None
    try:
        best, probes = max_feasible(probe, 1, a.max_batch, guess)
    except RuntimeError as e:  # a probe failed for another reason than the memory limit: kvhost's message
        log(f"kvbench: {e}")
        return 1
    tried = ", ".join("%d:%s" % (b, "ok" if r else "no") for b, r in probes)
    print(f"max batch under {a.mem_limit}: {best}  (probes: {tried})")
    if a.json:
        append_record(a.json, capacity_record(probe, best, probes, a.label or "cli", a.max_batch))
    return 0


def cmd_validate(a):
    sweep = load_sweep(a.sweep)
    pts = grid_points(sweep)
    runs = sum(1 for p in pts for c in sweep["configs"] if config_applies(c, p) and not c["peer"])
    peer_runs = sum(1 for p in pts for c in sweep["configs"] if config_applies(c, p) and c["peer"])
    npeers = sum(1 for c in sweep["configs"] if c["peer"])
    print(f"{a.sweep}: ok: {len(sweep['configs']) - npeers} configurations, {npeers} peers, {len(pts)} grid points, "
          f"{runs} kvhost runs, {peer_runs} peer runs")
    return 0


def peer_options(p):
    p.add_argument("--work", help="where the peers' checkpoints of random: models are written once "
                   "(default: $KVH_BENCH_DIR or /tmp/kvh-bench)")
    p.add_argument("--torch-peer", metavar="CMD", help="command prefix of the torch-eager peer (default: "
                   "$KVBENCH_TORCH_PEER, else this python then /usr/bin/python3 with bench/torch_gpt2.py)")
    p.add_argument("--transformers-peer", metavar="CMD", help="command prefix of the transformers peer "
                   "(default: $KVBENCH_TRANSFORMERS_PEER, else this python then /usr/bin/python3 with "
                   "bench/hf_gpu_bench.py)")


def main(argv=None):
    ap = argparse.ArgumentParser(prog="kvbench.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a sweep, appending records to --out")
    r.add_argument("sweep")
    r.add_argument("--kvhost", default="build/kvhost")
    r.add_argument("--out", required=True)
    r.add_argument("--append", action="store_true", help="add to an existing results file")
    r.add_argument("--no-capacity", action="store_true", help="skip the max-batch search")
    r.add_argument("--no-eval", action="store_true", help="skip the perplexity runs")
    r.add_argument("--only", choices=["capacity", "eval"], help="run only the max-batch search or only eval")
    peer_options(r)
    j = sub.add_parser("job", help="run one grid point (all configurations) of a sweep")
    j.add_argument("sweep")
    j.add_argument("index", type=int)
    j.add_argument("--kvhost", default="build/kvhost")
    j.add_argument("--out", required=True)
    peer_options(j)
    e = sub.add_parser("emit", help="emit the sweep as independent jobs")
    e.add_argument("sweep")
    g = e.add_mutually_exclusive_group(required=True)
    g.add_argument("--parallel", action="store_true", help="print one command per job (for GNU parallel)")
    g.add_argument("--slurm", metavar="SCRIPT", help="write an sbatch job-array script")
    e.add_argument("--kvhost", default="build/kvhost")
    e.add_argument("--out-dir", default="kvbench-jobs")
    peer_options(e)
    m = sub.add_parser("merge", help="merge JSON Lines files")
    m.add_argument("inputs", nargs="+")
    m.add_argument("-o", required=True)
    m.add_argument("--append", action="store_true")
    c = sub.add_parser("capacity", help="largest batch that fits under --mem-limit")
    c.add_argument("--kvhost", default="build/kvhost")
    c.add_argument("--model", default="random:gpt2-medium")
    c.add_argument("--backend", default="cpu")
    c.add_argument("--threads", type=int)
    c.add_argument("--prompt-tokens", type=int, default=256)
    c.add_argument("--max-new", type=int, default=4)
    c.add_argument("--mem-limit", required=True)
    c.add_argument("--max-batch", type=int, default=256)
    c.add_argument("--predict", action="store_true",
                   help="after batch 1, probe the batch its KV bytes predict under the cap (and the one above) "
                        "first: a handful of probes instead of a doubling search (for expensive probes)")
    c.add_argument("--config")
    c.add_argument("--plugins")
    c.add_argument("--set", action="append")
    c.add_argument("--label")
    c.add_argument("--json")
    v = sub.add_parser("validate", help="check a sweep file and count its runs")
    v.add_argument("sweep")
    a = ap.parse_args(argv)
    try:
        return {"run": cmd_run, "job": cmd_job, "emit": cmd_emit, "merge": cmd_merge,
                "capacity": cmd_capacity, "validate": cmd_validate}[a.cmd](a)
    except SweepError as ex:
        log(f"kvbench: {ex}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
