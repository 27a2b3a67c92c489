"""8-bit projections on the GPU: does XLA run a real FP8 / INT8 GEMM, and how fast is it against bf16?

For the llama3-8b projection shapes (q/k/v fused sizes, o, gate/up, down) at decode rows (4) and
prefill rows (4096), times `models.layer.project` with bf16 weights, W8A8 FP8 (`quant.FP8Linear`,
FP8 activations), W8A16 (FP8 weights converted in the product) and W8A8 INT8 (`quant.Int8Linear`,
smoothed int8 activations, an int8 x int8 -> int32 product), checks each against the float32
product of the dequantised operands, and reports which GEMM the compiled program calls
(cuBLASLt's custom call names its operand types; a dequantise-then-bf16 GEMM shows no f8 / s8).
The 8-bit columns run XLA's path (the registry op "qmatmul" with implementation "xla", what
`project` runs by default); at rows <= 64 the `kernel` and `kernel-int8` columns time the
weight-only Triton kernel (`lserve_jax.pallas.qmatmul`, implementation "triton", run only when a
choice names it) on the FP8 and INT8 weights, checked against the float32 product of
the unquantised activations and the dequantised weight.

Each timing is one jitted scan over `--layers` distinct weights of the shape (every product reads
its weight from memory, as a decode step does across layers), divided by the layer count, so the
per-call dispatch that dominates a lone 4-row product is amortised.

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
from lserve_jax.ops import OpChoice, qmatmul  # noqa: E402
from lserve_jax.pallas.qmatmul import MAX_ROWS  # noqa: E402
from lserve_jax.quant import (dequantize_weight, quantize_amax, quantize_rows, quantize_weight,  # noqa: E402
                              quantize_weight_int8)

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
            ops = re.findall(r"(f8e4m3fn|bf16|f32|f16|s8|s32)\[", line)
            calls.append(f"{m.group(1)}({','.join(ops)})")
    return calls


def product(variant):
    """The product a variant times: bf16 through `project`, the 8-bit weights through the
    registry op "qmatmul" with exactly one implementation ("xla", or "triton" for the kernel
    columns), cast to the activations' dtype as `project` does."""
    if variant == "bf16":
        return project
    choice = OpChoice((IMPL[variant],))
    return lambda x, wl: qmatmul(x, wl, choice=choice).astype(x.dtype)


def stacked(w, variant):
    """A variant's product over a stack of weights (leading axis: layers), the products summed:
    one program that reads every weight once, as a decode step reads each layer's."""
    prod = product(variant)

    @jax.jit
    def run(x, ws):
        def body(acc, wl):
            return acc + prod(x, wl).astype(jnp.float32), None
        n_out = jax.eval_shape(lambda: prod(x, jax.tree.map(lambda a: a[0], w))).shape[-1]
        return jax.lax.scan(body, jnp.zeros((x.shape[0], n_out), jnp.float32), ws)[0]
    return run


def expected(x, wl, variant):
    """The float32 product of one layer's dequantised operands (what the 8-bit GEMM must equal)."""
    if variant == "bf16":
        return np.asarray(x, np.float32) @ np.asarray(wl, np.float32)
    xd = x.astype(jnp.float32)
    if IMPL[variant] == "triton":  # weight-only: activations unquantised (an INT8's smoothed, in x's dtype)
        if variant == "kernel-int8":
            xd = (xd * wl.inv_smooth).astype(x.dtype).astype(jnp.float32)
        return np.asarray(xd) @ (np.asarray(wl.w, np.float32).T * np.asarray(wl.scale))
    if variant == "int8":
        xq, s = quantize_amax(xd * wl.inv_smooth, -1, jnp.int8)
        return (np.asarray(xq, np.float32) * np.asarray(s)) @ (np.asarray(wl.w, np.float32).T * np.asarray(wl.scale))
    if wl.quantize_activations:
        xq, s = quantize_rows(x)
        xd = xq.astype(jnp.float32) * s
    return np.asarray(xd) @ np.asarray(dequantize_weight(wl))


VARIANTS = ("bf16", "w8a8", "w8a16", "int8", "kernel", "kernel-int8")
# the registry implementation of "qmatmul" each 8-bit variant names (kernel: rows <= MAX_ROWS only)
IMPL = {"w8a8": "xla", "w8a16": "xla", "int8": "xla", "kernel": "triton", "kernel-int8": "triton"}


def make_weights(w, x):
    """Stacked weights [L, in, out] -> each variant's stacked weight (int8 smoothed with the
    activation's channel maxima, as `smoothquant` calibrates it); the kernel columns at rows <=
    MAX_ROWS only (more rows are XLA's, the kernel refuses them)."""
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=0)
    out = {"bf16": w.astype(jnp.bfloat16),
           "w8a8": jax.vmap(quantize_weight)(w),
           "w8a16": jax.vmap(lambda a: quantize_weight(a, quantize_activations=False))(w),
           "int8": jax.vmap(lambda a: quantize_weight_int8(a, amax))(w)}
    if x.shape[0] <= MAX_ROWS:
        out |= {"kernel": out["w8a16"], "kernel-int8": out["int8"]}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="4,4096", help="activation rows (tokens) per product")
    ap.add_argument("--layers", type=int, default=8, help="distinct weights per timed program")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--small", action="store_true", help="CPU smoke run: tiny shapes")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    shapes = {"w": (64, 48)} if args.small else SHAPES
    n_layers = 2 if args.small else args.layers
    env = environment()
    rows_out = []
    path = os.path.join(args.out, f"fp8_gemm-{env['date'][:10]}.json")
    key = jax.random.key(0)
    for name, (i, o) in shapes.items():
        w = 0.02 * jax.random.normal(jax.random.fold_in(key, i * o), (n_layers, i, o), jnp.float32)
        for n in (int(r) for r in args.rows.split(",")):
            x = jax.random.normal(jax.random.fold_in(key, n), (n, i), jnp.float32).astype(jnp.bfloat16)
            x = x.at[:, 7].multiply(20.0)  # one outlier channel, as real activations have
            row = dict(weight=name, shape=[i, o], rows=n, layers=n_layers)
            for v, ws in make_weights(w, x).items():
                run = stacked(ws, v)
                y = np.asarray(run(x, ws))
                want = sum(expected(x, jax.tree.map(lambda a, k=k: a[k], ws), v) for k in range(n_layers))
                err = float(np.linalg.norm(y - want) / np.linalg.norm(want))
                ms = timed(run, x, ws, reps=args.reps) / n_layers * 1e3
                row[v] = dict(ms=ms, rel_err=err, gemms=sorted(set(gemm_calls(run, x, ws))),
                              tflops=2 * n * i * o / (ms * 1e-3) / 1e12)
                del ws
            rows_out.append(row)
            write_json(path, dict(env=env, rows=rows_out))  # what is done survives a time limit
            log(f"{name} {i}x{o} rows {n}: " + ", ".join(f"{v} {row[v]['ms']:.4f} ms" for v in VARIANTS if v in row))
    res = dict(env=env, rows=rows_out, note=f"ms per product: one jitted scan over {n_layers} distinct weights")
    write_json(path, res)
    print(f"{'weight':8s} {'rows':>5s} " + " ".join(f"{v + ' ms':>14s}" for v in VARIANTS)
          + f" {'w8a8 x':>7s} {'int8 x':>7s} {'kernel x':>8s}  GEMMs (w8a8 | int8)")
    for r in rows_out:
        kx = f"{r['bf16']['ms'] / r['kernel']['ms']:8.2f}" if "kernel" in r else f"{'-':>8s}"
        print(f"{r['weight']:8s} {r['rows']:5d} "
              + " ".join(f"{r[v]['ms']:14.4f}" if v in r else f"{'-':>14s}" for v in VARIANTS)
              + f" {r['bf16']['ms'] / r['w8a8']['ms']:7.2f} {r['bf16']['ms'] / r['int8']['ms']:7.2f} {kx}  "
              f"{' '.join(r['w8a8']['gemms'])[:40]} | {' '.join(r['int8']['gemms'])[:40]}")
    print("wrote", path)
    return res


if __name__ == "__main__":
    main()
