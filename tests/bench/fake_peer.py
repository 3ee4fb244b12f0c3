#!/usr/bin/env python3
"""fake_peer.py — a stand-in for bench/torch_gpt2.py / hf_gpu_bench.py in the driver's tests (no torch):
answers `check` (fails like a missing torch when FAKE_PEER_FAIL is set), `make-checkpoint DIR` (writes an
empty config.json + model.safetensors) and `peer` (prints a `peer_run` line with fixed timings: decode steps
1, 2, 3, 4 ms in every timed run, prefill 10 ms, total 20 ms). Every call is appended to $FAKE_PEER_LOG when
set. Owns nothing else."""
import json
import os
import sys


def main(argv):
    if os.environ.get("FAKE_PEER_LOG"):
        with open(os.environ["FAKE_PEER_LOG"], "a") as f:
            f.write(json.dumps(argv) + "\n")
    cmd = argv[0]
    if cmd == "check":
        if os.environ.get("FAKE_PEER_FAIL"):
            print("fake_peer.py: No module named 'torch'", file=sys.stderr)
            return 1
        print(json.dumps({"peer": "fake", "peer_version": "fake 9.9"}))
        return 0
    if cmd == "make-checkpoint":
        os.makedirs(argv[1])
        for name in ("config.json", "model.safetensors"):
            with open(os.path.join(argv[1], name), "w") as f:
                f.write("{}")
        return 0
    assert cmd == "peer", argv
    opts = {argv[i]: argv[i + 1] for i in range(1, len(argv), 2)}
    b, t, m = int(opts["--batch"]), int(opts["--prompt-tokens"]), int(opts["--max-new"])
    reps = int(opts["--repeats"])
    if t + m > 1024:
        print(f"fake_peer.py: --prompt-tokens {t} + --max-new {m} exceeds n_positions 1024", file=sys.stderr)
        return 1
    print("some chatter before the record")
    rec = {"record": "peer_run", "peer_version": "fake 9.9", "peer_impl": "fake", "device": "cpu (fake)",
           "threads": int(opts.get("--threads", 1)), "batch": b, "prompt_tokens": t, "max_new": m,
           "warmup_runs": int(opts["--warmup"]), "repeats": reps, "prefill_ms": [10.0] * reps,
           "total_ms": [20.0] * reps, "step_ms": [1.0, 2.0, 3.0, 4.0] * reps, "repeat_tokens_per_s": [400.0 * b] * reps,
           "generated_tokens": [m] * b, "first_tokens": [5, 6, 7], "peak_rss_bytes": 104857600,
           "model": {"n_layer": 2, "n_head": 2, "n_embd": 8, "n_params": 123},
           "argv": argv}
    print(json.dumps(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
