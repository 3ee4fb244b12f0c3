#!/usr/bin/env python3
"""soak.py — a long mixed load on a running `kvhost serve`: valid streaming and non-streaming requests,
invalid ones (malformed JSON, unknown fields, huge max_tokens, oversized bodies: each must get its 4xx),
and clients that disconnect mid-stream at random; samples the server's RSS (/proc/PID/status) and ends
with in-flight = 0 checked through /metrics. Exit 1 on any unexpected answer or when RSS grew more than
--rss-slack-mib from the first sample after warm-up to the last. Run it against an ASan build too: the
server's exit after SIGTERM then reports any leak.

usage: soak.py --url http://127.0.0.1:8080 --pid PID --duration 600 [--clients 6]
"""
import argparse
import http.client
import json
import random
import threading
import time
import urllib.parse


def rss_mib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--duration", type=float, default=600)
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--warmup", type=float, default=10)
    ap.add_argument("--rss-slack-mib", type=float, default=16)
    a = ap.parse_args()
    u = urllib.parse.urlparse(a.url)
    host, port = u.hostname, u.port or 80
    end = time.time() + a.duration
    lock = threading.Lock()
    counts, bad = {}, []

    def note(kind, ok, detail=""):
        with lock:
            counts[kind] = counts.get(kind, 0) + 1
            if not ok and len(bad) < 20:
                bad.append("%s: %s" % (kind, detail))

    cases = [
        ("valid", json.dumps({"prompt": "The history of the city", "max_tokens": 24}), 200),
        ("stream", json.dumps({"prompt": "Once upon a time", "max_tokens": 24, "stream": True}), 200),
        ("malformed", '{"prompt": "a", ', 400),
        ("unknown_field", json.dumps({"prompt": "a", "bogus": 1}), 400),
        ("huge_max_tokens", json.dumps({"prompt": "a", "max_tokens": 10 ** 9}), 400),
        ("oversized", json.dumps({"prompt": "a" * (2 << 20)}), 413),
        ("disconnect", json.dumps({"prompt": "Hello", "max_tokens": 200, "stream": True}), None),
    ]

    def client(i):
        r = random.Random(i)
        while time.time() < end:
            kind, body, want = r.choice(cases)
            c = http.client.HTTPConnection(host, port, timeout=120)
            try:
                c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
                resp = c.getresponse()
                if want is None:  # read a little, then go away
                    resp.readline()
                    c.sock.shutdown(2)
                    note(kind, resp.status == 200, resp.status)
                    continue
                data = resp.read()
                ok = resp.status == want and (want != 200 or kind != "stream" or data.endswith(b"data: [DONE]\n\n"))
                note(kind, ok, "%d %s" % (resp.status, data[:120]))
            except Exception as e:  # noqa: BLE001
                note(kind, kind == "oversized", repr(e))  # the server may close an oversized upload early
            finally:
                c.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(a.clients)]
    for t in threads:
        t.start()
    time.sleep(min(a.warmup, a.duration))
    rss0 = rss_mib(a.pid)
    samples = [rss0]
    while time.time() < end:
        time.sleep(min(5, max(0.1, end - time.time())))
        samples.append(rss_mib(a.pid))
    for t in threads:
        t.join()
    time.sleep(1)
    c = http.client.HTTPConnection(host, port, timeout=30)
    c.request("GET", "/metrics")
    m = c.getresponse().read().decode()
    in_flight = [float(l.split()[-1]) for l in m.splitlines() if l.startswith("kvhost_requests_in_flight ")]
    rss1 = rss_mib(a.pid)
    grew = rss1 - rss0
    print("soak: %.0f s, %s; RSS %.1f -> %.1f MiB (max %.1f); in flight at the end %s; unexpected %d"
          % (a.duration, json.dumps(counts, sort_keys=True), rss0, rss1, max(samples), in_flight, len(bad)))
    for b in bad:
        print("  unexpected:", b)
    ok = not bad and in_flight == [0.0] and grew <= a.rss_slack_mib
    print("soak: " + ("ok" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
