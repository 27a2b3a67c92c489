#!/usr/bin/env bash
# Issue #18 in one device call: which 8-bit product makes the INT8 W8A8 + int8-KV decode step
# faster, then the decode ratios against dense bf16 cuDNN with the faster one.
#
#   PYTHONUNBUFFERED=1 GIT_COMMIT=<sha> bench/qmatmul_ab.sh            # on the GPU machine, writes $OUT
#   (AB_LIMIT, DECODE_LIMIT: seconds for each part; DEADLINE: decode.py stops by then instead)
#
# 1. bench/profile_decode.py, four steps per call: XLA's W8A8 GEMMs (the default) against the
#    weight-only Triton skinny GEMM (@tritongemm), at 128K x 4 and 256K x 1, with XLA's dump read
#    back by bench/hlo_kernels.py (launches per op of each compiled step: hlo_kernels_<i>.txt).
# 2. bench/decode.py --tune with the order that was faster at every point (--qmatmul), at the
#    points this card holds: 128K x 4 needs ~80 GB for the dense bf16 baseline (an H200), so on a
#    smaller card only 256K x 1 runs.
set -u
out=${OUT:-bench/results}
variant=sparse_kv_head+w8a8int8+kv8@multi4
dump=$(mktemp -d)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
XLA_FLAGS="--xla_dump_to=$dump --xla_dump_hlo_as_text" timeout "${AB_LIMIT:-250}" python bench/profile_decode.py \
  --points 131072x4,262144x1 --variants "$variant,$variant@tritongemm" --top 40 --out "$out" 2>&1 \
  | grep -v "^    " | tail -9
for i in 0 1 2 3; do
  python bench/hlo_kernels.py "$dump" --module multi_step --index "$i" > "$out/hlo_kernels_$i.txt" 2>&1 || break
done
rm -rf "$dump"
order=$(python - "$out" <<'EOF'
import glob, json, sys
runs = {}
for f in glob.glob(f"{sys.argv[1]}/profile_decode-*.json"):
    for r in json.load(open(f))["points"]:
        if "pipelined_s" in r:
            runs[(r["ctx"], r["batch"], r["variant"].endswith("@tritongemm"))] = r["pipelined_s"]
points = {(c, b) for c, b, _ in runs}
wins = [runs.get((c, b, True), 1e9) < runs.get((c, b, False), 0) for c, b in points]
print("triton,xla" if wins and all(wins) else "xla")
EOF
)
echo "8-bit product order for decode.py: $order"
mem=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
points=262144x1
[ "${mem:-0}" -gt 120000 ] && points=131072x4,262144x1
# DEADLINE: seconds of this shell's life by which decode.py must stop (the device call's limit)
limit=${DECODE_LIMIT:-300}
[ -n "${DEADLINE:-}" ] && limit=$((DEADLINE - SECONDS))
XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 timeout "$limit" python bench/decode.py --tune --qmatmul "$order" \
  --points "$points" --steps 32 \
  --variants sparse_kv_head+w8a8int8+kv8,sparse_kv_head,dense_cudnn+w8a8int8,dense_cudnn --out "$out" 2>&1 \
  | grep -v "^ " | tail -14
