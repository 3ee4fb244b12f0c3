#!/usr/bin/env python3
"""fake_kvhost.py — a stand-in for kvhost in the driver's tests: answers `plugins list` and `generate`
(appends a generate record with the tags it was given), and fails with the real "memory limit" message when
batch * (T + max_new) * 1 KiB exceeds --mem-limit (which is also the record's kv_bytes_peak). Owns nothing else."""
import json
import sys

PLUGINS = ["window", "sink", "h2o", "int8"]


def size(text):
    mul = {"K": 1024, "M": 1048576, "G": 1073741824}
    return int(float(text[:-1]) * mul[text[-1].upper()]) if text[-1].upper() in mul else int(text)


def main(argv):
    if argv[:2] == ["plugins", "list"]:
        for p in PLUGINS:
            print(f"{p:<14} 1.0.0    policy  fake  [/fake/{p}.so]")
        return 0
    assert argv[0] == "generate", argv
    opts, tags, i = {}, {}, 1
    flags = {"--quiet", "--no-cache"}
    while i < len(argv):
        if argv[i] in flags:
            opts[argv[i]] = True
            i += 1
            continue
        if argv[i] == "--tag":
            k, v = argv[i + 1].split("=", 1)
            tags[k] = v
        elif argv[i] == "--set":
            opts.setdefault("--set", []).append(argv[i + 1])
        else:
            opts[argv[i]] = argv[i + 1]
        i += 2
    t, b, n = int(opts["--prompt-tokens"]), int(opts.get("--batch", 1)), int(opts["--max-new"])
    if t + n > 1024:
        print(f"kvhost generate: --prompt-tokens {t} + --max-new {n} exceeds n_positions 1024", file=sys.stderr)
        return 1
    if "--mem-limit" in opts and b * (t + n) * 1024 > size(opts["--mem-limit"]):
        print("kvhost generate: kv cache: needs 4096 more bytes (sequence 0 layer 0) but the memory limit of "
              f"{size(opts['--mem-limit'])} bytes is reached", file=sys.stderr)
        return 1
    rec = {"record": "generate", "commit": "fake", "machine": {"host": "h", "cpu": "c", "cores": 2},
           "model": {"name": opts["--model"]}, "backend": opts.get("--backend", "cpu"), "threads": 2,
           "no_cache": "--no-cache" in opts, "plugins": [], "batch": b, "tags": tags, "prompt_tokens": [t] * b,
           "kv_bytes_peak": b * (t + n) * 1024, "sets": opts.get("--set", []), "config_file": opts.get("--config"), "plugin_list": opts.get("--plugins"),
           "argv": argv}
    with open(opts["--json"], "a") as f:
        f.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
