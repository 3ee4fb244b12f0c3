#!/bin/sh
# plugin_crash.sh — a plugin that crashes inside a hook is reported with its name, file and hook before
# kvhost dies with the signal (docs/security.md). usage: tests/plugin_crash.sh BUILD_DIR
set -u
BUILD=${1:?usage: plugin_crash.sh BUILD_DIR}
OUT=$(mktemp)
trap 'rm -f "$OUT"' EXIT
"$BUILD/kvhost" generate --model random:gpt2 --prompt-tokens 40 --max-new 8 --quiet --threads 1 \
    --plugin-path "$BUILD/tests/plugins" --plugins bad_segv.so --set cache.budget=16 --set cache.slack=4 \
    >/dev/null 2>"$OUT"
rc=$?
cat "$OUT"
# 128 + SIGSEGV (11) = 139 when the shell reports the signal
[ "$rc" -eq 139 ] || { echo "FAIL: expected death by SIGSEGV (139), got exit $rc"; exit 1; }
grep -q "plugin 'bad_segv' (.*bad_segv.so) crashed with SIGSEGV in hook evict (layer [0-9]*)" "$OUT" ||
    { echo "FAIL: the crash report does not name the plugin and hook"; exit 1; }
echo "PASS: the crash names plugin bad_segv and hook evict"
