#!/usr/bin/env bash
# make_devcarry.sh — prepares, on this CPU machine, everything the GPU check (bench/gpu_check.sh) needs on a
# GPU machine that has the CUDA toolkit, PyTorch and transformers but none of our Debian libraries
# (inih, cJSON, PCRE2, Criterion, libmicrohttpd, ...) and no ../shared beside the repo:
#
#   .devcarry/build.tar.xz   a CUDA build (KVH_CUDA=ON, -march=native off since the GPU host's CPU may
#                            differ): kvhost, test_cuda, the plugins, tests/plugins/tp_report.so and, in
#                            build/lib, the shared libraries they load except glibc's, the compiler's and
#                            CUDA's own (the GPU machine has those). Paths inside are relative to the repo
#                            root, as the binaries' baked paths (/work/main/.devcarry/build) expect.
#                            gpu_check.sh links /work/main to the checkout there and puts the model in
#                            the shared/ folder beside the checkout (what /work/main/../shared resolves to).
#   .devcarry/tiny-f16.tar.xz  the tiny trained model (../shared/models/gpt2-tiny-wt) with its weights in
#                            F16 (bench/safetensors_f16.py): 35 MB instead of 70, so that test_cuda's
#                            tiny-model comparisons run there too. Both backends read the same fp16 values.
#
# Both fit the device tool's 64 MiB (working tree included); the script prints the sizes and fails if the
# total would not fit. The build directory itself (.devcarry/build, with its object files) stays here.
#
# usage (here):  bench/make_devcarry.sh
# then one device call:  run(command="bench/gpu_check.sh", carry=[".devcarry/build.tar.xz",
#                        ".devcarry/tiny-f16.tar.xz"], timeout_s=510)       (docs/results/gpu/README.md)
set -euo pipefail
cd "$(dirname "$0")/.."
EXCL=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$EXCL")"
grep -qx '/.devcarry/' "$EXCL" 2>/dev/null || echo '/.devcarry/' >> "$EXCL"
B=.devcarry/build
cmake -S . -B "$B" -DKVH_CUDA=ON -DKVH_NATIVE=OFF -DCMAKE_BUILD_TYPE=Release >/dev/null
make -C "$B" -j"$(nproc)" kvhost test_cuda window sink h2o pyramid int8 int4 minicache tova scissorhands \
  tp_report 2>&1 | grep -E "error|warning" || true
rm -rf "$B/lib" && mkdir -p "$B/lib"
for f in $(ldd "$B/kvhost" "$B/test_cuda" | awk '/=>/{print $3}' | sort -u); do
  case "$(basename "$f")" in
    libc.so*|libm.so*|libdl.so*|libpthread.so*|librt.so*|libresolv.so*|libgcc_s.so*|libstdc++.so*) continue ;;
    libcuda*|libcublas*|libcudart*) continue ;;
  esac
  cp -L "$f" "$B/lib/"
done
tar -cJf .devcarry/build.tar.xz "$B/kvhost" "$B/test_cuda" "$B"/plugins/*.so "$B/tests/plugins/tp_report.so" "$B/lib"

TINY=../shared/models/gpt2-tiny-wt
rm -f .devcarry/tiny-f16.tar.xz
if [ -f "$TINY/model.safetensors" ]; then
  S=.devcarry/stage && rm -rf "$S" && mkdir -p "$S/shared/models/gpt2-tiny-wt"
  cp "$TINY/config.json" "$TINY/vocab.json" "$TINY/merges.txt" "$S/shared/models/gpt2-tiny-wt/"
  python3 bench/safetensors_f16.py "$TINY/model.safetensors" "$S/shared/models/gpt2-tiny-wt/model.safetensors"
  tar -cJf .devcarry/tiny-f16.tar.xz -C "$S" shared
  rm -rf "$S"
else
  echo "make_devcarry: $TINY absent: the tiny-model tests of test_cuda will skip on the GPU machine"
fi
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
carry=$(du -cb .devcarry/*.tar.xz | tail -1 | cut -f1)
du -h .devcarry/*.tar.xz
echo "make_devcarry: working tree $((tree >> 20)) MiB + carry $((carry >> 20)) MiB of the device tool's 64 MiB"
[ $((tree + carry)) -lt $((64 << 20)) ] || { echo "make_devcarry: over the 64 MiB limit"; exit 1; }
