"""Where a whole-model decode step spends its GPU time: timings plus a per-kernel profile.

    PYTHONUNBUFFERED=1 python bench/profile_decode.py --out $OUT            # on the H200

For each point and variant: mean synced step time and the unsynced (pipelined) rate over
`--steps` steps, then a `jax.profiler` trace of `--profile-steps` steps, read back with
bench/xplane.py: GPU busy time per step (kernels summed), the span the GPU took, and the
kernels that take the most time. Variants: those of bench/decode.py, plus
`sparse_kv_head_host` (selection refresh decided by the host: two static programs
alternating, instead of the engine's one program with a lax.cond) and `no_attention` (the
same model with attention and cache skipped: the floor set by weights and launches), each with
bench/decode.py's quantisation suffixes (`+w8a8`, `+w8a8int8`, `+kv8`, `+kv8e4m3`: e.g.
`sparse_kv_head+w8a8+kv8,sparse_kv_head+w8a8,sparse_kv_head+kv8,sparse_kv_head` separates what the
8-bit weights and the 8-bit KV each cost). A `@xlagemm` suffix runs 8-bit weights through XLA's
GEMMs (the default order), `@tritongemm` through the weight-only Triton skinny GEMM
(`ops.qmatmul` "triton": no activation quantiser kernels; XLA's for more rows). A `@rows1` suffix runs a variant without padding
decode projections to DECODE_MIN_ROWS rows. A `@multiK` suffix (e.g. `@multi4`) runs K greedy
steps per call in one program (a fori_loop), so what a call costs the host is paid once per K
tokens; its times are per step. Options combine: `sparse_kv_head+w8a8int8+kv8@multi4@tritongemm`. Writes profile_decode-<date>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import os
import shutil
import tempfile

import common  # noqa: F401
import jax
import jax.numpy as jnp

import xplane
from common import (as_served, copy_bandwidth, environment, log, model_config, param_bytes, qmatmul_order,
                    sparse_layout, write_json)
from decode import dense_stepper, paged_stepper, parse_variant, per_token, step_times
from lserve_jax.config import SparseConfig
from lserve_jax.heads import HeadLayout
from lserve_jax import model as model_lib
from lserve_jax.params import init_params
from lserve_jax.smoothquant import quantize_model

# variant options naming the order of the 8-bit weight product (`ops.qmatmul`)
GEMM_OPTIONS = {"xlagemm": ("xla",), "tritongemm": ("triton", "xla")}


def parse_options(opts: list[str]) -> tuple[int, bool, tuple[str, ...] | None]:
    """A variant's @options -> (steps per call, rows1, qmatmul order or None); ValueError on an
    unknown one."""
    bad = [o for o in opts if o not in GEMM_OPTIONS and o != "rows1" and not (o[:5] == "multi" and o[5:].isdigit())]
    if bad:
        raise ValueError(f"unknown variant option(s) {bad}: @multiK, @rows1, @" + ", @".join(GEMM_OPTIONS))
    multi = [int(o[5:]) for o in opts if o[:5] == "multi"]
    orders = [GEMM_OPTIONS[o] for o in opts if o in GEMM_OPTIONS]
    return (multi[-1] if multi else 1), "rows1" in opts, (orders[-1] if orders else None)


def no_attention_step(params, x_tokens, positions, cfg):
    """The decode step without attention or cache: o = q. What weights and launches cost."""
    return model_lib.decode_forward(params, x_tokens, positions, cfg, lambda i, q, k, v: (q, None))[0]


def stepper(name, params, cfg, layouts, batch, ctx, extra, kv_dtype=None, steps_per_call=1):
    if name == "no_attention":
        fn = jax.jit(functools.partial(no_attention_step, cfg=cfg))
        toks, pos = jnp.ones((batch,), jnp.int32), jnp.full((batch,), ctx, jnp.int32)
        return (lambda st: fn(params, toks, pos)), {}
    if name == "sparse_kv_head_host":
        return paged_stepper(params, cfg, layouts["sparse"], SparseConfig(selection_mode="kv_head"), batch, ctx,
                             extra, host_refresh=True, kv_dtype=kv_dtype, steps_per_call=steps_per_call)
    if name == "dense_paged":
        return paged_stepper(params, cfg, layouts["dense"], SparseConfig(sparse_decode=False), batch, ctx, extra,
                             kv_dtype=kv_dtype, steps_per_call=steps_per_call)
    mode = name.removeprefix("sparse_")
    return paged_stepper(params, cfg, layouts["sparse"], SparseConfig(selection_mode=mode), batch, ctx, extra,
                         kv_dtype=kv_dtype, steps_per_call=steps_per_call)


def profile(step, state, n, top, per_call=1):
    d = tempfile.mkdtemp(prefix="lserve_prof_")
    try:
        jax.block_until_ready(step(state))
        with jax.profiler.trace(d):
            out = None
            for _ in range(n):
                out = step(state)
            jax.block_until_ready(out)
        s = xplane.gpu_summary(xplane.find_trace(d))
    finally:
        shutil.rmtree(d, ignore_errors=True)
    kernels = sorted(s["per_name_ps"].items(), key=lambda kv: -kv[1])
    n *= per_call  # per decode step
    return {"gpu_busy_us": s["busy_ps"] / 1e6 / n, "gpu_span_us": s["span_ps"] / 1e6 / n,
            "kernels_per_step": sum(s["count"].values()) / n,
            "top": [{"name": k[:160], "us": ps / 1e6 / n, "per_step": s["count"][k] / n} for k, ps in kernels[:top]]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--points", default="131072x4,262144x1", help="comma-separated CONTEXTxBATCH")
    p.add_argument("--variants", default="no_attention,sparse_kv_head,sparse_query_head,dense_cudnn")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--profile-steps", type=int, default=8)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args(argv)
    cfg = model_config(args.shape)
    env = environment()
    bw = copy_bandwidth() if jax.default_backend() == "gpu" else None
    params = as_served(init_params(cfg, jax.random.key(0), jnp.bfloat16), cfg)
    layouts = {"sparse": sparse_layout(args.shape, cfg, 0.5),
               "dense": HeadLayout.dense(cfg.num_layers, cfg.num_kv_heads)}
    results = {"env": env, "copy_bandwidth_Bps": bw, "weights_bytes": param_bytes(params), "points": []}
    out_file = os.path.join(args.out, f"profile_decode-{env['date'][:10]}.json")
    min_rows = model_lib.DECODE_MIN_ROWS
    quantized = {None: params}  # weight mode -> params, made on first use (one copy at a time beside bf16)
    extra = 3 * args.steps + args.warmup + args.profile_steps + 8
    for point in args.points.split(","):
        ctx, batch = (int(x) for x in point.split("x"))
        for name in args.variants.split(","):
            log(f"ctx={ctx} B={batch} {name} ...")
            r = {"ctx": ctx, "batch": batch, "variant": name}
            spec, *opts = name.split("@")
            gemm = contextlib.nullcontext()
            try:
                per_call, rows1, order = parse_options(opts)
                model_lib.DECODE_MIN_ROWS = 1 if rows1 else min_rows
                if order:  # 8-bit weights through the named qmatmul order, for this variant's traces only
                    gemm = qmatmul_order(order)
                gemm.__enter__()
                base, wmode, kv = parse_variant(spec)
                if wmode not in quantized:
                    quantized.clear()
                    quantized[None], quantized[wmode] = params, quantize_model(params, cfg, wmode)
                p_run = quantized[wmode]
                if base == "dense_cudnn":
                    step, state = dense_stepper(p_run, cfg, batch, ctx, extra)
                else:
                    step, state = stepper(base, p_run, cfg, layouts, batch, ctx, extra, kv, steps_per_call=per_call)
                r.update(per_token(step_times(step, state, args.steps, args.warmup, free=False), per_call))
                r["profile"] = profile(step, state, args.profile_steps, args.top, per_call)
                state.clear()
                gc.collect()
            except Exception as e:  # keep the other variants
                log(f"FAILED: {type(e).__name__}: {str(e)[:400]}")
                r["error"] = f"{type(e).__name__}: {str(e)[:600]}"
            finally:
                gemm.__exit__(None, None, None)
            results["points"].append(r)
            write_json(out_file, results)
            pr = r.get("profile", {})
            log(f"ctx={ctx} B={batch} {name}: mean {r.get('mean_s', float('nan')) * 1e3:.2f} ms, pipelined "
                f"{r.get('pipelined_s', float('nan')) * 1e3:.2f} ms, GPU busy {pr.get('gpu_busy_us', float('nan')):.0f} us "
                f"over span {pr.get('gpu_span_us', float('nan')):.0f} us, {pr.get('kernels_per_step', 0):.0f} kernels/step")
            for k in pr.get("top", [])[: args.top]:
                print(f"    {k['us']:8.1f} us {k['per_step']:6.1f}x  {k['name'][:120]}")
    print("\n| context | batch | variant | mean ms | pipelined ms | GPU busy ms | kernels/step |\n|---|---|---|---|---|---|---|")
    for r in results["points"]:
        pr = r.get("profile", {})
        print(f"| {r['ctx']} | {r['batch']} | {r['variant']} | {r.get('mean_s', float('nan')) * 1e3:.2f} | "
              f"{r.get('pipelined_s', float('nan')) * 1e3:.2f} | {pr.get('gpu_busy_us', float('nan')) / 1e3:.2f} | "
              f"{pr.get('kernels_per_step', float('nan')):.0f} |")


if __name__ == "__main__":
    main()
