#!/usr/bin/env python3
"""load.py — a bounded load generator for OpenAI-compatible completion servers (kvhost serve, llama-server).

N concurrent clients, each sending streaming POST /v1/completions requests back to back for a fixed time
(standard library only: http.client in threads). Reports requests/s, generated tokens/s (streamed chunks),
p50/p99 time to first token and time per output token, and errors (any non-200, malformed event, or a
stream without data: [DONE]); appends one JSON line with --json.

usage: load.py --url http://127.0.0.1:8080 --clients 8 --duration 30 --max-tokens 64
               [--prompt-words 48 | --prompt-ids 64] [--temperature 0.8] [--top-k 0] [--top-p 1]
               [--label kvhost] [--json results.jsonl] [--api-key KEY]

--prompt-ids N sends N random token ids (seeded per client, never GPT-2's <|endoftext|> 50256) instead of
text: every server then sees prompts of exactly the same length, whatever its tokenizer does with text.
--top-k / --top-p are sent only when given, so a comparison can pin the whole sampling chain on servers
whose defaults differ (llama-server applies top_k 40, top_p 0.95 and more unless told otherwise).
"""
import argparse
import http.client
import json
import math
import random
import threading
import time
import urllib.parse


def nearest_rank(v, pct):
    if not v:
        return None
    v = sorted(v)
    k = max(1, min(len(v), math.ceil(pct / 100.0 * len(v))))
    return v[k - 1]


def one_request(host, port, body, headers, timeout):
    """Returns (ok, ttft_s, [inter-chunk gaps], n_chunks, error)."""
    c = http.client.HTTPConnection(host, port, timeout=timeout)
    t0 = time.perf_counter()
    try:
        c.request("POST", "/v1/completions", body, headers)
        r = c.getresponse()
        if r.status != 200:
            return False, None, [], 0, "HTTP %d %s" % (r.status, r.read()[:200])
        first, last, gaps, n, done = None, None, [], 0, False
        while True:
            line = r.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data: "):
                continue
            data = line[6:]
            if data == b"[DONE]":
                done = True
                break
            ev = json.loads(data)
            if not ev["choices"][0].get("text"):
                continue
            now = time.perf_counter()
            if first is None:
                first = now
            else:
                gaps.append(now - last)
            last = now
            n += 1
        if not done:
            return False, None, [], n, "stream ended without [DONE]"
        return True, (first - t0) if first else None, gaps, n, None
    except Exception as e:  # noqa: BLE001 - every failure is an error of the run
        return False, None, [], 0, repr(e)
    finally:
        c.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--duration", type=float, default=30)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt-words", type=int, default=48)
    ap.add_argument("--prompt-ids", type=int, default=0, help="N random token ids instead of text")
    ap.add_argument("--vocab", type=int, default=50257, help="ids are drawn from [0, vocab - 1)")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--top-p", type=float, default=None)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--label", default="")
    ap.add_argument("--api-key", default="")
    ap.add_argument("--json", default="")
    ap.add_argument("--meta", default="{}", help="JSON object merged into the record (server, round, ...)")
    a = ap.parse_args()
    u = urllib.parse.urlparse(a.url)
    host, port = u.hostname, u.port or 80
    words = ("the of and to in a is that for it as was with be by on not he this are or his from at which "
             "but have an they you were her all she there would their we him been has when who will more").split()
    rng = random.Random(a.seed)
    headers = {"Content-Type": "application/json"}
    if a.api_key:
        headers["Authorization"] = "Bearer " + a.api_key
    lock = threading.Lock()
    res = {"ok": 0, "errors": 0, "ttft": [], "tpot": [], "chunks": 0, "first_errors": []}
    end = time.perf_counter() + a.duration

    def client(i):
        r = random.Random(a.seed * 1000 + i)
        while time.perf_counter() < end:
            if a.prompt_ids > 0:
                prompt = [r.randrange(a.vocab - 1) for _ in range(a.prompt_ids)]
            else:
                prompt = " ".join(r.choice(words) for _ in range(a.prompt_words))
            req = {"model": "m", "prompt": prompt, "max_tokens": a.max_tokens, "temperature": a.temperature,
                   "seed": r.randrange(1 << 30), "stream": True}
            if a.top_k is not None:
                req["top_k"] = a.top_k
            if a.top_p is not None:
                req["top_p"] = a.top_p
            body = json.dumps(req)
            ok, ttft, gaps, n, err = one_request(host, port, body, headers, timeout=max(60.0, a.duration * 2))
            with lock:
                if ok:
                    res["ok"] += 1
                    res["chunks"] += n
                    if ttft is not None:
                        res["ttft"].append(ttft * 1e3)
                    if gaps:
                        res["tpot"].append(sum(gaps) / len(gaps) * 1e3)
                else:
                    res["errors"] += 1
                    if len(res["first_errors"]) < 5:
                        res["first_errors"].append(err)

    _ = rng
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(a.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    rec = {"record": "serve_load", "label": a.label, "url": a.url, "clients": a.clients, "duration_s": a.duration,
           "wall_s": round(wall, 3), "max_tokens": a.max_tokens, "prompt_words": 0 if a.prompt_ids > 0 else a.prompt_words,
           "prompt_ids": a.prompt_ids, "temperature": a.temperature, "top_k": a.top_k, "top_p": a.top_p,
           "requests_ok": res["ok"], "errors": res["errors"], "requests_per_s": res["ok"] / wall,
           "chunks_per_s": res["chunks"] / wall,
           "ttft_ms": {"p50": nearest_rank(res["ttft"], 50), "p99": nearest_rank(res["ttft"], 99)},
           "tpot_ms": {"p50": nearest_rank(res["tpot"], 50), "p99": nearest_rank(res["tpot"], 99)},
           "first_errors": res["first_errors"], "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "loadavg_1m_end": float(open("/proc/loadavg").read().split()[0])}
    rec.update(json.loads(a.meta))
    f = lambda v: "-" if v is None else "%.1f" % v  # noqa: E731
    print("%s: %d clients, %.0f s: %d requests (%.2f req/s), %.1f chunks/s, TTFT p50 %s p99 %s ms, "
          "TPOT p50 %s p99 %s ms, errors %d" % (a.label or a.url, a.clients, wall, res["ok"], rec["requests_per_s"],
                                                rec["chunks_per_s"], f(rec["ttft_ms"]["p50"]), f(rec["ttft_ms"]["p99"]),
                                                f(rec["tpot_ms"]["p50"]), f(rec["tpot_ms"]["p99"]), res["errors"]))
    for e in res["first_errors"]:
        print("  error:", e)
    if a.json:
        with open(a.json, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
