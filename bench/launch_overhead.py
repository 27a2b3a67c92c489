"""What one kernel launch costs inside a jitted program, by kind of kernel: is a Pallas (Triton)
kernel or a lax.cond recorded into XLA's command buffers (CUDA graphs) like a fusion, or does each
one end a graph and cost a host launch of its own?

    PYTHONUNBUFFERED=1 python bench/launch_overhead.py --out $OUT        # on the GPU
    XLA_FLAGS=--xla_gpu_enable_command_buffer=+CONDITIONAL python bench/launch_overhead.py --tag cond

Why: the 8-bit decode step (1,313 kernels) keeps the H200 busy 5.68 ms yet takes 6.95 ms, while
bf16 (841 kernels) keeps it busy 6.07 ms for 6.37 ms (profile_decode-2026-12-06c-h200.json), and
the weight-only Triton GEMM (4 more Pallas kernels a layer) made the step slower still.

Chains of N tiny steps on a [rows, 128] float32 array, each jitted as one program and dispatched
back to back (`--calls` times, one sync at the end: the pipelined time, as a serving loop runs):
  xla      x <- x + 1e-9 * sum(x): two XLA kernels a step (a reduction, then the add)
  pallas   x <- pallas_inc(x) * 1.0001: a Pallas Triton kernel and an XLA fusion a step
  cond     x <- cond(sum(x) > 0, f, g)(x): a lax.cond (its predicate and branch kernels) a step
Reported: microseconds per step and per kernel (the kernel count is the static one above; the
GPU time of such tiny kernels is ~2 us each). The run under several XLA_FLAGS (one process each)
shows which kinds the command buffers hold.
"""

from __future__ import annotations

import argparse
import os
import time

from common import environment, log, write_json

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402

from lserve_jax.pallas.compat import resolve_interpret, triton_params  # noqa: E402


def _inc_kernel(x_ref, o_ref):
    o_ref[...] = x_ref[...] + 1.0


def pallas_inc(x):
    return pl.pallas_call(_inc_kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
                          compiler_params=triton_params(1, 1), interpret=resolve_interpret(None),
                          name="launch_probe_inc")(x)


def chain(kind: str, n: int):
    def xla_step(x):
        return x + 1e-9 * jnp.sum(x)

    def pallas_step(x):
        return pallas_inc(x) * 1.0001

    def cond_step(x):
        return jax.lax.cond(jnp.sum(x) > 0, lambda y: y * 1.0001, lambda y: y + 1.0, x)

    step = {"xla": xla_step, "pallas": pallas_step, "cond": cond_step}[kind]

    @jax.jit
    def f(x):
        for _ in range(n):
            x = step(x)
        return x

    return f


KERNELS_PER_STEP = 2  # every kind above: two launches a step


def measure(kind: str, n: int, rows: int, calls: int) -> dict:
    f = chain(kind, n)
    x = jnp.ones((rows, 128), jnp.float32)
    t = time.perf_counter()
    jax.block_until_ready(f(x))
    compile_s = time.perf_counter() - t
    for _ in range(3):
        x = f(x)
    jax.block_until_ready(x)
    best = None
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(calls):
            x = f(x)
        jax.block_until_ready(x)
        dt = (time.perf_counter() - t) / calls
        best = dt if best is None else min(best, dt)
    return {"kind": kind, "steps": n, "rows": rows, "calls": calls, "compile_s": compile_s,
            "us_per_call": best * 1e6, "us_per_step": best * 1e6 / n,
            "us_per_kernel": best * 1e6 / (n * KERNELS_PER_STEP)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=128, help="steps per chain (one jitted program)")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--calls", type=int, default=50, help="programs dispatched back to back per timing")
    p.add_argument("--kinds", default="xla,pallas,cond")
    p.add_argument("--tag", default="default", help="names the XLA_FLAGS setting in the JSON")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args(argv)
    for flag in ("steps", "rows", "calls"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    try:
        return run(args)
    except BrokenPipeError:  # `... | head`: stop quietly, as the generate CLI does
        from lserve_jax.generate import _silence_stdout

        _silence_stdout()
        return []


def run(args):
    env = environment()
    env["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    rows = []
    for kind in [k for k in args.kinds.split(",") if k]:
        r = measure(kind, args.steps, args.rows, args.calls)
        rows.append(r)
        log(f"{args.tag:10} {kind:7} {r['us_per_step']:8.2f} us/step {r['us_per_kernel']:7.2f} us/kernel "
            f"(compile {r['compile_s']:.1f}s)")
    path = os.path.join(args.out, f"launch_overhead-{env['date'][:10]}-{args.tag}.json")
    write_json(path, {"env": env, "tag": args.tag, "rows": rows})
    print("| flags | kind | us/step | us/kernel |\n|---|---|---|---|")
    for r in rows:
        print(f"| {args.tag} | {r['kind']} | {r['us_per_step']:.2f} | {r['us_per_kernel']:.2f} |")
    return rows


if __name__ == "__main__":
    main()
