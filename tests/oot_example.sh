#!/bin/sh
# oot_example.sh — builds examples/out-of-tree-policy (and out-of-tree-score-policy) against an INSTALLED kvhost SDK, twice (CMake
# find_package and Makefile + pkg-config), and loads each result with `kvhost plugins info`.
# usage: tests/oot_example.sh [BUILD_DIR]   (BUILD_DIR: a configured and built kvhost tree, default build)
set -eu
SRC=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${1:-$SRC/build}
WORK=$(mktemp -d /tmp/kvh-oot.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
PREFIX=$WORK/prefix

echo "== install kvhost to $PREFIX"
cmake --build "$BUILD" --target kvhost >/dev/null
cmake --install "$BUILD" --prefix "$PREFIX" >/dev/null
test -f "$PREFIX/include/kvp/kvp.h"
test -f "$PREFIX/lib/cmake/kvhost/kvhostConfig.cmake"
test -f "$PREFIX/lib/pkgconfig/kvhost-sdk.pc"

echo "== build the example with CMake (find_package(kvhost))"
cmake -S "$SRC/examples/out-of-tree-policy" -B "$WORK/oot" -DCMAKE_PREFIX_PATH="$PREFIX" >/dev/null
cmake --build "$WORK/oot" >/dev/null
"$PREFIX/bin/kvhost" plugins info "$WORK/oot/my_policy.so" | tee "$WORK/info1.txt"
grep -q "^my_policy 0.1.0 (policy)" "$WORK/info1.txt"
grep -q "seed" "$WORK/info1.txt"

echo "== build the example with make + pkg-config"
mkdir -p "$WORK/mk"
cp "$SRC/examples/out-of-tree-policy/my_policy.c" "$SRC/examples/out-of-tree-policy/Makefile" "$WORK/mk/"
PKG_CONFIG_PATH="$PREFIX/lib/pkgconfig" make -C "$WORK/mk" >/dev/null
"$PREFIX/bin/kvhost" plugins info "$WORK/mk/my_policy.so" >"$WORK/info2.txt"
grep -q "^my_policy 0.1.0 (policy)" "$WORK/info2.txt"

echo "== only the entry symbol is exported"
for so in "$WORK/oot/my_policy.so" "$WORK/mk/my_policy.so"; do
  syms=$(nm -D --defined-only "$so" | awk '{print $3}' | sort | tr '\n' ' ')
  [ "$syms" = "kvp_plugin_entry " ] || { echo "unexpected exports in $so: $syms"; exit 1; }
done

echo "== the score-report example (ABI 1.3) builds and passes plugins check"
cmake -S "$SRC/examples/out-of-tree-score-policy" -B "$WORK/oot2" -DCMAKE_PREFIX_PATH="$PREFIX" >/dev/null
cmake --build "$WORK/oot2" >/dev/null
"$PREFIX/bin/kvhost" plugins check "$WORK/oot2/decayed.so" --runs 3 --steps 80 | tail -1
syms=$(nm -D --defined-only "$WORK/oot2/decayed.so" | awk '{print $3}' | sort | tr '\n' ' ')
[ "$syms" = "kvp_plugin_entry " ] || { echo "unexpected exports in decayed.so: $syms"; exit 1; }

echo "== installed plugins are found by name from the installed kvhost"
"$PREFIX/bin/kvhost" plugins info window > "$WORK/info3.txt"
# ... from its own prefix, not from the build tree it was compiled in (which still exists here)
grep -q "^file: *$PREFIX/lib/kvhost/plugins/window.so" "$WORK/info3.txt" ||
  { echo "installed kvhost loaded window from elsewhere:"; cat "$WORK/info3.txt"; exit 1; }
echo "oot_example: OK"
