#!/bin/sh
# limits.sh — resource limits of the real CLI (issue 9, docs/security.md): hostile dimensions in
# config.json, tensor sizes that overflow size_t, a prompt file of gigabytes (sparse), --max-new beyond
# n_positions, budget 0, slack 0. Each must be a clear error with a known exit code (or, for slack 0,
# the documented behaviour: evict at every step), never an overflow, an OOM kill or a crash.
# usage: tests/limits.sh PATH/TO/kvhost        (registered in CTest by tests/fuzz/CMakeLists.txt)
set -u
KVH=${1:?usage: limits.sh PATH/TO/kvhost}
SRC=$(cd "$(dirname "$0")/.." && pwd)
BUILD=$(dirname "$KVH")
TINY="$SRC/../shared/models/gpt2-tiny-wt"
[ -f "$TINY/model.safetensors" ] || TINY="random:gpt2"
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
fails=0

# expect NAME WANT_RC FRAGMENT -- kvhost args...
expect() {
  name=$1 want=$2 frag=$3
  shift 4
  "$KVH" "$@" > "$T/out" 2> "$T/err"
  rc=$?
  if [ "$rc" -ne "$want" ] || ! grep -qF -- "$frag" "$T/err"; then
    echo "FAIL $name: exit $rc (want $want), stderr lacks '$frag':"
    sed 's/^/    /' "$T/err" | head -5
    fails=$((fails + 1))
  else
    echo "ok   $name: exit $rc, '$frag'"
  fi
}

# a checkpoint directory: config.json and model.safetensors given, tokenizer files from host/model/assets
mkmodel() {
  mkdir -p "$T/$1"
  cp "$2" "$T/$1/config.json"
  cp "$3" "$T/$1/model.safetensors"
  cp "$SRC/host/model/assets/vocab.json" "$SRC/host/model/assets/merges.txt" "$T/$1/"
}
C="$SRC/tests/fuzz/corpus"
mkmodel huge "$C/model_config/huge-embd.json" "$C/safetensors/small-f32.bin"
expect huge-dims 1 "key 'n_embd'" -- generate --model "$T/huge" --prompt hi --max-new 1 --quiet
sed 's/"n_embd": [0-9]*/"n_embd": 16384/; s/"n_layer": [0-9]*/"n_layer": 256/; s/"n_head": [0-9]*/"n_head": 16/' \
  "$C/model_config/tiny-config.json" > "$T/big.json"
mkmodel big "$T/big.json" "$C/safetensors/small-f32.bin"
# dimensions inside the limits but a file that does not hold them: refused before any allocation
expect big-dims-small-file 1 "[50257, 16384] from config.json" -- generate --model "$T/big" --prompt hi --max-new 1 --quiet
mkmodel ovf "$C/model_config/tiny-config.json" "$C/safetensors/overflow-dims.bin"
expect size_t-overflow 1 "overflows size_t" -- generate --model "$T/ovf" --prompt hi --max-new 1 --quiet
mkmodel hlen "$C/model_config/tiny-config.json" "$C/safetensors/huge-hlen.bin"
expect header-length 1 "header length" -- generate --model "$T/hlen" --prompt hi --max-new 1 --quiet

truncate -s 3G "$T/big.txt"   # sparse: no disk used; the limit is checked before reading
expect prompt-3GiB 1 "more than the limit of 67108864 bytes" -- generate --model random:gpt2 \
  --prompt-file "$T/big.txt" --max-new 1 --quiet
expect max-new-beyond-n_positions 1 "n_positions 1024" -- generate --model random:gpt2 --prompt hi \
  --max-new 5000 --quiet
expect max-new-out-of-range 2 "--max-new" -- generate --model random:gpt2 --prompt hi --max-new 99999999 --quiet
expect budget-0 2 "budget must be >= 1" -- generate --model random:gpt2 --prompt hi --max-new 1 --quiet \
  --plugin-path "$BUILD/plugins" --plugins window.so --set cache.budget=0
printf '[cache]\nbudget = 0\n' > "$T/b0.ini"
expect budget-0-ini 2 "b0.ini:2: [cache] budget = 0" -- generate --model random:gpt2 --config "$T/b0.ini" \
  --prompt hi --max-new 1 --quiet
expect slack-negative 2 "slack" -- generate --model random:gpt2 --prompt hi --max-new 1 --quiet \
  --set cache.slack=-1
# slack 0 is allowed: the policy evicts at every step, the cache never holds more than the budget
expect slack-0-runs 0 "tokens/s" -- generate --model "$TINY" --threads 1 --quiet --max-new 3 \
  --prompt "one two three four five six seven eight nine ten" --plugin-path "$BUILD/plugins" \
  --plugins window.so --set cache.budget=4 --set cache.slack=0

if [ "$fails" -ne 0 ]; then echo "limits: $fails FAILED"; exit 1; fi
echo "limits: all passed"
