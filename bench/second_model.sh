#!/usr/bin/env bash
# The accuracy study on a second model, on a GPU: convert a GGUF (or HF directory), calibrate its
# head pattern (the `python -m lserve_jax.calibrate` defaults) and the attention-mass baseline,
# then run bench/accuracy.py with them. Every step is skipped when its output already exists, so
# a run cut short by a time limit continues where it stopped (accuracy.py --resume).
#
#   bench/second_model.sh MODEL.gguf OUTDIR [bench/accuracy.py arguments...]
#
# Used for Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF, ../shared/BENCH.md); the arguments of that run
# are in the note of bench/results/second_model-qwen2.5-coder-0.5b-*.json.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 MODEL.gguf|HF_DIR OUTDIR [bench/accuracy.py arguments...]" >&2
  exit 2
fi
src=$1 out=$2
shift 2
ckpt=${CKPT:-${LSERVE_JAX_CACHE:-$HOME/.cache/lserve_jax}/$(basename "${src%/}" .gguf)-lserve}  # the converted checkpoint
mkdir -p "$out"
[ -f "$ckpt/lserve.json" ] || python -m convert "$src" "$ckpt" --dtype float32 --quiet --force
[ -f "$out/pattern.tsv" ] || python -m lserve_jax.calibrate "$ckpt" --output "$out/pattern.tsv"
[ -f "$out/mass.tsv" ] || python -m lserve_jax.calibrate "$ckpt" --method attention-mass \
  --output "$out/mass.tsv"
python bench/accuracy.py --checkpoint "$ckpt" --pattern "$out/pattern.tsv" --mass-pattern "$out/mass.tsv" \
  --out "$out/accuracy.json" --resume "$@"
