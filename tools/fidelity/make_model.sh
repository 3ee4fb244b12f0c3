#!/bin/sh
# make_model.sh — rebuild models/gpt2-tiny-copy (`make model`): the training corpus from Debian packages,
# gpt2-tiny-wt widened by six heads with a hand-set copy circuit (frequent tokens' codes scaled down, the
# induction heads in the last layer copying through answer codes of their own: docs/fidelity.md, "Sixth
# attempt"; RECIPE below), the export in the Hugging Face layout, golden outputs. The recipe trains the
# circuit's previous-token head (Adam, 120 steps) and no curriculum steps (STEPS=0: measured to make the
# circuit worse); STEPS=N trains N steps of train.py's curriculum on top (TRAIN_ARGS: its options).
# Deterministic on one CPU thread for a given machine (PyTorch 1.13 from Debian; another VM of the same kind
# can differ in the last digits); 2.5 to 7.5 min on an idle core of a 2-core VM (docs/fidelity.md has the
# figures and the hashes we got). With STEPS=0 the circuit is built once: the export reads the step-0
# checkpoint.
# Resumable: rerun it and training continues from WORK/run/ckpt.pt.
#   STEPS (0) the schedule, STOP_AT (= STEPS) where to stop, WORK (build/fidelity), OUT (models/gpt2-tiny-copy),
#   PYTHON (/usr/bin/python3: Debian's, which has python3-torch), KVHOST (build/kvhost: the tokenizer),
#   RECIPE (the sixth attempt's options), TRAIN_ARGS (none): more train.py options,
#   GOLDEN_PYTHON (= PYTHON): a Python with torch and transformers 4.44.2 for golden.json (e.g. a venv made
#   with --system-site-packages and `pip install transformers==4.44.2`); without one the golden test skips.
set -eu
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
STEPS=${STEPS:-0}
RECIPE=${RECIPE:---widen 6 --circuit-init 3 --circuit-rarity 1e-3 --circuit-code 0.1,1000,0.1,325 --circuit-answer 0.01,50,3 \
 --circuit-pin all --prev-head 0.0 --ind-heads 5.0,5.1,5.2 --aux-weight 0 --sources austen:0.55,moby:0.35,kjv:0.1 --eval-every 50}
STOP_AT=${STOP_AT:-$STEPS}
WORK=${WORK:-$ROOT/build/fidelity}
OUT=${OUT:-$ROOT/models/gpt2-tiny-copy}
PYTHON=${PYTHON:-/usr/bin/python3}
KVHOST=${KVHOST:-$ROOT/build/kvhost}
INIT=${INIT:-$ROOT/../shared/models/gpt2-tiny-wt}

need=""
for p in r-cran-janeaustenr r-cran-tokenizers bible-kjv python3-torch python3-numpy; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need="$need $p"
done
if [ -n "$need" ]; then
    echo "make_model: installing$need (Debian packages: the corpus and PyTorch)"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends $need
fi
[ -x "$KVHOST" ] || { echo "make_model: $KVHOST is missing (make build first)"; exit 1; }
[ -f "$INIT/model.safetensors" ] || { echo "make_model: the starting model $INIT is missing (../shared)"; exit 1; }

mkdir -p "$WORK"
start=$(date +%s)
if [ ! -f "$WORK/corpus/manifest.json" ]; then
    "$PYTHON" "$ROOT/tools/fidelity/make_corpus.py" --out "$WORK/corpus" --kvhost "$KVHOST"
fi
OMP_NUM_THREADS=1 nice -n 19 "$PYTHON" "$ROOT/tools/fidelity/train.py" --run "$WORK/run" --corpus "$WORK/corpus" \
    --init "$INIT" --kvhost "$KVHOST" --steps "$STEPS" --stop-at "$STOP_AT" $RECIPE ${TRAIN_ARGS:-}
"$PYTHON" "$ROOT/tools/fidelity/train.py" --run "$WORK/run" --corpus "$WORK/corpus" --init "$INIT" \
    --kvhost "$KVHOST" --steps "$STEPS" $RECIPE ${TRAIN_ARGS:-} --export "$OUT"
cp "$WORK/run/eval.jsonl" "$OUT/train_eval.jsonl"
cp "$WORK/run/log.txt" "$OUT/train_log.txt"
cp "$WORK/corpus/manifest.json" "$OUT/corpus_manifest.json"
GOLDEN_PYTHON=${GOLDEN_PYTHON:-$PYTHON}
if "$GOLDEN_PYTHON" -c "import torch, transformers" 2>/dev/null; then
    "$GOLDEN_PYTHON" "$ROOT/tools/fidelity/golden.py" "$OUT"
else
    echo "make_model: no transformers in $GOLDEN_PYTHON: golden.json not written (GOLDEN_PYTHON=a Python with"
    echo "            torch and transformers 4.44.2, then: tools/fidelity/golden.py $OUT); its test will skip"
fi
echo "make_model: $OUT ($(sha256sum "$OUT/model.safetensors" | cut -c1-16)...) in $(( $(date +%s) - start )) s"
