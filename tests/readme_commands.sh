#!/bin/sh
# readme_commands.sh — runs every command line of README.md's ```sh blocks that needs no download, as a
# reader would type it from the repository root, and fails on any non-zero exit (issue 14, defect 14:
# the README's `plan ... --kv-dtype int8` had never been run). Lines ending in '\' are joined; comments
# and blank lines are skipped. Skipped, each with its reason printed: `make ...` (building and CI, which
# this test is part of), lines naming ~/ (a checkpoint the reader downloads first), lines naming
# ../shared when it is absent. `build/kvhost` is the binary under test. The commands run in a scratch
# copy of the layout (bench/ and ../shared linked) so files they write (runs.jsonl) land there;
# chapter.txt, the reader's own text in the README, is made up as a short file.
# usage: tests/readme_commands.sh PATH/TO/kvhost   (registered in CTest by tests/fuzz/CMakeLists.txt)
set -u
KVH=$(cd "$(dirname "${1:?usage: readme_commands.sh PATH/TO/kvhost}")" && pwd)/$(basename "$1")
SRC=$(cd "$(dirname "$0")/.." && pwd)
# Under AddressSanitizer the default random:gpt2-medium runs take ~10x longer (about half an hour in all):
# the normal build's run covers the README, so the ASan run skips (exit 77 = skipped in CTest).
if ldd "$KVH" 2>/dev/null | grep -q libasan; then
  echo "readme_commands: skipped under AddressSanitizer (the normal build runs every README command)"
  exit 77
fi
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
mkdir -p "$T/repo"
ln -s "$SRC/bench" "$T/repo/bench"
[ -d "$SRC/../shared" ] && ln -s "$(cd "$SRC/../shared" && pwd)" "$T/shared"
cat > "$T/repo/chapter.txt" <<'EOF'
No one would have believed in the last years of the nineteenth century that this world was being watched
keenly and closely by intelligences greater than man's and yet as mortal as his own.
EOF

# the command lines, one per line, continuations joined
awk '
  /^```sh/ { inblock = 1; next }
  /^```/   { inblock = 0; next }
  inblock {
    line = $0
    if (line ~ /^[ \t]*#/ || line ~ /^[ \t]*$/) next
    sub(/[ \t]*#[^"]*$/, "", line)          # trailing comment (not inside a quoted string)
    if (line ~ /\\$/) { sub(/\\$/, "", line); cur = cur line; next }
    print cur line; cur = ""
  }' "$SRC/README.md" > "$T/commands"

n_run=0 n_skip=0 fails=0
while IFS= read -r cmd; do
  case $cmd in
    make\ *) echo "skip: $cmd  (builds the project and runs CI; this test runs inside that build)"
             n_skip=$((n_skip + 1)); continue ;;
    *'~/'*)  echo "skip: $cmd  (needs a checkpoint downloaded to ~/models first)"
             n_skip=$((n_skip + 1)); continue ;;
  esac
  case $cmd in
    *../shared*) if [ ! -d "$T/shared" ]; then
                   echo "skip: $cmd  (../shared is absent on this machine)"; n_skip=$((n_skip + 1)); continue
                 fi ;;
  esac
  case $cmd in
    build/kvhost*) ;;
    *) echo "FAIL: README command does not start with build/kvhost or make: $cmd"; fails=$((fails + 1)); continue ;;
  esac
  run="\"$KVH\"${cmd#build/kvhost}"
  start=$(date +%s)
  (cd "$T/repo" && timeout -k 5 600 sh -c "$run" > "$T/out" 2> "$T/err" < /dev/null)
  rc=$?
  n_run=$((n_run + 1))
  if [ "$rc" -ne 0 ]; then
    echo "FAIL (exit $rc): $cmd"
    sed 's/^/    /' "$T/err" | tail -5
    fails=$((fails + 1))
  else
    echo "ok   ($(( $(date +%s) - start )) s): $cmd"
  fi
done < "$T/commands"

echo "readme_commands: $n_run run, $n_skip skipped, $fails failed"
if [ "$n_run" -eq 0 ]; then echo "readme_commands: no command found in README.md's sh blocks"; exit 1; fi
[ "$fails" -eq 0 ]
