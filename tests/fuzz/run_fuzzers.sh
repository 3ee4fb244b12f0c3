#!/usr/bin/env bash
# run_fuzzers.sh — builds the libFuzzer targets with clang (-fsanitize=fuzzer,address,undefined) and runs
# each one, one after the other, for SECONDS seconds (at nice 19), starting from the committed corpus.
# Owns: the fuzz build (only the host files each target needs, so a half-written module elsewhere does
# not stop it) and the run loop. Does not own the harnesses (fuzz_*.c) or CI's corpus replay
# (tests/fuzz/CMakeLists.txt, plain gcc).
#
#   tests/fuzz/run_fuzzers.sh 600                      # every target, 10 minutes each
#   tests/fuzz/run_fuzzers.sh 60 tokenizer ini         # some targets
#   MERGE=1 tests/fuzz/run_fuzzers.sh 600              # then minimize (-merge=1) into tests/fuzz/corpus/
#
# Environment: FUZZ_BUILD (default build-fuzz), CC (default clang), JOBS_NICE (default 19).
# New inputs go to $FUZZ_BUILD/work/<target>/, crashes to $FUZZ_BUILD/crashes/<target>/. Exit status 1
# when any target found a crash, a leak, a timeout or a broken invariant.
# Needs Debian packages clang and libclang-rt-14-dev (libFuzzer + sanitizer runtimes).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
secs="${1:-60}"
shift || true
targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then targets=(safetensors model_config ini tokenizer jsonl vocab model_dir cli trace); fi
out="${FUZZ_BUILD:-$root/build-fuzz}"
cc="${CC:-clang}"
nice_level="${JOBS_NICE:-19}"
mkdir -p "$out/bin"

flags=(-std=c11 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined
       -fno-omit-frame-pointer -I"$root/host" -I"$root/sdk" -DKVH_VERSION='"fuzz"'
       -DKVH_PLUGIN_BUILD_DIR='"/nonexistent"' -DKVH_PLUGIN_INSTALL_DIR='"/nonexistent"'
       -DKVH_SOURCE_DIR="\"$root\"" -DKVH_ASSET_DIR="\"$root/host/model/assets\"")

build() { # target -> $out/bin/fuzz_<target>
  local t="$1" srcs=() libs=() extra=()
  case "$t" in
    safetensors)  srcs=(host/model/safetensors.c host/util/json_scan.c host/util/mmap_guard.c); libs=(-lcjson -lm) ;;
    model_config) srcs=(host/model/model_config.c host/plan/plan.c); libs=(-lcjson -lm) ;;
    ini)          srcs=(host/runtime/config.c); libs=(-linih) ;;
    tokenizer|vocab|cli|trace)
                  case "$t" in
                    tokenizer|vocab) srcs=(host/model/tokenizer.c host/util/json_scan.c); libs=(-lpcre2-8 -lcjson) ;;
                    trace) srcs=(host/engine/trace.c host/model/tokenizer.c host/util/json_scan.c host/util/utf8.c)
                           libs=(-lpcre2-8 -lcjson -lm) ;;
                    cli) srcs=(host/cli/cli.c host/cli/cmd_plan.c host/plan/plan.c host/runtime/config.c host/model/model.c host/model/model_config.c
                               host/model/safetensors.c host/util/json_scan.c host/util/mmap_guard.c host/model/tokenizer.c
                               host/model/checkpoint.c host/model/hub.c)
                         libs=(-linih -lpcre2-8 -lcjson -lm) ;;
                  esac
                  "$cc" -c -o "$out/bin/embedded_assets.o" "$root/host/model/embedded_assets.S" \
                    -DKVH_ASSET_VOCAB="\"$root/host/model/assets/vocab.json\"" \
                    -DKVH_ASSET_MERGES="\"$root/host/model/assets/merges.txt\""
                  libs+=("$out/bin/embedded_assets.o") ;;
    jsonl)        srcs=(host/util/metrics.c host/util/utf8.c tests/helpers/json_strict.c); libs=(-lcjson -lm)
                  # metrics.c takes the commit from a build-time header: a fixed one here
                  mkdir -p "$out/gen" && echo '#define KVH_GIT_COMMIT "fuzz"' > "$out/gen/kvh_commit.h"
                  extra=(-I"$out/gen" -I"$root/tests") ;;
    model_dir)    srcs=(host/model/model.c host/model/model_config.c host/model/safetensors.c host/util/json_scan.c host/util/mmap_guard.c
                        host/model/checkpoint.c host/model/hub.c)
                  libs=(-lcjson -lm) ;;
    *) echo "run_fuzzers: unknown target '$t' (known: safetensors model_config ini tokenizer jsonl vocab model_dir cli trace)" >&2; return 2 ;;
  esac
  local paths=("$here/fuzz_$t.c" "$root/host/util/util.c")
  for s in "${srcs[@]}"; do paths+=("$root/$s"); done
  "$cc" "${flags[@]}" "${extra[@]}" -o "$out/bin/fuzz_$t" "${paths[@]}" "${libs[@]}"
}

status=0
for t in "${targets[@]}"; do
  echo "== fuzz_$t: building"
  build "$t"
  mkdir -p "$out/work/$t" "$out/crashes/$t"
  echo "== fuzz_$t: running ${secs}s (corpus $here/corpus/$t)"
  run_extra=()
  [ "$t" = cli ] && run_extra=(-close_fd_mask=2) # plan's error lines; libFuzzer's reports still go out
  if ! nice -n "$nice_level" "$out/bin/fuzz_$t" "${run_extra[@]}" -max_total_time="$secs" -timeout=25 -rss_limit_mb=2048 \
         -max_len=65536 -print_final_stats=1 -artifact_prefix="$out/crashes/$t/" \
         "$out/work/$t" "$here/corpus/$t" > "$out/fuzz_$t.log" 2>&1; then
    echo "== fuzz_$t: FAILED, see $out/fuzz_$t.log and $out/crashes/$t/" >&2
    tail -n 40 "$out/fuzz_$t.log" >&2
    status=1
  fi
  grep -E '^stat::number_of_executed_units|^stat::peak_rss_mb' "$out/fuzz_$t.log" || true
  grep -E 'cov: ' "$out/fuzz_$t.log" | tail -n 1 || true
  if [ "${MERGE:-0}" = 1 ]; then
    rm -rf "$out/merged/$t" && mkdir -p "$out/merged/$t"
    nice -n "$nice_level" "$out/bin/fuzz_$t" -merge=1 -max_len=65536 "$out/merged/$t" \
      "$here/corpus/$t" "$out/work/$t" > "$out/merge_$t.log" 2>&1
    # keep the hand-named seeds (readable regression inputs), replace the rest with the merge result
    find "$here/corpus/$t" -type f -regextype posix-extended -regex '.*/[0-9a-f]{40}$' -delete
    for f in "$out/merged/$t"/*; do
      [ -e "$f" ] || continue
      h="$(sha1sum "$f" | cut -c1-40)"
      if ! cmp -s "$f" "$here/corpus/$t/$(basename "$f")"; then
        dup=0
        for s in "$here/corpus/$t"/*; do cmp -s "$f" "$s" && dup=1 && break; done
        [ "$dup" = 1 ] || cp "$f" "$here/corpus/$t/$h"
      fi
    done
    echo "== fuzz_$t: corpus now $(ls "$here/corpus/$t" | wc -l) files, $(du -sh "$here/corpus/$t" | cut -f1)"
  fi
done
exit "$status"
