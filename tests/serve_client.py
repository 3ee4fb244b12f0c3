#!/usr/bin/env python3
"""serve_client.py — `kvhost serve` against the real `openai` Python client (issue 17).

Starts the server on a free loopback port (--port 0; the port is read from its start line) with the small
trained model beside the repository (../shared/models/gpt2-tiny-wt; random:gpt2 without it), then checks:
the completion object and usage, greedy determinism, streaming (chunks joined = the non-streaming text,
finish_reason on the last chunk, [DONE]), stop strings, /v1/models, errors through the client (400 naming
the field, unsupported OpenAI options, 401 for a wrong key), raw HTTP errors (malformed JSON, 413, 404,
405), 429 with Retry-After when --max-waiting requests wait, a client that disconnects mid-stream
(cancelled in the engine: /metrics counts it), /health and /metrics, and SIGTERM (503 to new requests,
in-flight stream finished, exit 0 — under ASan also: no leak).

usage: serve_client.py PATH/TO/kvhost        exit 0 ok, 1 failed, 77 skipped (no `openai` package)
"""
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

try:
    import openai
except ImportError:
    print("serve_client: skipped: the `openai` Python package is not importable by %s "
          "(pip install openai; scripts/install-deps.sh tries)" % sys.executable)
    sys.exit(77)

KEY = "test-key-123"
failures = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    if not cond:
        failures.append(what)


def start(kvhost, extra):
    src = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tiny = os.path.join(src, "..", "shared", "models", "gpt2-tiny-wt")
    model = tiny if os.path.isdir(tiny) else "random:gpt2"
    cmd = [kvhost, "serve", "--model", model, "--port", "0", "--threads", "2", "--api-key", KEY] + extra
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    lines = []
    while time.time() < deadline:
        line = p.stderr.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
        if m:
            # keep draining stderr so the server never blocks on a full pipe
            threading.Thread(target=lambda: lines.extend(p.stderr), daemon=True).start()
            return p, int(m.group(1)), lines
    p.kill()
    print("".join(lines))
    sys.exit("serve_client: the server did not start: %s" % " ".join(cmd))


def raw(port, method, path, body=None, headers=None, timeout=60):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    h = {"Authorization": "Bearer " + KEY}
    h.update(headers or {})
    c.request(method, path, body=body, headers=h)
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, dict(r.getheaders()), data


def metric(port, name):
    _, _, text = raw(port, "GET", "/metrics")
    for line in text.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return None


def error_of(exc):
    body = getattr(exc, "body", None) or {}
    return body.get("error", body) if isinstance(body, dict) else {}


def main():
    kvhost = sys.argv[1]
    p, port, lines = start(kvhost, ["--max-seqs", "1", "--max-waiting", "1", "--max-body", "8K", "--grace-s", "30"])
    try:
        client = openai.OpenAI(base_url="http://127.0.0.1:%d/v1" % port, api_key=KEY, max_retries=0, timeout=120)
        prompt = "The history of the city"

        # ---- non-streaming ----
        r = client.completions.create(model="m", prompt=prompt, max_tokens=12, temperature=0)
        check(r.object == "text_completion" and r.id and isinstance(r.created, int), "completion object")
        check(len(r.choices) == 1 and r.choices[0].index == 0 and isinstance(r.choices[0].text, str), "one choice")
        check(r.choices[0].finish_reason in ("length", "stop"), "finish_reason %r" % r.choices[0].finish_reason)
        u = r.usage
        check(u.prompt_tokens == 5 and u.total_tokens == u.prompt_tokens + u.completion_tokens, "usage %s" % u)
        check(r.choices[0].finish_reason == "stop" or u.completion_tokens == 12, "12 tokens unless stopped")
        text = r.choices[0].text
        r2 = client.completions.create(model="m", prompt=prompt, max_tokens=12, temperature=0)
        check(r2.choices[0].text == text, "greedy is deterministic")
        r3 = client.completions.create(model="m", prompt=[464, 2106, 286, 262, 1748], max_tokens=12, temperature=0)
        check(r3.choices[0].text == text, "token-id prompt = the same text prompt")
        rs = client.completions.create(model="m", prompt=prompt, max_tokens=6, temperature=0.9, top_p=0.9, extra_body={"top_k": 40},
                                       seed=7)
        rs2 = client.completions.create(model="m", prompt=prompt, max_tokens=6, temperature=0.9, top_p=0.9, extra_body={"top_k": 40},
                                        seed=7)
        check(rs.choices[0].text == rs2.choices[0].text, "sampling with a seed is reproducible")

        # ---- streaming ----
        chunks = list(client.completions.create(model="m", prompt=prompt, max_tokens=12, temperature=0, stream=True))
        joined = "".join(c.choices[0].text for c in chunks)
        check(joined == text, "stream joined = non-streaming text (%r vs %r)" % (joined, text))
        check(all(c.choices[0].finish_reason is None for c in chunks[:-1]) and
              chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason, "finish_reason on the last chunk")
        st, hd, body = raw(port, "POST", "/v1/completions",
                           json.dumps({"prompt": prompt, "max_tokens": 3, "stream": True}),
                           {"Content-Type": "application/json"})
        events = body.decode().split("\n\n")
        check(st == 200 and hd.get("Content-Type", "").startswith("text/event-stream"), "SSE content type")
        check(events[-2] == "data: [DONE]" and events[-1] == "" and
              all(e.startswith("data: {") for e in events[:-2]), "SSE framing ends with data: [DONE]")

        # ---- stop strings ----
        k = next((i for i in range(1, len(text) - 1) if text[i:i + 2].strip()), None)
        if k is not None:
            stop = text[k:k + 2]
            rr = client.completions.create(model="m", prompt=prompt, max_tokens=12, temperature=0, stop=[stop])
            check(rr.choices[0].text == text[:text.find(stop)] and rr.choices[0].finish_reason == "stop",
                  "stop %r cuts the text before it (%r)" % (stop, rr.choices[0].text))
            sc = list(client.completions.create(model="m", prompt=prompt, max_tokens=12, temperature=0, stop=stop,
                                                stream=True))
            check("".join(c.choices[0].text for c in sc) == text[:text.find(stop)] and
                  sc[-1].choices[0].finish_reason == "stop", "stop in a stream")

        # ---- models ----
        models = client.models.list()
        check(len(models.data) == 1 and models.data[0].id, "/v1/models lists the model")

        # ---- errors through the client ----
        try:
            client.completions.create(model="m", prompt=prompt, max_tokens=4, extra_body={"temprature": 1})
            check(False, "unknown field refused")
        except openai.BadRequestError as e:
            err = error_of(e)
            check(e.status_code == 400 and err.get("param") == "temprature" and err.get("code") == "unknown_field",
                  "unknown field: 400 naming it")
        try:
            client.completions.create(model="m", prompt=prompt, max_tokens=4, n=2)
            check(False, "n=2 refused")
        except openai.BadRequestError as e:
            check(error_of(e).get("param") == "n", "n=2: 400 not supported")
        r = client.completions.create(model="m", prompt=prompt, max_tokens=2, n=1, echo=False, presence_penalty=0,
                                      frequency_penalty=0, user="u", logprobs=None)
        check(len(r.choices) == 1, "OpenAI defaults (n=1, echo=false, penalties 0, user) accepted")
        for bad in (-1, 0, 100000):
            try:
                client.completions.create(model="m", prompt=prompt, max_tokens=bad)
                check(False, "max_tokens %d refused" % bad)
            except openai.BadRequestError as e:
                check(error_of(e).get("param") == "max_tokens", "max_tokens %d: 400" % bad)
        try:
            client.completions.create(model="m", prompt=[1] * 1020, max_tokens=10)
            check(False, "prompt over the context refused")
        except openai.BadRequestError as e:
            check(error_of(e).get("code") == "context_length_exceeded", "prompt over the context: 400")
        r = client.completions.create(model="m", prompt=[1] * 1020, max_tokens=10, extra_body={"truncate": True})
        check(r.usage.prompt_tokens == 1014, "truncate keeps the last n_positions - max_tokens tokens")
        bad_client = openai.OpenAI(base_url="http://127.0.0.1:%d/v1" % port, api_key="wrong", max_retries=0)
        try:
            bad_client.completions.create(model="m", prompt=prompt, max_tokens=2)
            check(False, "wrong key refused")
        except openai.AuthenticationError as e:
            check(e.status_code == 401, "wrong API key: 401")

        # ---- raw HTTP errors ----
        st, _, body = raw(port, "POST", "/v1/completions", '{"prompt": "a",', {"Content-Type": "application/json"})
        check(st == 400 and json.loads(body)["error"]["code"] == "invalid_json", "malformed JSON: 400")
        st, _, body = raw(port, "POST", "/v1/completions", json.dumps({"prompt": "a" * 20000}))
        check(st == 413 and "error" in json.loads(body), "body over --max-body: 413")
        st, _, _ = raw(port, "GET", "/v1/nothing")
        check(st == 404, "unknown route: 404")
        st, hd, _ = raw(port, "GET", "/v1/completions")
        check(st == 405 and "POST" in hd.get("Allow", ""), "GET /v1/completions: 405 with Allow")
        st, _, _ = raw(port, "GET", "/metrics", headers={"Authorization": "Bearer nope"})
        check(st == 401, "/metrics needs the key")
        st, _, body = raw(port, "GET", "/health", headers={"Authorization": ""})
        check(st == 200 and json.loads(body)["status"] == "ok", "/health without a key")

        # ---- a client that goes away mid-stream is cancelled at once ----
        before = metric(port, 'kvhost_requests_total{outcome="cancelled"}')
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        c.request("POST", "/v1/completions", json.dumps({"prompt": prompt, "max_tokens": 1000, "stream": True}),
                  {"Authorization": "Bearer " + KEY})
        resp = c.getresponse()
        resp.fp.readline()
        c.sock.shutdown(2)
        c.close()
        t0 = time.time()
        while time.time() - t0 < 10 and metric(port, 'kvhost_requests_total{outcome="cancelled"}') == before:
            time.sleep(0.05)
        after = metric(port, 'kvhost_requests_total{outcome="cancelled"}')
        check(after == before + 1, "disconnect mid-stream cancels the request (%.2f s)" % (time.time() - t0))
        check(metric(port, "kvhost_requests_in_flight") == 0, "nothing left in flight")

        # ---- 429 when --max-waiting requests wait (--max-seqs 1: one runs, one waits) ----
        long_body = json.dumps({"prompt": prompt, "max_tokens": 1000, "stream": True})
        a = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        a.request("POST", "/v1/completions", long_body, {"Authorization": "Bearer " + KEY})
        ra = a.getresponse()
        ra.fp.readline()  # A runs
        b = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        b.request("POST", "/v1/completions", long_body, {"Authorization": "Bearer " + KEY})
        t0 = time.time()
        while time.time() - t0 < 10 and metric(port, "kvhost_requests_waiting") != 1:
            time.sleep(0.02)
        st, hd, body = raw(port, "POST", "/v1/completions", json.dumps({"prompt": prompt, "max_tokens": 2}))
        check(st == 429 and hd.get("Retry-After") == "1" and json.loads(body)["error"]["type"] == "rate_limit_error",
              "429 with Retry-After when --max-waiting requests wait")
        for conn in (a, b):
            conn.sock.shutdown(2)
            conn.close()
        t0 = time.time()
        while time.time() - t0 < 10 and metric(port, "kvhost_requests_in_flight") != 0:
            time.sleep(0.05)
        check(metric(port, "kvhost_requests_in_flight") == 0, "both cancelled when their clients left")

        # ---- /metrics ----
        _, hd, text = raw(port, "GET", "/metrics")
        text = text.decode()
        for name in ("kvhost_info", "kvhost_requests_running", "kvhost_requests_waiting", "kvhost_generated_tokens_total",
                     "kvhost_time_to_first_token_seconds_bucket", "kvhost_time_per_output_token_seconds_count",
                     "kvhost_kv_bytes_held", "kvhost_kv_bytes_limit", "kvhost_kv_tokens_held", "kvhost_kv_tokens_budget",
                     "kvhost_evict_calls_total", "kvhost_prefix_cache_hit_ratio", "kvhost_preemptions_total"):
            check(re.search(r"^%s[{ ]" % name, text, re.M) is not None, "/metrics has %s" % name)
        check(hd.get("Content-Type", "").startswith("text/plain"), "/metrics is text/plain")
        check(metric(port, "kvhost_generated_tokens_total") > 0, "tokens counted")

        # ---- SIGTERM: no new requests, the in-flight stream finishes, exit 0 ----
        s = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        s.request("POST", "/v1/completions", json.dumps({"prompt": prompt, "max_tokens": 400, "stream": True}),
                  {"Authorization": "Bearer " + KEY})
        rs = s.getresponse()
        rs.readline()  # running
        got = []
        reader = threading.Thread(target=lambda: got.append(rs.read().decode()), daemon=True)
        reader.start()
        p.send_signal(signal.SIGTERM)
        time.sleep(0.3)  # the server's main thread takes the signal
        st, hd, _ = raw(port, "POST", "/v1/completions", json.dumps({"prompt": prompt, "max_tokens": 2}))
        check(st == 503 and hd.get("Retry-After") == "1", "503 with Retry-After after SIGTERM (got %s)" % st)
        reader.join(60)
        rest = got[0] if got else ""
        check(rest.endswith("data: [DONE]\n\n") and '"finish_reason":"length"' in rest, "in-flight stream finished")
        rc = p.wait(timeout=60)
        check(rc == 0, "exit status 0 after SIGTERM (got %s)" % rc)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    err = "".join(lines)
    check("ERROR: AddressSanitizer" not in err and "runtime error" not in err and "LeakSanitizer" not in err,
          "no sanitizer report")
    # the disconnects above end responses early on purpose: libmicrohttpd's line for each is dropped
    check("application error generating response" not in err, "no log line per disconnected client")
    if failures:
        print(err[-4000:])
        print("serve_client: %d check(s) failed" % len(failures))
        return 1
    print("serve_client: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
