"""Whole-model time to first token: LServe sparse prefill vs dense (cuDNN, our kernel), one process.

    PYTHONUNBUFFERED=1 python bench/prefill.py --out $OUT            # on the H200
    python bench/prefill.py --shape smollm2-135m --ts 256 --reps 1    # a CPU smoke run

Random bf16 weights (fixed seed), batch 1, the real head pattern of the shape at
static_sparsity 0.5, LServe's prefill knobs (sink 128, local 8192). TTFT = prefill of every
layer (attention, MLP, cache writes into pages and rings) + the last token's logits + sampling,
ended by block_until_ready. The first call's time (compile included) is reported separately.
Attention alone per layer is bench/prefill_attn.py. `+w8a8` after a variant runs it with FP8
weights (W8A8, `lserve_jax.quant`), `+w8a8int8` with INT8 W8A8 (smoothed int8 activations):
`--variants sparse+w8a8,sparse+w8a8int8,sparse,dense_cudnn` gives issue #18's
`ttft_speedup_w8a8_vs_dense_bf16_<T>k` (the fastest W8A8 variant, named in `w8a8_format_<T>k`).
`sparse_attn8` runs the retrieval heads' attention in FP8 on cuDNN (prefill impl cudnn8+triton,
`lserve_jax.ops.attn8`; its perplexity: bench/fp8_accuracy.py --attn8).
"""

from __future__ import annotations

import argparse
import functools
import gc
import os

import common  # noqa: F401  (puts the repo on sys.path)
import jax
import jax.numpy as jnp

from common import (add_model_args, as_served, environment, log, model_config, param_bytes, ratio, sparse_layout,
                    timed, write_json)
from lserve_jax import cache as kvc
from lserve_jax.config import SparseConfig
from lserve_jax.heads import HeadLayout
from lserve_jax.model import ModelSpec, prefill
from lserve_jax.ops import Kernels
from lserve_jax.params import init_params
from lserve_jax.smoothquant import quantize_model
from lserve_jax.sharding import shard_cache, shard_params
from lserve_jax.sampling import sample

VARIANTS = {
    # name: (sparse head layout?, prefill impl)
    "sparse": (True, "auto"),
    # the retrieval heads' attention in FP8 on cuDNN (`lserve_jax.ops.attn8`), streaming heads as "sparse"
    "sparse_attn8": (True, "cudnn8+triton"),
    "dense_cudnn": (False, "cudnn"),
    "dense_pallas": (False, "pallas"),
}


def run_variant(params, cfg, layout, impl, t, reps, warmup, tp=1):
    sparse = SparseConfig()
    spec = ModelSpec(cfg, layout, sparse, Kernels.from_names(prefill=impl), tp=tp)
    n_pages = t // sparse.page_size
    cache = kvc.init_cache(cfg, layout, sparse, batch=1, num_pages=n_pages + 1, max_pages_per_seq=n_pages,
                           dtype=jnp.bfloat16)
    cache = shard_cache(cache.replace(page_table=jnp.arange(1, n_pages + 1, dtype=jnp.int32)[None]), tp)
    tokens = jax.random.randint(jax.random.key(7), (1, t), 0, cfg.vocab_size, jnp.int32)
    lengths = jnp.full((1,), t, jnp.int32)

    @functools.partial(jax.jit, donate_argnames=("cache",))
    def ttft(params, cache, tokens, lengths):
        logits, cache = prefill(params, cache, tokens, lengths, spec)
        tok = sample(logits, jax.random.key(0), jnp.float32(0), jnp.int32(0), jnp.float32(1))
        return tok, cache

    state = {"cache": cache}

    def call():
        tok, state["cache"] = ttft(params, state["cache"], tokens, lengths)
        return tok

    r = timed(call, warmup=warmup, iters=reps)
    del state, cache
    gc.collect()
    return r


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--ts", default="32768,131072,262144", help="comma-separated prompt lengths")
    p.add_argument("--variants", default="sparse,dense_cudnn")
    p.add_argument("--reps", type=int, default=3, help="timed runs per point (after warm-up)")
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args(argv)

    cfg = model_config(args.shape)
    env = environment()
    log("env", env)
    params = as_served(init_params(cfg, jax.random.key(0), jnp.bfloat16), cfg, args.tp)
    layout_sparse = sparse_layout(args.shape, cfg, args.sparsity, args.tp)
    params = shard_params(params, cfg, args.tp)
    log(f"params {param_bytes(params) / 1e9:.1f} GB; retrieval heads per layer {layout_sparse.num_retrieval}")
    results = {"env": env, "shape": args.shape, "knobs": SparseConfig().__dict__ | {"static_sparsity": args.sparsity, "tp": args.tp},
               "retrieval_per_layer": list(layout_sparse.num_retrieval), "points": []}
    out_file = os.path.join(args.out, f"prefill-{env['date'][:10]}.json")
    names = [v for v in args.variants.split(",") if v]
    suffixes = {"+w8a8": "fp8", "+w8a8int8": "int8"}  # weight quantisation (`lserve_jax.quant` modes)

    def split(v):
        for suf, mode in suffixes.items():
            if v.endswith(suf):
                return v.removesuffix(suf), mode
        return v, None

    bad = [v for v in names if split(v)[0] not in VARIANTS]
    if bad:
        p.error(f"unknown variants {bad}: choose from {', '.join(VARIANTS)}, each optionally with +w8a8 or +w8a8int8")
    if args.tp > 1 and any(split(v)[1] for v in names):
        p.error("+w8a8 / +w8a8int8 run on one GPU only (--tp 1)")
    quantized = {None: params}
    for t in [int(x) for x in args.ts.split(",")]:
        for name in names:
            base, mode = split(name)
            use_sparse, impl = VARIANTS[base]
            layout = layout_sparse if use_sparse else HeadLayout.dense(cfg.num_layers, cfg.num_kv_heads)
            if mode not in quantized:
                quantized[mode] = quantize_model(params, cfg, mode)  # int8: smoothed over random calibration ids
            log(f"T={t} {name} ...")
            try:
                r = run_variant(quantized[mode], cfg, layout, impl, t, args.reps,
                                args.warmup, args.tp)
            except Exception as e:  # report and go on: one failing point must not lose the rest
                log(f"T={t} {name} FAILED: {type(e).__name__}: {str(e)[:300]}")
                r = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
            r.update(t=t, variant=name)
            results["points"].append(r)
            log(f"T={t} {name}: {r.get('median_s', float('nan')) * 1e3:.1f} ms (first call {r.get('first_call_s', 0):.1f} s)")
            write_json(out_file, results)
    med = {(r["t"], r["variant"]): r.get("median_s") for r in results["points"]}
    summary = {}
    for t in sorted({r["t"] for r in results["points"]}):
        summary[f"ttft_speedup_vs_cudnn_{t // 1024}k"] = ratio(med.get((t, "dense_cudnn")), med.get((t, "sparse")))
        eight = {v: med[t, v] for v in ("sparse+w8a8", "sparse+w8a8int8", "sparse_attn8+w8a8", "sparse_attn8+w8a8int8")
                 if med.get((t, v))}
        if eight:  # the faster W8A8 format
            summary[f"ttft_speedup_w8a8_vs_dense_bf16_{t // 1024}k"] = ratio(med.get((t, "dense_cudnn")),
                                                                            min(eight.values()))
            summary[f"w8a8_format_{t // 1024}k"] = min(eight, key=eight.get).removeprefix("sparse").lstrip("_+")
        # FP8 attention against bf16 attention with the same weights (INT8 W8A8 where both ran)
        pairs = [(med.get((t, f"sparse{w}")), med.get((t, f"sparse_attn8{w}"))) for w in ("+w8a8int8", "")]
        summary[f"ttft_speedup_attn8_vs_bf16_attention_{t // 1024}k"] = next(
            (ratio(a, b) for a, b in pairs if a and b), None)
    results["summary"] = summary
    write_json(out_file, results)
    print("\n| T | variant | TTFT ms | speedup vs cuDNN dense |\n|---|---|---|---|")
    for r in results["points"]:
        sp = ratio(med.get((r["t"], "dense_cudnn")), r.get("median_s"))
        print(f"| {r['t']} | {r['variant']} | {r.get('median_s', float('nan')) * 1e3:.1f} | "
              f"{'' if sp is None else f'{sp:.2f}x'} |")
    print(summary)


if __name__ == "__main__":
    main()
