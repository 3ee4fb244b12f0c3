#!/bin/sh
# cli_inputs.sh — the real CLI on hostile inputs (issue 14, defects 5, 8, 9, 11, 13, 14): special files
# in place of regular ones (FIFO, /dev/zero, directory) for --config, config.json, model.safetensors,
# vocab.json and `plan --model`, each refused at once (a hang is caught by `timeout` and fails the test);
# prompts from a pipe, /dev/stdin and a FIFO equal the same text given with --prompt; a --json path that
# cannot be written is refused before the model loads and nothing is created; --seed beyond 2^64;
# non-finite weights, repeated config.json keys and a padded vocabulary through the real command; trace
# files for `kvhost trace --check` from a directory, /dev/zero, a pipe and a FIFO, and its --out (issue 15).
# usage: tests/cli_inputs.sh PATH/TO/kvhost        (registered in CTest by tests/fuzz/CMakeLists.txt)
set -u
KVH=${1:?usage: cli_inputs.sh PATH/TO/kvhost}
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
fails=0
TO="timeout -k 5 60"

# expect NAME WANT_RC FRAGMENT -- kvhost args...   (stdin from /dev/null unless redirected by the caller)
expect() {
  name=$1 want=$2 frag=$3
  shift 4
  $TO "$KVH" "$@" > "$T/out" 2> "$T/err" < "${STDIN:-/dev/null}"
  rc=$?
  if [ "$rc" -ne "$want" ] || ! grep -qF -- "$frag" "$T/err"; then
    echo "FAIL $name: exit $rc (want $want$( [ "$rc" -eq 124 ] && echo ', TIMED OUT: a hang')), stderr lacks '$frag':"
    sed 's/^/    /' "$T/err" | head -5
    fails=$((fails + 1))
  else
    echo "ok   $name: exit $rc, '$frag'"
  fi
}

# mkmodel DIR [nan TENSOR] [vocab N] [dupkey] : a 1-layer GPT-2 (C 8) with the byte-level tokenizer
mkmodel() {
  python3 - "$@" <<'EOF'
import json, os, struct, sys
d = sys.argv[1]; args = sys.argv[2:]
nan = args[args.index("nan") + 1] if "nan" in args else None
V = int(args[args.index("vocab") + 1]) if "vocab" in args else 257
P, C, L = 32, 8, 1
os.makedirs(d, exist_ok=True)
cfg = '{"model_type": "gpt2", "vocab_size": %d, "n_positions": %d, "n_embd": %d, "n_head": 2, "n_layer": %d, "bos_token_id": 256' % (V, P, C, L)
if "dupkey" in args: cfg += ', "n_layer": 2'
open(os.path.join(d, "config.json"), "w").write(cfg + "}\n")
ts = [("wte.weight", [V, C]), ("wpe.weight", [P, C])]
for l in range(L):
    for s, sh in [("ln_1.weight", [C]), ("ln_1.bias", [C]), ("attn.c_attn.weight", [C, 3 * C]), ("attn.c_attn.bias", [3 * C]),
                  ("attn.c_proj.weight", [C, C]), ("attn.c_proj.bias", [C]), ("ln_2.weight", [C]), ("ln_2.bias", [C]),
                  ("mlp.c_fc.weight", [C, 4 * C]), ("mlp.c_fc.bias", [4 * C]), ("mlp.c_proj.weight", [4 * C, C]), ("mlp.c_proj.bias", [C])]:
        ts.append(("h.%d.%s" % (l, s), sh))
ts += [("ln_f.weight", [C]), ("ln_f.bias", [C])]
hdr, data, off = {}, b"", 0
for i, (n, sh) in enumerate(ts):
    k = 1
    for x in sh: k *= x
    vals = [1.0 if n.endswith("ln_1.weight") or n.endswith("ln_2.weight") or n == "ln_f.weight" else ((j * 37 + i) % 101 - 50) / 1000.0 for j in range(k)]
    if n == nan: vals[3] = float("nan")
    b = struct.pack("<%df" % k, *vals)
    hdr[n] = {"dtype": "F32", "shape": sh, "data_offsets": [off, off + len(b)]}
    data += b; off += len(b)
h = json.dumps(hdr).encode()
h += b" " * ((8 - len(h) % 8) % 8)
open(os.path.join(d, "model.safetensors"), "wb").write(struct.pack("<Q", len(h)) + h + data)
bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
cs, n = bs[:], 0
for b in range(256):
    if b not in bs: bs.append(b); cs.append(256 + n); n += 1
vocab = {chr(c): b for b, c in zip(bs, cs)}
vocab["<|endoftext|>"] = 256
json.dump(vocab, open(os.path.join(d, "vocab.json"), "w"))
open(os.path.join(d, "merges.txt"), "w").write("#version: 0.2\n")
EOF
}

# ---- non-regular files where a regular one is required (defect 11) --------------------------------
mkfifo "$T/run.fifo"
expect config-fifo 2 "not a regular file (it is a FIFO" -- generate --model random:gpt2 --prompt hi --max-new 1 \
  --quiet --config "$T/run.fifo"
expect config-devzero 2 "not a regular file (it is a character device)" -- generate --model random:gpt2 \
  --prompt hi --max-new 1 --quiet --config /dev/zero
expect config-dir 2 "not a regular file (it is a directory)" -- generate --model random:gpt2 --prompt hi \
  --max-new 1 --quiet --config "$T"
for victim in config.json model.safetensors vocab.json; do
  mkmodel "$T/m_$victim"
  rm "$T/m_$victim/$victim" && mkfifo "$T/m_$victim/$victim"
  expect "fifo-$victim" 1 "$victim: not a regular file (it is a FIFO" -- generate --model "$T/m_$victim" \
    --prompt hi --max-new 1 --quiet
done
expect plan-model-fifo 1 "not a regular file (it is a FIFO" -- plan --model "$T/m_config.json"
expect plan-model-fifo-file 1 "not a regular file (it is a FIFO" -- plan --model "$T/m_config.json/config.json"
expect plan-model-devzero 1 "not a regular file (it is a character device)" -- plan --model /dev/zero

# ---- prompts from streams (defect 5) ---------------------------------------------------------------
mkmodel "$T/tiny"
P="The history of the city"
first() { grep -o '"prompt_tokens":\[[0-9]*\],"generated_tokens":\[[0-9]*\],"first_tokens":\[[0-9,]*\]' "$1"; }
$TO "$KVH" generate --model "$T/tiny" --threads 1 --prompt "$P" --max-new 4 --quiet --json "$T/ref.jsonl" \
  2> /dev/null < /dev/null
for how in pipe stdin fifo procsub; do
  rm -f "$T/s.jsonl"
  case $how in
    pipe)  printf '%s' "$P" | $TO "$KVH" generate --model "$T/tiny" --threads 1 --prompt-file /dev/stdin \
             --max-new 4 --quiet --json "$T/s.jsonl" 2> "$T/err" ;;
    stdin) printf '%s' "$P" > "$T/p.txt"
           $TO "$KVH" generate --model "$T/tiny" --threads 1 --prompt-file /dev/stdin --max-new 4 --quiet \
             --json "$T/s.jsonl" < "$T/p.txt" 2> "$T/err" ;;
    fifo)  mkfifo "$T/p.fifo"; (printf '%s' "$P" > "$T/p.fifo") &
           $TO "$KVH" generate --model "$T/tiny" --threads 1 --prompt-file "$T/p.fifo" --max-new 4 --quiet \
             --json "$T/s.jsonl" 2> "$T/err" < /dev/null; wait ;;
    procsub) bash -c "$TO '$KVH' generate --model '$T/tiny' --threads 1 --prompt-file <(printf '%s' '$P') \
             --max-new 4 --quiet --json '$T/s.jsonl'" 2> "$T/err" < /dev/null ;;
  esac
  if [ -s "$T/s.jsonl" ] && [ "$(first "$T/s.jsonl")" = "$(first "$T/ref.jsonl")" ] && [ -n "$(first "$T/ref.jsonl")" ]; then
    echo "ok   prompt-$how: same prompt tokens and output as --prompt ($(first "$T/s.jsonl" | cut -c1-40)...)"
  else
    echo "FAIL prompt-$how: record differs from --prompt's"; echo "    ref: $(first "$T/ref.jsonl")"
    echo "    got: $(first "$T/s.jsonl" 2>/dev/null)"; sed 's/^/    /' "$T/err" | head -3
    fails=$((fails + 1))
  fi
done
expect prompt-devzero 1 "more than the limit of 67108864 bytes" -- generate --model "$T/tiny" \
  --prompt-file /dev/zero --max-new 1 --quiet

# ---- small ones (defect 14) ------------------------------------------------------------------------
expect json-missing-dir 2 "--json $T/nodir/r.jsonl" -- generate --model "$T/tiny" --prompt hi --max-new 1 \
  --quiet --json "$T/nodir/r.jsonl"
if [ -e "$T/nodir" ]; then echo "FAIL json-missing-dir: something was created"; fails=$((fails + 1)); fi
expect json-is-dir 2 "is a directory" -- eval --model "$T/tiny" --text-file "$T/p.txt" --json "$T"
expect seed-overflow 2 "--seed '99999999999999999999999'" -- generate --model "$T/tiny" --prompt hi \
  --max-new 1 --quiet --seed 99999999999999999999999
expect seed-negative 2 "--seed '-1'" -- generate --model "$T/tiny" --prompt hi --max-new 1 --quiet --seed -1
expect plan-kv-dtype 2 "did you mean --kv-prec" -- plan --model gpt2-large --kv-dtype int8
expect plan-usage 2 "unknown option" -- plan gpt2 --bogus
printf '[model]\nthreads = 4096\n' > "$T/threads.ini"
expect ini-threads-4096 2 "threads = 4096: expected an integer in 0..1024" -- generate --model "$T/tiny" \
  --prompt hi --max-new 1 --quiet --config "$T/threads.ini"
expect cli-threads-4096 2 "from 1 to 1024" -- generate --model "$T/tiny" --prompt hi --max-new 1 --quiet \
  --threads 4096

# ---- trace files (issue 15): kvhost trace --check and --out ----------------------------------------
# expect_out NAME FRAGMENT -- kvhost args... : exit 0 and FRAGMENT on stdout
expect_out() {
  name=$1 frag=$2
  shift 3
  $TO "$KVH" "$@" > "$T/out" 2> "$T/err" < "${STDIN:-/dev/null}"
  rc=$?
  if [ "$rc" -ne 0 ] || ! grep -qF -- "$frag" "$T/out"; then
    echo "FAIL $name: exit $rc (want 0), stdout lacks '$frag':"; sed 's/^/    /' "$T/err" | head -5
    fails=$((fails + 1))
  else
    echo "ok   $name: exit 0, '$frag'"
  fi
}
expect trace-check-dir 1 "not a file or a stream (it is a directory)" -- trace --check "$T"
expect trace-check-devzero 1 "/dev/zero:1: the line is longer than 16 MiB" -- trace --check /dev/zero
printf '{"arrival": 0, "prompt": "hi", "max_tokens": 2}\n{"arrival": 1, "prompt_tokens": 4, "max_tokens": -3}\n' > "$T/bad.jsonl"
expect trace-check-bad-line 1 "bad.jsonl:2: key 'max_tokens': must be an integer >= 1 (got -3)" -- trace --check "$T/bad.jsonl"
printf '{"arrival": 0, "prompt": "hi", "max_tokens": 2}\n' > "$T/good.jsonl"
STDIN="$T/good.jsonl"
expect_out trace-check-stdin "/dev/stdin: ok, 1 requests" -- trace --check /dev/stdin
STDIN=
mkfifo "$T/t.fifo"; (cat "$T/good.jsonl" > "$T/t.fifo") &
expect_out trace-check-fifo "t.fifo: ok, 1 requests" -- trace --check "$T/t.fifo"; wait
expect trace-out-missing-dir 2 "--out $T/nodir/t.jsonl" -- trace --requests 3 --rate 1 --prompt-len 4 \
  --output-len 2 --out "$T/nodir/t.jsonl"
if [ -e "$T/nodir" ]; then echo "FAIL trace-out-missing-dir: something was created"; fails=$((fails + 1)); fi
expect trace-usage 2 "give --requests, --rate, --prompt-len and --output-len" -- trace --requests 3
expect trace-context 2 "exceed the model's 1024 positions" -- trace --requests 3 --rate 1 --prompt-len 1000 \
  --output-len 100 --out "$T/t.jsonl"
expect_out trace-out "50 requests" -- trace --requests 50 --rate 5 --prompt-len 8:64 --output-len 4 --shared-share 0.5 \
  --shared-len 8 --out "$T/t.jsonl"
if [ -e "$T/t.jsonl.tmp" ] || [ "$(wc -l < "$T/t.jsonl")" -ne 50 ] || ! "$KVH" trace --check "$T/t.jsonl" > /dev/null; then
  echo "FAIL trace-out: $T/t.jsonl is not 50 checked lines (or the .tmp file stayed)"; fails=$((fails + 1))
fi

# ---- kvhost replay (issue 15): bad options and traces are refused before anything runs ---------------
expect replay-no-trace 2 "no trace: give a trace file" -- replay --model random:gpt2
expect replay-no-cache 2 "--no-cache: the engine always keeps a cache" -- replay "$T/t.jsonl" --no-cache
expect replay-block-size 2 "--block-size '12': expected 0 or a power of two" -- replay "$T/t.jsonl" --block-size 12
expect replay-time-scale 2 "--time-scale 'nan': expected a number > 0" -- replay "$T/t.jsonl" --time-scale nan
expect replay-bad-line 1 "bad.jsonl:2: key 'max_tokens': must be an integer >= 1 (got -3)" -- replay "$T/bad.jsonl" \
  --model random:gpt2
expect replay-json-dir 2 "--json $T/nodir/r.jsonl" -- replay "$T/t.jsonl" --model random:gpt2 --json "$T/nodir/r.jsonl"
expect replay-too-big 1 "more than [engine] max_tokens = 10" -- replay "$T/t.jsonl" --model random:gpt2 --max-tokens 10
expect replay-bad-engine-key 2 "[engine] unknown key 'max_token'" -- replay "$T/t.jsonl" --model random:gpt2 \
  --set engine.max_token=3
if [ -e "$T/nodir" ]; then echo "FAIL replay-json-dir: something was created"; fails=$((fails + 1)); fi
# an interrupted replay still writes its record, whole, and renames its timeline (no .tmp left)
"$KVH" replay "$T/t.jsonl" --model random:gpt2 --threads 1 --quiet --json "$T/int.jsonl" --timeline "$T/tl.jsonl" \
  > /dev/null 2> "$T/int.err" &
pid=$!
# SIGINT only once the replay runs: its handler is installed after the model loads (before that the
# background job ignores SIGINT, as non-interactive shells make it), and loading can take seconds on a
# busy machine; the timeline's .tmp file appears just before the handler, so wait for it, then a second
i=0
while [ ! -e "$T/tl.jsonl.tmp" ] && [ "$i" -lt 1200 ] && kill -0 "$pid" 2> /dev/null; do sleep 0.1; i=$((i + 1)); done
sleep 1
kill -INT "$pid"
wait "$pid"
rc=$?
if [ "$rc" -ne 130 ] || [ -e "$T/tl.jsonl.tmp" ] || ! python3 -c '
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
assert len(recs) == 1 and recs[0]["interrupted"] is True and recs[0]["completed"] < recs[0]["requests"]
for l in open(sys.argv[2]): json.loads(l)
' "$T/int.jsonl" "$T/tl.jsonl"; then
  echo "FAIL replay-interrupted: exit $rc (want 130), or the record / timeline is not whole"; sed 's/^/    /' "$T/int.err" | tail -3
  fails=$((fails + 1))
else
  echo "ok   replay-interrupted: exit 130, one whole record with interrupted: true, timeline renamed"
fi

# ---- model contents (defects 8, 9, 13) -------------------------------------------------------------
for t in wte.weight h.0.attn.c_attn.weight h.0.mlp.c_proj.bias ln_f.weight; do
  mkmodel "$T/nan_$t" nan "$t"
  expect "nan-$t" 1 "tensor '$t' holds a non-finite value (nan) at element 3" -- generate --model "$T/nan_$t" \
    --prompt hi --max-new 2 --quiet
done
mkmodel "$T/nan_eval" nan h.0.ln_2.bias
expect nan-eval 1 "non-finite value (nan)" -- eval --model "$T/nan_eval" --text-file "$T/p.txt"
mkmodel "$T/dup" dupkey
expect config-dup-key 1 "key 'n_layer' appears more than once" -- generate --model "$T/dup" --prompt hi \
  --max-new 1 --quiet
mkmodel "$T/padded" vocab 320
expect padded-vocab-notice 0 "ids 257..319 have no text" -- generate --model "$T/padded" --prompt hi \
  --max-new 8 --batch 2 --quiet
n=$(grep -c "have no text" "$T/err")
if [ "$n" -ne 1 ]; then echo "FAIL padded-vocab-notice: said $n times, want once"; fails=$((fails + 1)); fi

if [ "$fails" -ne 0 ]; then echo "cli_inputs: $fails FAILED"; exit 1; fi
echo "cli_inputs: all passed"
