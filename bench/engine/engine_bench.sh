#!/usr/bin/env bash
# engine_bench.sh — issue #15's side-by-side: for each arrival rate, one synthetic trace, replayed by
# `kvhost replay`, llama-server (parallel slots, continuous batching) and HF transformers (static batches),
# all appending to one results.jsonl; then the table and plots (report_engine.py).
#
# usage: bench/engine/engine_bench.sh [options] [-- EXTRA KVHOST REPLAY ARGS]
#   --rates R1,R2,..     arrival rates, requests/s (default 0.5,1,2)
#   --requests N         requests per trace (default 100)
#   --prompt-len A:B     prompt tokens, uniform (default 64:256)
#   --max-tokens A:B     max_tokens, uniform (default 32:128)
#   --prefix-share S     share of requests with a common prefix (default 0)
#   --prefix-len L       its length in tokens (default 0)
#   --dist D             uniform (default) or lognormal lengths (as `kvhost trace --dist`)
#   --seed S             trace seed (default 1; the same seed for every rate)
#   --threads T          threads for every system (default 2)
#   --parallel N         llama-server slots (default 8)
#   --batch B            transformers static batch size (default 8)
#   --dispatch full|greedy  transformers batching rule (default full; replay_transformers.py)
#   --systems LIST       any of kvhost,llama-server,transformers (default all three)
#   --out-dir DIR        default docs/results/engine (results.jsonl appended, traces in DIR/traces)
#   --cdf-rate R         the rate of the latency CDF plot (default: the middle one)
#   --no-report          skip report_engine.py
# environment: KVHOST (default build/kvhost), MODEL (HF dir, default /work/peers/models/gpt2-medium-seed1234),
#   GGUF (default /work/peers/gguf/gpt2-medium-seed1234-f32.gguf), LLAMA_SERVER (default
#   /work/peers/llama.cpp/build/bin/llama-server), PEER_PYTHON (default /work/peers/venv/bin/python),
#   PYTHON (python with matplotlib for the report and the rest, default /usr/bin/python3), LLAMA_ARGS (extra replay_llama_server.py args),
#   HF_ARGS (extra replay_transformers.py args), NICE (a nice level for every run, default none).
# Traces: `$KVHOST trace` when `$KVHOST trace --help` exits 0 (flags in kvhost_trace below), else — or when
#   that command fails — bench/engine/gen_trace.py, with a note. A system that cannot run here is skipped
#   with a note (no placeholder records). kvhost: `$KVHOST replay TRACE --model MODEL --threads T --json
#   OUT [--timeline DIR/timeline-rateR.jsonl when its --help lists --timeline] EXTRA...`.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
RATES=0.5,1,2 REQUESTS=100 PLEN=64:256 MTOK=32:128 PSHARE=0 PLENPFX=0 SEED=1 THREADS=2 PARALLEL=8 BATCH=8
DIST=uniform DISPATCH=full SYSTEMS=kvhost,llama-server,transformers OUT_DIR=$REPO/docs/results/engine CDF_RATE="" REPORT=1
KVHOST=${KVHOST:-$REPO/build/kvhost}
MODEL=${MODEL:-/work/peers/models/gpt2-medium-seed1234}
GGUF=${GGUF:-/work/peers/gguf/gpt2-medium-seed1234-f32.gguf}
LLAMA_SERVER=${LLAMA_SERVER:-/work/peers/llama.cpp/build/bin/llama-server}
PEER_PYTHON=${PEER_PYTHON:-/work/peers/venv/bin/python}
PYTHON=${PYTHON:-$( [ -x /usr/bin/python3 ] && echo /usr/bin/python3 || echo python3)}
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --rates) RATES=$2; shift 2 ;;
    --requests) REQUESTS=$2; shift 2 ;;
    --prompt-len) PLEN=$2; shift 2 ;;
    --max-tokens) MTOK=$2; shift 2 ;;
    --prefix-share) PSHARE=$2; shift 2 ;;
    --prefix-len) PLENPFX=$2; shift 2 ;;
    --seed) SEED=$2; shift 2 ;;
    --dist) DIST=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --parallel) PARALLEL=$2; shift 2 ;;
    --batch) BATCH=$2; shift 2 ;;
    --dispatch) DISPATCH=$2; shift 2 ;;
    --systems) SYSTEMS=$2; shift 2 ;;
    --out-dir) OUT_DIR=$2; shift 2 ;;
    --cdf-rate) CDF_RATE=$2; shift 2 ;;
    --no-report) REPORT=0; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "engine_bench.sh: unknown option $1 (--help)" >&2; exit 2 ;;
  esac
done
note() { echo "engine_bench: note: $*" >&2; }
PRE=()
[ -n "${NICE:-}" ] && PRE=(nice -n "$NICE")
mkdir -p "$OUT_DIR/traces"
RESULTS=$OUT_DIR/results.jsonl
want() { case ",$SYSTEMS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

# ---- which systems can run
HAS_KVHOST=0 HAS_TRACE=0 HAS_TIMELINE=0 HAS_LLAMA=0 HAS_HF=0 SKIPPED=()
if want kvhost; then
  if [ ! -x "$KVHOST" ]; then SKIPPED+=("kvhost: no executable $KVHOST")
  elif ! "$KVHOST" replay --help >/dev/null 2>&1; then SKIPPED+=("kvhost: $KVHOST has no replay command yet")
  else HAS_KVHOST=1; "$KVHOST" replay --help 2>&1 | grep -q -- '--timeline' && HAS_TIMELINE=1; fi
fi
[ -x "$KVHOST" ] && "$KVHOST" trace --help >/dev/null 2>&1 && HAS_TRACE=1
if want llama-server; then
  if [ ! -x "$LLAMA_SERVER" ]; then SKIPPED+=("llama-server: no executable $LLAMA_SERVER (bench/engine/README.md)")
  elif [ ! -f "$GGUF" ]; then SKIPPED+=("llama-server: no GGUF $GGUF (bench/peers/convert_gguf.py)")
  else HAS_LLAMA=1; fi
fi
if want transformers; then
  if ! "$PEER_PYTHON" -c 'import torch, transformers' >/dev/null 2>&1; then
    SKIPPED+=("transformers: $PEER_PYTHON cannot import torch and transformers (bench/engine/README.md)")
  else HAS_HF=1; fi
fi
for s in "${SKIPPED[@]}"; do note "skipping $s"; done

# ---- the trace of one rate
kvhost_trace() {  # RATE OUT; the flags of `kvhost trace --help` (host/cli/cmd_trace.c)
  local share=()
  if [ "$PLENPFX" != 0 ] && [ "$PSHARE" != 0 ]; then share=(--shared-share "$PSHARE" --shared-len "$PLENPFX"); fi
  "$KVHOST" trace --requests "$REQUESTS" --rate "$1" --prompt-len "$PLEN" --output-len "$MTOK" --dist "$DIST" \
    "${share[@]}" --seed "$SEED" --out "$2"
}
make_trace() {  # RATE OUT -> prints the generator used
  if [ "$HAS_TRACE" = 1 ]; then
    if kvhost_trace "$1" "$2" 2>"$2.err" >&2; then rm -f "$2.err"; echo "kvhost trace"; return 0; fi
    note "kvhost trace failed ($(tail -1 "$2.err")); using bench/engine/gen_trace.py"
    rm -f "$2.err"
  fi
  "$PYTHON" "$HERE/gen_trace.py" --requests "$REQUESTS" --rate "$1" --prompt-len "$PLEN" --max-tokens "$MTOK" \
    --prefix-share "$PSHARE" --prefix-len "$PLENPFX" --dist "$DIST" --seed "$SEED" --out "$2" || return 1
  echo "bench/engine/gen_trace.py"
}

skipped_json=$(printf '%s\n' "${SKIPPED[@]}" | "$PYTHON" -c 'import json,sys; print(json.dumps([l.rstrip("\n") for l in sys.stdin if l.strip()]))')
"$PYTHON" - "$RESULTS" <<EOF
import json, os, sys, datetime
rec = {"command": "engine_bench_start", "timestamp": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
       "rates": [float(r) for r in "$RATES".split(",")], "requests": $REQUESTS, "prompt_len": "$PLEN",
       "max_tokens": "$MTOK", "prefix_share": $PSHARE, "prefix_len": $PLENPFX, "dist": "$DIST", "trace_generator": "$( [ "$HAS_TRACE" = 1 ] && echo "kvhost trace (gen_trace.py on failure)" || echo bench/engine/gen_trace.py)", "seed": $SEED, "threads": $THREADS,
       "llama_parallel": $PARALLEL, "hf_batch": $BATCH, "hf_dispatch": "$DISPATCH", "systems": "$SYSTEMS".split(","),
       "kvhost": "$KVHOST", "model": "$MODEL", "gguf": "$GGUF", "kvhost_extra_args": $(printf '%s\n' "${EXTRA[@]:-}" | "$PYTHON" -c 'import json,sys; print(json.dumps([l.rstrip("\n") for l in sys.stdin if l.strip()]))'),
       "skipped": $skipped_json, "load1": round(os.getloadavg()[0], 2)}
open(sys.argv[1], "a").write(json.dumps(rec) + "\n")
EOF

IFS=, read -r -a RATE_LIST <<<"$RATES"
for R in "${RATE_LIST[@]}"; do
  TRACE=$OUT_DIR/traces/trace-rate$R.jsonl
  gen=$(make_trace "$R" "$TRACE") || { note "no trace for rate $R; skipped"; continue; }
  echo "engine_bench: rate $R req/s: $TRACE ($gen)" >&2
  if [ "$HAS_KVHOST" = 1 ]; then
    TL=()
    [ "$HAS_TIMELINE" = 1 ] && TL=(--timeline "$OUT_DIR/timeline-rate$R.jsonl") && rm -f "$OUT_DIR/timeline-rate$R.jsonl"
    "${PRE[@]}" "$KVHOST" replay "$TRACE" --model "$MODEL" --threads "$THREADS" --json "$RESULTS" "${TL[@]}" \
      "${EXTRA[@]}" || note "kvhost replay failed at rate $R (status $?)"
  fi
  if [ "$HAS_LLAMA" = 1 ]; then
    # shellcheck disable=SC2086
    "${PRE[@]}" "$PYTHON" "$HERE/replay_llama_server.py" "$TRACE" --gguf "$GGUF" --server "$LLAMA_SERVER" \
      --parallel "$PARALLEL" --threads "$THREADS" --json "$RESULTS" ${LLAMA_ARGS:-} \
      || note "llama-server replay failed at rate $R (status $?)"
  fi
  if [ "$HAS_HF" = 1 ]; then
    # shellcheck disable=SC2086
    "${PRE[@]}" "$PEER_PYTHON" "$HERE/replay_transformers.py" "$TRACE" --model "$MODEL" --batch "$BATCH" \
      --dispatch "$DISPATCH" --threads "$THREADS" --json "$RESULTS" ${HF_ARGS:-} \
      || note "transformers replay failed at rate $R (status $?)"
  fi
done

if [ "$REPORT" = 1 ]; then
  args=("$RESULTS" --out-dir "$OUT_DIR")
  [ -n "$CDF_RATE" ] && args+=(--cdf-rate "$CDF_RATE")
  for f in "$OUT_DIR"/timeline-rate*.jsonl; do [ -f "$f" ] && args+=(--timeline "$f"); done
  "$PYTHON" "$HERE/report_engine.py" "${args[@]}" || note "report_engine.py failed"
fi
