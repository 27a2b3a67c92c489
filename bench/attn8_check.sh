#!/usr/bin/env bash
# FP8 prefill attention (prefill impl cudnn8+triton, lserve_jax.ops.attn8) on the GPU, one call:
#
#   PYTHONUNBUFFERED=1 GIT_COMMIT=<sha> bench/attn8_check.sh      # writes $OUT
#
# 1. its GPU tests (cuDNN FP8 against the emulation and exact attention): $OUT/pytest-attn8.log;
# 2. one layer's retrieval heads, cuDNN FP8 against cuDNN bf16 (bench/fp8_attn.py);
# 3. TTFT at 128K (bench/prefill.py): dense cuDNN bf16, sparse with FP8 attention and INT8 W8A8
#    weights (FP8 W8A8 fails the perplexity bound on SmolLM2 with it), then with bf16 weights, in that
#    order (each point is saved as it finishes; the
#    INT8 variant's first call is the slow one, ~5 min on the H200).
set -u
out=${OUT:-bench/results}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout "${TEST_LIMIT:-120}" python -m pytest -q -m gpu tests/test_attn8.py -p no:warnings > "$out/pytest-attn8.log" 2>&1
tail -2 "$out/pytest-attn8.log"
timeout "${PROBE_LIMIT:-50}" python bench/fp8_attn.py --out "$out" 2>&1 | grep -v "^\[" | tail -8
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout "${TTFT_LIMIT:-420}" python bench/prefill.py --ts 131072 \
  --variants "${VARIANTS:-dense_cudnn,sparse_attn8+w8a8int8,sparse_attn8}" --reps 2 --warmup 1 \
  --out "$out" 2>&1 | grep -E "ms \(first|FAILED|speedup|^\|" | tail -14
