#!/usr/bin/env python3
"""replay_llama_server.py — the llama.cpp peer of the engine benchmark (issue #15): replays a request trace
against llama-server (parallel slots, continuous batching) over its HTTP API and appends one `replay` record
with the field names of `kvhost replay --json`.

  python3 bench/engine/replay_llama_server.py TRACE --gguf MODEL.gguf --parallel N --threads T \
      [--server PATH] [--ctx-per-slot C] [--cache-type f32] [--no-cache-prompt] [--warmup 1] \
      [--server-arg=ARG ...] [--json OUT.jsonl] [--server-log PATH]

What it does:
  1. starts `llama-server -m MODEL -np N -cb -t T -tb T -c N*C -ctk TYPE -ctv TYPE --no-webui
     --host 127.0.0.1 --port P` (P a free port) and waits for GET /health to answer 200;
  2. sends --warmup untimed requests (a 16-token prompt, 4 tokens), one at a time;
  3. time 0: every request is sent by its own thread at its arrival time, as POST /completion with
     {"prompt": prompt_ids (token ids), "n_predict": max_tokens, "ignore_eos": true, "temperature": 0,
      "stream": true, "return_tokens": true, "cache_prompt": true (or false with --no-cache-prompt),
      "seed": the trace's seed}; the streamed chunks are timed client-side (time.monotonic());
  4. stops the server (SIGTERM, then SIGKILL after 15 s) and appends the record.
Timing: TTFT = arrival of the first chunk carrying a generated token - the request's arrival (scheduled send
time, so queueing at the server counts). llama-server holds back a token whose text ends in an incomplete
UTF-8 sequence and sends it with the next chunk; every chunk carries "tokens_predicted", so a request whose
first chunk already counts k > 1 tokens has its first-token time taken as that chunk's (late by up to k-1
tokens; the record counts such requests in "late_first_token"), and its TPOT is (last chunk - first chunk) /
(tokens_predicted of the last - of the first), exact mean inter-token time over the span the client saw.
max_concurrent: the largest number of requests between their first and last token at one instant, seen from
the client (at most N: a slot holds each). Needs only the Python standard library.
"""
import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import replay_common as rc  # noqa: E402

DEFAULT_SERVER = os.path.join(os.environ.get("KVH_LLAMA_DIR", "/work/peers/llama.cpp"), "build", "bin",
                              "llama-server")


def note(msg):
    print(f"replay_llama_server: {msg}", file=sys.stderr, flush=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def get_json(port, path, timeout=5.0):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("GET", path)
        r = c.getresponse()
        body = r.read()
        return r.status, (json.loads(body) if body else None)
    finally:
        c.close()


def wait_health(port, proc, timeout):
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if proc.poll() is not None:
            return f"llama-server exited with status {proc.returncode} before it was ready"
        try:
            st, _ = get_json(port, "/health", timeout=2.0)
            if st == 200:
                return None
        except (OSError, http.client.HTTPException, ValueError):
            pass
        time.sleep(0.25)
    return f"llama-server not healthy after {timeout:.0f} s"


def stream_completion(port, body, timeout, on_chunk):
    """POST /completion with stream; calls on_chunk(t, obj) for every SSE data object; returns the last one."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    last = None
    try:
        c.request("POST", "/completion", body=json.dumps(body), headers={"Content-Type": "application/json"})
        r = c.getresponse()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
        while True:
            line = r.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            t = time.monotonic()
            payload = line[5:].strip()
            if payload == b"[DONE]":
                break
            obj = json.loads(payload)
            if "error" in obj:
                raise RuntimeError(f"server error: {obj['error']}")
            on_chunk(t, obj)
            last = obj
            if obj.get("stop"):
                break
    finally:
        c.close()
    return last


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace")
    ap.add_argument("--gguf", required=True, help="the model as GGUF (F32 for the benchmark)")
    ap.add_argument("--server", default=DEFAULT_SERVER, help=f"llama-server binary (default {DEFAULT_SERVER})")
    ap.add_argument("--parallel", "-np", type=int, default=4, help="server slots (-np)")
    ap.add_argument("--threads", "-t", type=int, default=1, help="-t and -tb")
    ap.add_argument("--ctx-per-slot", type=int, default=0,
                    help="context per slot (-c = N * this); default: the trace's longest prompt + max_tokens, "
                         "rounded up to 256, at most 1024 (GPT-2's context)")
    ap.add_argument("--cache-type", default="f32", help="-ctk/-ctv (default f32: kvhost's plain cache is fp32)")
    ap.add_argument("--no-cache-prompt", action="store_true", help="send cache_prompt false")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--server-arg", action="append", default=[], help="one extra llama-server argument (repeat)")
    ap.add_argument("--request-timeout", type=float, default=1800.0)
    ap.add_argument("--ready-timeout", type=float, default=180.0)
    ap.add_argument("--json", default="-", help="append the record here (default stdout)")
    ap.add_argument("--server-log", default=None, help="llama-server's output (default: a temporary file, "
                                                       "its tail printed when the server fails)")
    ap.add_argument("--no-per-request", action="store_true", help="leave the per_request rows out of the record")
    a = ap.parse_args(argv)

    try:
        reqs = rc.load_trace(a.trace)
    except (OSError, rc.TraceError) as e:
        note(f"error: {e}")
        return 2
    if not (os.path.isfile(a.server) and os.access(a.server, os.X_OK)):
        note(f"error: no llama-server at {a.server} (bench/engine/README.md: building the peers)")
        return 2
    if not os.path.isfile(a.gguf):
        note(f"error: no GGUF file {a.gguf}")
        return 2
    need = max(len(r["prompt_ids"]) + r["max_tokens"] for r in reqs)
    ctx = a.ctx_per_slot or min(1024, -(-need // 256) * 256)
    if need > ctx:
        note(f"error: the trace needs {need} tokens of context in one slot, more than --ctx-per-slot {ctx}")
        return 2

    port = free_port()
    cmd = [a.server, "-m", a.gguf, "-np", str(a.parallel), "-cb", "-t", str(a.threads), "-tb", str(a.threads),
           "-c", str(a.parallel * ctx), "-ctk", a.cache_type, "-ctv", a.cache_type, "--no-webui",
           "--host", "127.0.0.1", "--port", str(port)] + a.server_arg
    log_path = a.server_log or tempfile.mkstemp(prefix="llama-server-", suffix=".log")[1]
    logf = open(log_path, "w")
    machine = rc.machine_start()
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT)

    def log_tail():
        logf.flush()
        try:
            with open(log_path) as f:
                return "".join(f.readlines()[-15:])
        except OSError:
            return ""

    def stop_server():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        logf.close()

    try:
        why = wait_health(port, proc, a.ready_timeout)
        if why:
            note(f"error: {why}; its log ({log_path}) ends:\n{log_tail()}")
            return 1
        props = {}
        try:
            _, pj = get_json(port, "/props")
            dg = (pj or {}).get("default_generation_settings", {})
            props = {"total_slots": (pj or {}).get("total_slots"), "n_ctx_per_slot": dg.get("n_ctx"),
                     "build_info": (pj or {}).get("build_info")}
        except (OSError, http.client.HTTPException, ValueError):
            pass
        base = {"ignore_eos": True, "temperature": 0, "stream": True, "return_tokens": True,
                "cache_prompt": not a.no_cache_prompt}
        for i in range(a.warmup):
            stream_completion(port, dict(base, prompt=[(j * 7919 + 13 + i) % 50000 for j in range(16)],
                                         n_predict=4, cache_prompt=False), a.request_timeout, lambda t, o: None)

        results, errors, lock = {}, [], threading.Lock()
        t0 = time.monotonic() + 0.05

        def worker(r):
            chunks = []  # (t, tokens_predicted)
            body = dict(base, prompt=r["prompt_ids"], n_predict=r["max_tokens"])
            if "seed" in r:
                body["seed"] = r["seed"]
            send = time.monotonic()
            try:
                last = stream_completion(port, body, a.request_timeout,
                                         lambda t, o: chunks.append((t, o.get("tokens_predicted"), len(o.get("tokens") or []))))
            except Exception as e:  # noqa: BLE001 — any failure of one request is recorded, not fatal
                with lock:
                    errors.append(f"{r['id']}: {e}")
                return
            tok = [(t, k) for t, k, n in chunks if n > 0 and k]
            n_gen = (last or {}).get("tokens_predicted") or (tok[-1][1] if tok else 0)
            if not tok or not n_gen:
                with lock:
                    errors.append(f"{r['id']}: no generated token in the stream")
                return
            (tf, kf), (tl, kl) = tok[0], tok[-1]
            with lock:
                results[r["id"]] = {"arrival_s": r["arrival"], "send_s": send - t0, "first_token_s": tf - t0,
                                    "last_token_s": tl - t0, "n_generated": min(n_gen, r["max_tokens"]),
                                    "tpot_tokens": kl - kf, "first_k": kf,
                                    "server_timings": (last or {}).get("timings")}

        threads = []
        for r in reqs:
            delay = t0 + r["arrival"] - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            th = threading.Thread(target=worker, args=(r,), daemon=True)
            th.start()
            threads.append(th)
        for th in threads:
            th.join()
        server_alive = proc.poll() is None
    finally:
        stop_server()
    rc.machine_end(machine)

    if errors:
        note(f"{len(errors)} request(s) failed; first: {errors[0]}")
        if not server_alive:
            note(f"llama-server died; its log ({log_path}) ends:\n{log_tail()}")
    done = list(results.values())
    intervals = [(d["first_token_s"], d["last_token_s"]) for d in done]
    lags = [d["send_s"] - d["arrival_s"] for d in done]
    srv_prompt = [d["server_timings"].get("prompt_ms") for d in done if d.get("server_timings")]
    version = None
    try:
        v = subprocess.run([a.server, "--version"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=30).stdout
        version = "llama.cpp " + " ".join(x.strip() for x in v.strip().splitlines() if x.strip().startswith("version"))
    except (OSError, subprocess.SubprocessError):
        pass
    settings = {"parallel": a.parallel, "cont_batching": True, "ctx_per_slot": ctx, "ctx_total": a.parallel * ctx,
                "cache_type": a.cache_type, "cache_prompt": not a.no_cache_prompt, "ignore_eos": True,
                "sampling": "greedy (temperature 0)", "stream": True, "warmup_requests": a.warmup,
                "gguf": os.path.abspath(a.gguf), "server": os.path.abspath(a.server), "server_cmd": cmd[1:],
                "server_props": props}
    extra = {"errors": len(errors), "late_first_token": sum(1 for d in done if d["first_k"] > 1),
             "max_send_lag_ms": round(max(lags) * 1e3, 3) if lags else None,
             "server_prompt_ms_mean": round(sum(srv_prompt) / len(srv_prompt), 3) if srv_prompt else None}
    rec = rc.record("llama-server", a.trace, reqs, results, a.threads, settings, machine,
                    rc.max_overlap(intervals), tool_version=version, per_request=not a.no_per_request, extra=extra)
    rc.append_record(a.json, rec)
    note(rc.summary_line(rec))
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
