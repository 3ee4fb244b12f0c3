#!/usr/bin/env python3
"""replay_transformers.py — the transformers peer of the engine benchmark (issue #15): Hugging Face
`generate` with STATIC batches, the prior work's baseline, replayed in real time over a request trace; appends
one `replay` record with the field names of `kvhost replay --json`.

  PEER_PYTHON bench/engine/replay_transformers.py TRACE --model HF_DIR --batch B --threads T \
      [--dispatch full|greedy] [--warmup 1] [--json OUT.jsonl]

Batching (one batch at a time, in arrival order; a request that arrives during a batch waits for the next):
  full    (default) a batch starts when B requests are waiting, or, for the tail of the trace, when every
          remaining request has arrived (the last batch may be smaller). Waiting for a full batch is the
          static-batching baseline as described; at low arrival rates it makes TTFT include the wait.
  greedy  a batch starts as soon as the model is idle and at least one request is waiting, with up to B of
          the waiting ones.
Each batch: the prompts left-padded (pad id 50256, attention mask), GPT2LMHeadModel (eager attention, fp32,
its own KV cache), greedy (do_sample=False), max_new_tokens = the batch's largest max_tokens, EOS never stops
a row (eos_token_id=None: the trace asks ignore_eos; a request with "ignore_eos": false has its tokens counted
up to its first EOS, the batch still runs on), torch.set_num_threads(T), set_num_interop_threads(1).
Timing: a streamer (transformers' BaseStreamer interface: generate calls put() with the prompt, then once per
step with the new tokens, right after the step's argmax) records time.monotonic() of every step, so step i's
time is when the i-th token of every row in the batch exists. A request's TTFT = step 1's time - its arrival
(queueing and the batch's whole prefill included); its last token = step max_tokens's time (rows that
finished early keep decoding padding until the batch's longest is done: that time is spent but not counted);
TPOT = (last - first) / (max_tokens - 1). max_concurrent = the largest batch run. Needs torch + transformers
(the peer venv, bench/engine/README.md).
"""
import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import replay_common as rc  # noqa: E402

PAD = EOS = 50256


def note(msg):
    print(f"replay_transformers: {msg}", file=sys.stderr, flush=True)


class StepTimes:
    """A transformers streamer that only timestamps: put() #0 is the prompt, put() #i the i-th new tokens."""

    def __init__(self):
        self.puts = []

    def put(self, value):
        self.puts.append(time.monotonic())

    def end(self):
        pass

    @property
    def steps(self):
        return self.puts[1:]


def load(model_dir, threads):
    import torch
    from transformers import GPT2LMHeadModel
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    try:
        m = GPT2LMHeadModel.from_pretrained(model_dir, attn_implementation="eager", torch_dtype=torch.float32)
    except TypeError:
        m = GPT2LMHeadModel.from_pretrained(model_dir, torch_dtype=torch.float32)
    m.eval()
    return m


def run_batch(model, batch):
    """-> (StepTimes, generated ids [rows][steps]) for the batch of trace requests."""
    import torch
    n = max(len(r["prompt_ids"]) for r in batch)
    ids = torch.full((len(batch), n), PAD, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, r in enumerate(batch):
        p = r["prompt_ids"]
        ids[i, n - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, n - len(p):] = 1
    st = StepTimes()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(r["max_tokens"] for r in batch),
                             do_sample=False, num_beams=1, eos_token_id=None, pad_token_id=PAD, use_cache=True,
                             streamer=st)
    return st, out[:, n:].tolist()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace")
    ap.add_argument("--model", required=True, help="Hugging Face GPT-2 directory")
    ap.add_argument("--batch", "-B", type=int, default=4, help="static batch size")
    ap.add_argument("--threads", "-t", type=int, default=1)
    ap.add_argument("--dispatch", choices=("full", "greedy"), default="full")
    ap.add_argument("--warmup", type=int, default=1, help="untimed batches (2 rows, 16-token prompts, 4 tokens)")
    ap.add_argument("--json", default="-", help="append the record here (default stdout)")
    ap.add_argument("--no-per-request", action="store_true")
    a = ap.parse_args(argv)
    if a.batch < 1:
        raise SystemExit("replay_transformers: --batch must be >= 1")
    try:
        reqs = rc.load_trace(a.trace)
    except (OSError, rc.TraceError) as e:
        note(f"error: {e}")
        return 2
    try:
        import torch
        import transformers
    except ImportError as e:
        note(f"error: {e} (run it with the peer venv's python, bench/engine/README.md)")
        return 2
    model = load(a.model, a.threads)
    npos = model.config.n_positions
    for r in reqs:
        if len(r["prompt_ids"]) + r["max_tokens"] > npos:
            note(f"error: request {r['id']} needs {len(r['prompt_ids']) + r['max_tokens']} positions, "
                 f"more than the model's {npos}")
            return 2
    for i in range(a.warmup):
        run_batch(model, [{"prompt_ids": [(j * 7919 + 13 + k) % 50000 for j in range(16)], "max_tokens": 4}
                          for k in range(2)])

    machine = rc.machine_start()
    results, batch_sizes = {}, []
    t0 = time.monotonic()
    i = 0
    while i < len(reqs):
        if a.dispatch == "full":
            last = reqs[min(i + a.batch, len(reqs)) - 1]  # the B-th waiting request, or the trace's last
        else:
            last = reqs[i]
        delay = t0 + last["arrival"] - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        now = time.monotonic() - t0
        j = i
        while j < len(reqs) and j - i < a.batch and reqs[j]["arrival"] <= now:
            j += 1
        batch = reqs[i:j]
        i = j
        st, gen = run_batch(model, batch)
        steps = [t - t0 for t in st.steps]
        batch_sizes.append(len(batch))
        for r, row in zip(batch, gen):
            n = min(r["max_tokens"], len(steps))
            if not r.get("ignore_eos", True) and EOS in row[:n]:
                n = row.index(EOS) + 1
            results[r["id"]] = {"arrival_s": r["arrival"], "first_token_s": steps[0], "last_token_s": steps[n - 1],
                                "n_generated": n, "tpot_tokens": n - 1}
    rc.machine_end(machine)
    settings = {"batch_size": a.batch, "dispatch": a.dispatch, "padding": "left", "attn_implementation": "eager",
                "dtype": "float32", "sampling": "greedy (do_sample=False)", "ignore_eos": True,
                "ttft_method": "streamer step timestamps", "warmup_batches": a.warmup,
                "interop_threads": 1, "model": os.path.abspath(a.model)}
    extra = {"errors": 0, "batches": len(batch_sizes), "batch_sizes": batch_sizes}
    rec = rc.record("transformers", a.trace, reqs, results, a.threads, settings, machine, max(batch_sizes),
                    tool_version=f"transformers {transformers.__version__}, torch {torch.__version__}",
                    per_request=not a.no_per_request, extra=extra)
    rc.append_record(a.json, rec)
    note(rc.summary_line(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
