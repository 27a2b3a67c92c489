#!/usr/bin/env bash
# The kernels' GPU check in one call (H200, well under 8 minutes):
#   1. `pytest -m gpu` over the kernel test files (FP8 pages too) and the end-to-end tiny models
#      (log: $OUT/pytest-gpu.log);
#   2. a short timing of the prefill kernel, plain vs offset (chunked) form: llama3-8b heads
#      (Hq 32, Hkv 8, D 128, bf16), a 4096-token chunk at offset 0 (plain and offset form) and at
#      offsets 28672 and 126976 (Tk = offset + 4096), retrieval-only and streaming-only
#      (sink 128, local 8192); a table on stdout and $OUT/prefill_offset.json.
#
#   OUT=/some/dir bench/kernel_check.sh        # OUT defaults to bench/results/kernel_check
#   KC_TESTS=tests/test_kv8.py KC_SELECT="f32" WORKERS=4 PYTEST_LIMIT=200 bench/kernel_check.sh
#                                              # a subset: these files, tests matching -k KC_SELECT
#
# Exit status: pytest's if it failed, else the timing's.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/kernel_check}
PY=${PYTHON:-python}
mkdir -p "$OUT"

echo "== pytest -m gpu ($(date -u +%FT%TZ))"
# bounded, so that the timing below always runs inside the budget (4 workers: at 8, each worker's
# 9 GB of an H100 ran 31 float32 tests out of memory, 2026-12-05e)
# (compiling dominates: 8 workers share the GPU, each allocating as it goes; one run took 360 s
# for 76 of the 169 tests on one worker)
# (each failure's reason goes to $OUT/pytest-gpu-failures.txt at once: a run cut by its limit
# prints no summary)
# (each worker may take its share of the GPU's memory and no more: an inherited
# XLA_PYTHON_CLIENT_MEM_FRACTION of 0.95 let 8 workers run each other out of memory, 42 failures
# that were all allocation errors)
WORKERS=${WORKERS:-4}
FRACTION=$(python3 -c "print(round(0.9 / $WORKERS, 3))")
TESTS=${KC_TESTS:-tests/test_append_kernel.py tests/test_decode_kernel.py tests/test_ops_registry.py \
  tests/test_prefill_kernel.py tests/test_selection.py tests/test_gpu_models.py tests/test_kv8.py tests/test_qmatmul.py}
XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=$FRACTION PYTHONPATH=bench \
  FAILURES_FILE="$OUT/pytest-gpu-failures.txt" \
  timeout ${PYTEST_LIMIT:-420} "$PY" -m pytest -p pytest_failures -m gpu -n $WORKERS \
  $TESTS ${KC_SELECT:+-k "$KC_SELECT"} -q -rfE -p no:cacheprovider \
  --tb=short --durations=15 2>&1 | tee "$OUT/pytest-gpu.log"
test_rc=${PIPESTATUS[0]}
[ "$test_rc" = 124 ] && echo "pytest stopped by its ${PYTEST_LIMIT:-420} s limit" | tee -a "$OUT/pytest-gpu.log"

echo "== prefill kernel: plain vs offset form ($(date -u +%FT%TZ))"
timeout 100 "$PY" - "$OUT/prefill_offset.json" <<'EOF'
import datetime, json, os, statistics, sys, time

import jax
import jax.numpy as jnp
import numpy as np

from lserve_jax.pallas.prefill import prefill_attention_pallas

HQ, HKV, D, T = 32, 8, 128, 4096
SINK, LOCAL = 128, 8192
OFFSETS = (28672, 126976)
REPS = 5
if os.environ.get("KERNEL_CHECK_SMOKE"):  # a CPU smoke run of this script (interpret mode)
    HQ, HKV, D, T, SINK, LOCAL, OFFSETS, REPS = 4, 2, 32, 64, 4, 100, (64, 192), 1


def visible_pairs(offset, nr_all):
    """Query-key pairs the kernel computes (for the TFLOP/s column): per row at position p,
    p + 1 keys (retrieval) or the sink and the local window (streaming)."""
    p = offset + np.arange(T, dtype=np.int64)
    if nr_all:
        return int((p + 1).sum())
    return int((np.minimum(p + 1, LOCAL) + np.minimum(SINK, np.maximum(p + 1 - LOCAL, 0))).sum())


def timed(fn):
    jax.block_until_ready(fn())  # compile
    jax.block_until_ready(fn())  # warm
    times = []
    for _ in range(REPS):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return times


rows = []
key = jax.random.PRNGKey(0)
q = jax.random.normal(key, (1, T, HQ, D), jnp.float32).astype(jnp.bfloat16)
lengths = jnp.asarray([T], jnp.int32)
for offset, form in [(0, "plain"), (0, "offset")] + [(o, "offset") for o in OFFSETS]:
    tk = offset + T
    kk, kv = jax.random.split(jax.random.fold_in(key, tk))
    k = jax.random.normal(kk, (1, tk, HKV, D), jnp.float32).astype(jnp.bfloat16)
    v = jax.random.normal(kv, (1, tk, HKV, D), jnp.float32).astype(jnp.bfloat16)
    for heads, nr in (("retrieval", HKV), ("streaming", 0)):
        kw = dict(num_retrieval=nr, sink=SINK, local=LOCAL)
        if form == "offset":
            kw["q_offset"] = jnp.asarray([offset], jnp.int32)
        fn = lambda: prefill_attention_pallas(q, k, v, lengths, **kw)
        out = fn()
        finite = bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
        times = timed(fn)
        med = statistics.median(times)
        flops = 4 * D * HQ * visible_pairs(offset, nr == HKV)
        rows.append(dict(heads=heads, form=form, offset=offset, t=T, tk=tk, ms_median=med * 1e3,
                         ms_min=min(times) * 1e3, tflops=flops / med / 1e12, finite=finite, reps=REPS))
        del out

print(f"{'heads':10s} {'form':7s} {'offset':>7s} {'Tk':>7s} {'ms med':>8s} {'ms min':>8s} {'TFLOP/s':>8s} finite")
for r in rows:
    print(f"{r['heads']:10s} {r['form']:7s} {r['offset']:7d} {r['tk']:7d} {r['ms_median']:8.2f} {r['ms_min']:8.2f} "
          f"{r['tflops']:8.1f} {r['finite']}")
meta = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__,
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            shapes=dict(hq=HQ, hkv=HKV, d=D, t=T, dtype="bfloat16", sink=SINK, local=LOCAL),
            note="prefill_attention_pallas, default tiles; time.perf_counter around jax.block_until_ready "
                 "after a compile and a warm-up call")
with open(sys.argv[1], "w") as f:
    json.dump(dict(meta=meta, rows=rows), f, indent=1)
print("wrote", sys.argv[1])
EOF
bench_rc=$?
[ "$bench_rc" = 124 ] && echo "timing stopped by its 100 s limit"
echo "== done ($(date -u +%FT%TZ)): pytest rc=$test_rc, timing rc=$bench_rc"
[ "$test_rc" != 0 ] && exit "$test_rc"
exit "$bench_rc"
