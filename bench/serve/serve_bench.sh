#!/usr/bin/env bash
# serve_bench.sh — the same streaming load (bench/serve/load.py) against `kvhost serve` and llama-server,
# one after the other on loopback, same random GPT-2 Medium weights (HF safetensors for kvhost, the GGUF
# F32 conversion for llama-server), same threads, same concurrency; one JSON line per server in OUT.
#
# usage: bench/serve/serve_bench.sh [OUT.jsonl]
# env:   CLIENTS (8) DURATION (30) MAX_TOKENS (64) THREADS (4) PORT (8090)
#        KVHOST (build/kvhost) MODEL (/work/peers/models/gpt2-medium-seed1234)
#        LLAMA_SERVER (/work/peers/llama.cpp/build/bin/llama-server)
#        GGUF (/work/peers/gguf/gpt2-medium-seed1234-f32.gguf)
# Runs at nice 19 on a shared machine: numbers are for comparing the two servers in one run, not absolute.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-bench/serve/results.jsonl}
CLIENTS=${CLIENTS:-8} DURATION=${DURATION:-30} MAX_TOKENS=${MAX_TOKENS:-64} THREADS=${THREADS:-4} PORT=${PORT:-8090}
KVHOST=${KVHOST:-build/kvhost}
MODEL=${MODEL:-/work/peers/models/gpt2-medium-seed1234}
LLAMA_SERVER=${LLAMA_SERVER:-/work/peers/llama.cpp/build/bin/llama-server}
GGUF=${GGUF:-/work/peers/gguf/gpt2-medium-seed1234-f32.gguf}
pid=""
cleanup() { if [ -n "$pid" ]; then kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi; }
trap cleanup EXIT
wait_healthy() {
  for _ in $(seq 1 600); do
    curl -sf "http://127.0.0.1:$PORT/health" > /dev/null 2>&1 && return 0
    kill -0 "$pid" 2>/dev/null || { echo "serve_bench: the server exited" >&2; return 1; }
    sleep 0.2
  done
  echo "serve_bench: server not healthy after 120 s" >&2
  return 1
}
load() { nice -n 19 python3 bench/serve/load.py --url "http://127.0.0.1:$PORT" --clients "$CLIENTS" \
  --duration "$DURATION" --max-tokens "$MAX_TOKENS" --label "$1" --json "$out"; }

# kvhost serve: CLIENTS sequences at once (like llama-server's -np slots)
nice -n 19 "$KVHOST" serve --model "$MODEL" --threads "$THREADS" --max-seqs "$CLIENTS" --port "$PORT" &
pid=$!
wait_healthy
load "kvhost serve (threads $THREADS, max-seqs $CLIENTS)"
cleanup; pid=""

if [ -x "$LLAMA_SERVER" ] && [ -f "$GGUF" ]; then
  ctx=$(( (MAX_TOKENS + 128) ))
  nice -n 19 "$LLAMA_SERVER" -m "$GGUF" -np "$CLIENTS" -cb -t "$THREADS" -tb "$THREADS" -c $(( CLIENTS * ctx )) \
    --no-webui --host 127.0.0.1 --port "$PORT" > /tmp/serve_bench_llama.log 2>&1 &
  pid=$!
  wait_healthy
  load "llama-server (threads $THREADS, -np $CLIENTS)"
  cleanup; pid=""
else
  echo "serve_bench: skipping llama-server (no $LLAMA_SERVER or $GGUF)" >&2
fi
echo "serve_bench: results appended to $out"
