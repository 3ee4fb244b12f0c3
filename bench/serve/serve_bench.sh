#!/usr/bin/env bash
# serve_bench.sh — the same streaming load (bench/serve/load.py) against `kvhost serve` and llama-server,
# like for like: same random GPT-2 Medium weights (HF safetensors for kvhost, their GGUF F32 conversion for
# llama-server), F32 KV cache in both, prompts as token ids (the same lengths whatever the tokenizer),
# the same sampling chain pinned in every request (temperature 0.8, top_k 40, top_p 0.95: llama-server's
# defaults would add more samplers), same threads, same number of sequences at once. ROUNDS rounds, the
# servers' order alternating per round; one JSON line per (server, round) in OUT. Report with
# bench/serve/report.py OUT --out DIR (medians, ranges, plot).
#
# usage: bench/serve/serve_bench.sh [OUT.jsonl]
# env:   CLIENTS (8) DURATION (60) MAX_TOKENS (64) PROMPT_IDS (64) THREADS (2) ROUNDS (3) PORT (8090)
#        NICE (0: the servers' and client's nice level) KVHOST_COMMIT (recorded; default: HEAD)
#        KVHOST (build/kvhost) MODEL (/work/peers/models/gpt2-medium-seed1234)
#        LLAMA_SERVER (/work/peers/llama.cpp/build/bin/llama-server)
#        GGUF (/work/peers/gguf/gpt2-medium-seed1234-f32.gguf)
# A missing llama-server or GGUF file skips that server with a note.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-bench/serve/results.jsonl}
CLIENTS=${CLIENTS:-8} DURATION=${DURATION:-60} MAX_TOKENS=${MAX_TOKENS:-64} PROMPT_IDS=${PROMPT_IDS:-64}
THREADS=${THREADS:-2} ROUNDS=${ROUNDS:-3} PORT=${PORT:-8090} NICE=${NICE:-0}
KVHOST=${KVHOST:-build/kvhost}
MODEL=${MODEL:-/work/peers/models/gpt2-medium-seed1234}
LLAMA_SERVER=${LLAMA_SERVER:-/work/peers/llama.cpp/build/bin/llama-server}
GGUF=${GGUF:-/work/peers/gguf/gpt2-medium-seed1234-f32.gguf}
# the commit KVHOST was built from (KVHOST_COMMIT), else the checkout's HEAD
commit=${KVHOST_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
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
load() { # SERVER ROUND LABEL
  nice -n "$NICE" python3 bench/serve/load.py --url "http://127.0.0.1:$PORT" --clients "$CLIENTS" \
    --duration "$DURATION" --max-tokens "$MAX_TOKENS" --prompt-ids "$PROMPT_IDS" --temperature 0.8 --top-k 40 \
    --top-p 0.95 --label "$3" --json "$out" \
    --meta "{\"server\": \"$1\", \"round\": $2, \"threads\": $THREADS, \"kvhost_commit\": \"$commit\"}"
}
run_kvhost() { # ROUND
  nice -n "$NICE" "$KVHOST" serve --model "$MODEL" --threads "$THREADS" --max-seqs "$CLIENTS" --port "$PORT" \
    > /tmp/serve_bench_kvhost.log 2>&1 &
  pid=$!
  wait_healthy
  load kvhost "$1" "kvhost serve (threads $THREADS, max-seqs $CLIENTS)"
  cleanup; pid=""
}
have_llama=1
if [ ! -x "$LLAMA_SERVER" ] || [ ! -f "$GGUF" ]; then
  have_llama=0
  echo "serve_bench: skipping llama-server (no $LLAMA_SERVER or $GGUF)" >&2
fi
run_llama() { # ROUND
  [ "$have_llama" = 1 ] || return 0
  # -c: every slot holds its prompt and max_tokens; F32 K and V like kvhost's cache
  nice -n "$NICE" "$LLAMA_SERVER" -m "$GGUF" -np "$CLIENTS" -cb -t "$THREADS" -tb "$THREADS" \
    -c $(( CLIENTS * (PROMPT_IDS + MAX_TOKENS + 16) )) -ctk f32 -ctv f32 --no-webui --host 127.0.0.1 \
    --port "$PORT" > /tmp/serve_bench_llama.log 2>&1 &
  pid=$!
  wait_healthy
  load llama-server "$1" "llama-server (threads $THREADS, -np $CLIENTS, F32 KV)"
  cleanup; pid=""
}
for r in $(seq 1 "$ROUNDS"); do
  if [ $(( r % 2 )) = 1 ]; then run_kvhost "$r"; run_llama "$r"; else run_llama "$r"; run_kvhost "$r"; fi
done
echo "serve_bench: results appended to $out"
