#!/usr/bin/env bash
# Issue #18's H200 figures in one device call (~9 minutes), each part bounded so the next runs:
#
#   PYTHONUNBUFFERED=1 GIT_COMMIT=<sha> bench/issue18.sh        # on an H200 (needs_h200), writes $OUT
#
# 1. the GPU tests of the decode-step kernels changed since their last GPU check (fused append,
#    split combine): pytest -m gpu (log: $OUT/pytest-gpu.log);
# 2. decode ratios: bench/decode.py --tune at 128K x 4 and 256K x 1, sparse INT8 W8A8 + int8 KV,
#    sparse bf16, dense cuDNN W8A8 and bf16 (the summary keys tpot_speedup_fp8_vs_dense_bf16_*);
# 3. where the 8-bit step's GPU time goes: bench/profile_decode.py at 128K x 4 (four steps per
#    call) under an XLA dump, read back by bench/hlo_kernels.py: launches per op and layer 3's
#    launches in order ($OUT/hlo_kernels.txt);
# 4. the largest batch at 128K tokens, bf16 pages against int8 pages (bench/decode.py --max-batch,
#    zero-filled caches).
# TTFT at 128K (bench/prefill.py) does not fit beside these: its W8A8 first call took 291 s.
# PARTS (default tests,decode,profile,maxbatch) picks the parts to run, in that order; POINTS the
# decode points (default 131072x4,262144x1).
set -u
parts=",${PARTS:-tests,decode,profile,maxbatch},"
part() { [[ $parts == *",$1,"* ]]; }
out=${OUT:-bench/results}
mkdir -p "$out/maxbatch"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
part tests && timeout "${TEST_LIMIT:-120}" python -m pytest -q -m gpu tests/test_append_kernel.py tests/test_decode_kernel.py \
  -k "append or combine or sparse_decode" -p no:warnings > "$out/pytest-gpu.log" 2>&1
part tests && tail -2 "$out/pytest-gpu.log"
part decode && XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout "${DECODE_LIMIT:-260}" python bench/decode.py --tune \
  --points "${POINTS:-131072x4,262144x1}" --steps 32 \
  --variants sparse_kv_head+w8a8int8+kv8,sparse_kv_head,dense_cudnn+w8a8int8,dense_cudnn --out "$out" 2>&1 \
  | grep -v "^ " | tail -12
if part profile; then
dump=$(mktemp -d)
XLA_FLAGS="--xla_dump_to=$dump --xla_dump_hlo_as_text" timeout "${PROFILE_LIMIT:-90}" python bench/profile_decode.py \
  --points 131072x4 --variants sparse_kv_head+w8a8int8+kv8@multi4 --top 60 --out "$out" 2>&1 | grep -v "^    " | tail -3
{ python bench/hlo_kernels.py "$dump" --module multi_step
  echo; echo "== layer 3, in order"
  python bench/hlo_kernels.py "$dump" --module multi_step --layer 3; } > "$out/hlo_kernels.txt" 2>&1
rm -rf "$dump"
fi
part maxbatch && XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout "${MAXBATCH_LIMIT:-100}" python bench/decode.py --max-batch 131072 \
  --variants sparse_kv_head,sparse_kv_head+kv8 --out "$out/maxbatch" 2>&1 | grep -v "^ " | tail -5
exit 0  # each part reports its own result above; a skipped last part is not a failure
