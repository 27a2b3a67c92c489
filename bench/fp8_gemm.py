"""FP8 projections on the GPU: does XLA run a real FP8 GEMM, and how fast is it against bf16?

For the llama3-8b projection shapes (q/k/v fused sizes, o, gate/up, down) at decode rows (4) and
prefill rows (4096), times `models.layer.project` with bf16 weights, W8A8 (`quant.FP8Linear`,
FP8 activations) and W8A16 (FP8 weights converted in the product), checks each against the
float32 product of the dequantised operands, and reports which GEMM the compiled program calls
(cuBLASLt's FP8 custom call names its operand types; a dequantise-then-bf16 GEMM shows no f8).

    python bench/fp8_gemm.py [--out DIR]          # JSON fp8_gemm-<date>.json, a table on stdout
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from common import environment, log, write_json  # noqa: E402

from lserve_jax.models.layer import project  # noqa: E402
from lserve_jax.quant import dequantize_weight, quantize_rows, quantize_weight  # noqa: E402

# llama3-8b: hidden 4096, q 4096, kv 1024, intermediate 14336
SHAPES = {"wq": (4096, 4096), "wk": (4096, 1024), "wo": (4096, 4096), "w_gate": (4096, 14336),
          "w_down": (14336, 4096)}


def timed(fn, *args, reps):
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def gemm_calls(fn, *args) -> list[str]:
    """The GEMM custom calls of the compiled program, with their operand types."""
    hlo = fn.lower(*args).compile().as_text()
    calls = []
    for line in hlo.splitlines():
        m = re.search(r'custom_call_target="([^"]*(?:gemm|matmul|cublas)[^"]*)"', line)
        if m:
            ops = re.findall(r"(f8e4m3fn|bf16|f32|f16)\[", line)
            calls.append(f"{m.group(1)}({','.join(ops)})")
    return calls


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="4,4096", help="activation rows (tokens) per product")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--small", action="store_true", help="CPU smoke run: tiny shapes")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    shapes = {"w": (64, 48)} if args.small else SHAPES
    env = environment()
    rows_out = []
    path = os.path.join(args.out, f"fp8_gemm-{env['date'][:10]}.json")
    key = jax.random.key(0)
    f = jax.jit(project)
    for name, (i, o) in shapes.items():
        w = (0.02 * jax.random.normal(jax.random.fold_in(key, i * o), (i, o), jnp.float32))
        wb = w.astype(jnp.bfloat16)
        variants = {"bf16": wb, "w8a8": quantize_weight(w), "w8a16": quantize_weight(w, quantize_activations=False)}
        for n in (int(r) for r in args.rows.split(",")):
            x = jax.random.normal(jax.random.fold_in(key, n), (n, i), jnp.float32).astype(jnp.bfloat16)
            row = dict(weight=name, shape=[i, o], rows=n)
            for v, wv in variants.items():
                y = np.asarray(f(x, wv).astype(jnp.float32))
                if v == "bf16":
                    want = np.asarray(x, np.float32) @ np.asarray(wb, np.float32)
                else:
                    xd = x.astype(jnp.float32)
                    if wv.quantize_activations:
                        xq, s = quantize_rows(x)
                        xd = xq.astype(jnp.float32) * s
                    want = np.asarray(xd) @ np.asarray(dequantize_weight(wv))
                err = float(np.linalg.norm(y - want) / np.linalg.norm(want))
                ms = timed(f, x, wv, reps=args.reps) * 1e3
                row[v] = dict(ms=ms, rel_err=err, gemms=gemm_calls(f, x, wv),
                              tflops=2 * n * i * o / (ms * 1e-3) / 1e12)
            rows_out.append(row)
            write_json(path, dict(env=env, rows=rows_out))  # what is done survives a time limit
            log(f"{name} {i}x{o} rows {n}: " + ", ".join(f"{v} {row[v]['ms']:.3f} ms" for v in variants))
    res = dict(env=env, rows=rows_out)
    write_json(path, res)
    print(f"{'weight':8s} {'rows':>5s} {'bf16 ms':>8s} {'w8a8 ms':>8s} {'w8a16 ms':>9s} {'w8a8 x':>7s}  w8a8 GEMM")
    for r in rows_out:
        print(f"{r['weight']:8s} {r['rows']:5d} {r['bf16']['ms']:8.3f} {r['w8a8']['ms']:8.3f} {r['w8a16']['ms']:9.3f} "
              f"{r['bf16']['ms'] / r['w8a8']['ms']:7.2f}  {' '.join(r['w8a8']['gemms'])[:60]}")
    print("wrote", path)
    return res


if __name__ == "__main__":
    main()
