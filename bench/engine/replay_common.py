"""replay_common.py — what the peer replays of bench/engine/ share: reading a request trace, the per-request
timings -> one `replay` record (the field names `kvhost replay --json` writes), nearest-rank percentiles and
the machine description (bench/peer_bench.py's machine(), repo_commit(), utc_now()). Standard library only,
so the llama-server replay runs under any python3 and the transformers one under the peer venv.

Per-request times are seconds since the replay's time 0 (the instant the trace's arrival 0.0 is mapped to):
  arrival_s       the trace's arrival (the request is sent / queued then)
  first_token_s   when the client saw its first generated token
  last_token_s    when the client saw its last generated token
  n_generated     tokens generated (counted up to the request's max_tokens)
  tpot_tokens     the number of inter-token gaps last_token_s - first_token_s spans (normally n_generated - 1;
                  llama-server may deliver the first token late, see replay_llama_server.py)
Summary (docs in bench/engine/README.md):
  ttft_ms   per request (first_token_s - arrival_s) * 1000, queueing included
  tpot_ms   per request (last_token_s - first_token_s) / tpot_tokens * 1000 (requests with one token excluded)
  duration_s  time 0 -> the last request's last token; tokens_per_s = generated_tokens / duration_s,
              requests_per_s = completed / duration_s
  percentiles: nearest rank on the per-request values (p-th: the ceil(p/100 * n)-th smallest)
"""
import json
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.dirname(HERE)
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

import peer_bench  # noqa: E402  (machine(), repo_commit(), utc_now(); stdlib only at import)

TRACE_KEYS = ("id", "arrival", "prompt_ids", "max_tokens")


class TraceError(Exception):
    pass


def load_trace(path, vocab=50257):
    """The trace's requests as dicts, sorted by arrival (stable). Each needs id, arrival, prompt_ids (a list of
    token ids < vocab) and max_tokens >= 1; the "prompt" (text) and "prompt_tokens" (count) forms are refused:
    the peers send token ids, so generate traces with explicit prompt_ids. Raises TraceError naming PATH:LINE."""
    reqs = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                text = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise TraceError(f"{where}: not UTF-8")
            if not text:
                continue
            try:
                r = json.loads(text)
            except json.JSONDecodeError as e:
                raise TraceError(f"{where}: not JSON ({e.msg} at column {e.colno})")
            if not isinstance(r, dict):
                raise TraceError(f"{where}: not a JSON object")
            if "prompt_ids" not in r and ("prompt" in r or "prompt_tokens" in r):
                form = "prompt" if "prompt" in r else "prompt_tokens"
                raise TraceError(f"{where}: request {r.get('id')!r} gives \"{form}\"; the peer replays need explicit "
                                 "\"prompt_ids\" (write the trace with `kvhost trace` or bench/engine/gen_trace.py)")
            for k in TRACE_KEYS:
                if k not in r:
                    raise TraceError(f"{where}: no \"{k}\"")
            ids = r["prompt_ids"]
            if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
                raise TraceError(f"{where}: \"prompt_ids\" must be a non-empty list of token ids in [0, {vocab})")
            if not isinstance(r["arrival"], (int, float)) or r["arrival"] < 0 or not math.isfinite(r["arrival"]):
                raise TraceError(f"{where}: \"arrival\" must be a number of seconds >= 0")
            if not isinstance(r["max_tokens"], int) or r["max_tokens"] < 1:
                raise TraceError(f"{where}: \"max_tokens\" must be an integer >= 1")
            if r.get("temperature", 0) not in (0, 0.0):
                print(f"replay: note: {where}: temperature {r['temperature']} ignored; the peer replays decode "
                      "greedily", file=sys.stderr)
            r["_line"] = n
            reqs.append(r)
    if not reqs:
        raise TraceError(f"{path}: no requests")
    reqs.sort(key=lambda r: r["arrival"])
    return reqs


def nearest_rank(values, p):
    s = sorted(values)
    if not s:
        return None
    k = max(1, math.ceil(p / 100.0 * len(s)))
    return s[k - 1]


def dist(values):
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    r = lambda x: round(x, 3)  # noqa: E731
    return {"p50": r(nearest_rank(values, 50)), "p90": r(nearest_rank(values, 90)),
            "p99": r(nearest_rank(values, 99)), "mean": r(sum(values) / len(values))}


def max_overlap(intervals):
    """Largest number of [start, end] intervals open at one instant (an end at t closes before a start at t)."""
    ev = []
    for a, b in intervals:
        ev.append((a, 1))
        ev.append((b, -1))
    ev.sort(key=lambda e: (e[0], e[1]))
    cur = best = 0
    for _, d in ev:
        cur += d
        best = max(best, cur)
    return best


def machine_start():
    m = peer_bench.machine()
    m["load1_start"] = round(os.getloadavg()[0], 2)
    return m


def machine_end(m):
    m["load1_end"] = round(os.getloadavg()[0], 2)
    return m


def record(peer, trace, reqs, results, threads, settings, machine, max_concurrent, tool_version=None,
           per_request=True, extra=None):
    """The `replay` record. results: {id: per-request dict (see the module docstring)}, missing = not completed."""
    done = [results[r["id"]] for r in reqs if r["id"] in results and results[r["id"]].get("n_generated")]
    ttft = [(d["first_token_s"] - d["arrival_s"]) * 1e3 for d in done]
    tpot = [(d["last_token_s"] - d["first_token_s"]) / d["tpot_tokens"] * 1e3 for d in done
            if d.get("tpot_tokens", 0) >= 1]
    gen = sum(d["n_generated"] for d in done)
    ptok = sum(len(r["prompt_ids"]) for r in reqs if r["id"] in results and results[r["id"]].get("n_generated"))
    dur = max((d["last_token_s"] for d in done), default=0.0)
    rec = {
        "command": "replay", "peer": peer, "trace": os.path.abspath(trace), "requests": len(reqs),
        "completed": len(done), "duration_s": round(dur, 4), "generated_tokens": gen, "prompt_tokens": ptok,
        "tokens_per_s": round(gen / dur, 3) if dur > 0 else None,
        "requests_per_s": round(len(done) / dur, 4) if dur > 0 else None,
        "ttft_ms": dist(ttft), "tpot_ms": dist(tpot), "max_concurrent": max_concurrent, "threads": threads,
        "settings": settings, "machine": machine, "tool_version": tool_version,
        "commit": peer_bench.repo_commit(), "timestamp": peer_bench.utc_now(),
    }
    if extra:
        rec.update(extra)
    if per_request:
        rows = []
        for r in reqs:
            d = results.get(r["id"])
            if not d or not d.get("n_generated"):
                continue
            rows.append({"id": r["id"], "arrival_s": round(d["arrival_s"], 4),
                         "ttft_ms": round((d["first_token_s"] - d["arrival_s"]) * 1e3, 3),
                         "tpot_ms": (round((d["last_token_s"] - d["first_token_s"]) / d["tpot_tokens"] * 1e3, 3)
                                     if d.get("tpot_tokens", 0) >= 1 else None),
                         "finish_s": round(d["last_token_s"], 4), "tokens": d["n_generated"]})
        rec["per_request"] = rows
    return rec


def append_record(path, rec):
    line = json.dumps(rec, separators=(",", ":"))
    if path in (None, "-"):
        print(line, flush=True)
        return
    with open(path, "a") as f:
        f.write(line + "\n")


def summary_line(rec):
    t, p = rec["ttft_ms"], rec["tpot_ms"]
    f = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
    return (f"{rec['peer'] or 'kvhost'}: {rec['completed']}/{rec['requests']} requests in {rec['duration_s']:.2f} s, "
            f"{rec['tokens_per_s'] or 0:.2f} tok/s, {rec['requests_per_s'] or 0:.3f} req/s, "
            f"TTFT p50/p99 {f(t['p50'])}/{f(t['p99'])} ms, TPOT p50/p99 {f(p['p50'])}/{f(p['p99'])} ms, "
            f"max concurrent {rec['max_concurrent']}")
