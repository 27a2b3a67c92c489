"""Whole-model time per output token: LServe sparse decode vs dense decode, one process.

    PYTHONUNBUFFERED=1 python bench/decode.py --out $OUT                    # on the H200
    python bench/decode.py --shape smollm2-135m --points 1024x1 --steps 4    # a CPU smoke run

Random bf16 weights and a KV cache filled with random keys/values (attention cost does not
depend on values; selection cost depends on the budget), the real head pattern at
static_sparsity 0.5, LServe's decode knobs (budget 4096, pages 64/16, interval 4, ring 128+256).
Variants: sparse with per-query-head and per-KV-head selection; dense paged (our kernel, every
page); dense cuDNN over a contiguous cache. A variant takes LServe's quantisation with suffixes
(issue #18): `+w8a8` runs FP8 weights (W8A8, cuBLASLt FP8 GEMMs), `+w8a8int8` INT8 W8A8 (smoothed
int8 activations, int8 GEMMs; `lserve_jax.smoothquant`), `+kv8` int8 KV pages and
`+kv8e4m3` e4m3 KV pages (per-token scales; paged variants only), e.g.
`--variants sparse_kv_head+w8a8+kv8,dense_paged+w8a8+kv8,dense_cudnn+w8a8,dense_cudnn`. Each: mean step time over >= 64 synced steps after
warm-up (refresh steps included; median, min and the unsynced "pipelined" rate also recorded), and the step's bytes floor (weights + KV read + page statistics read) over the copy
bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import statistics
import time

import common  # noqa: F401
import jax
import jax.numpy as jnp

from common import (add_model_args, as_served, copy_bandwidth, environment, log, model_config, param_bytes,
                    qmatmul_order, ratio, sparse_layout, write_json)
from lserve_jax import cache as kvc
from lserve_jax.ops import REGISTRY, Kernels, OpChoice, dense_decode_attention
from lserve_jax.config import SparseConfig
from lserve_jax.engine import DEFAULT_DECODE_STEPS
from lserve_jax.heads import HeadLayout
from lserve_jax.kv8 import INT8, KV8, is_kv8, quantize_tokens
from lserve_jax.quant import FP8
from lserve_jax.smoothquant import quantize_model
from lserve_jax.model import ModelSpec, decode_forward, decode_step, refresh_due, selection_active
from lserve_jax.params import init_params
from lserve_jax.sharding import shard_cache, shard_params

BF16 = 2


FIELD_IDS = {n: i for i, n in enumerate([*kvc.LAYER_FIELDS, *kvc.SCALE_FIELDS])}


def parse_variant(name: str) -> tuple[str, str | None, object]:
    """'sparse_kv_head+w8a8+kv8' -> ('sparse_kv_head', 'fp8', int8): the base variant, the weight
    quantisation (None: bf16; +w8a8int8: 'int8') and the KV dtype (None: bf16)."""
    base, *mods = name.split("+")
    unknown = set(mods) - {"w8a8", "w8a8int8", "kv8", "kv8e4m3"}
    if unknown or ("kv8" in mods and "kv8e4m3" in mods) or ("w8a8" in mods and "w8a8int8" in mods):
        raise ValueError(f"variant {name!r}: suffixes are +w8a8 (FP8) or +w8a8int8, and +kv8 (int8) or "
                         f"+kv8e4m3: one of each")
    kv = INT8 if "kv8" in mods else FP8 if "kv8e4m3" in mods else None
    if kv is not None and base == "dense_cudnn":
        raise ValueError(f"variant {name!r}: the contiguous cuDNN baseline has no 8-bit KV")
    return base, ("fp8" if "w8a8" in mods else "int8" if "w8a8int8" in mods else None), kv


STATS_CHUNK = 2048  # pages per page-statistics computation in random_cache


def random_cache(cfg, layout, sparse, batch, ctx, extra, key, kv_dtype=None, zeros=False):
    """A paged cache holding `ctx` random tokens per sequence, with room for `extra` more: built
    by `cache.init_cache` from the cache declaration, page statistics from the random keys.
    kv_dtype int8 / e4m3: 8-bit K/V values (random) with per-token scales of 1/64. zeros: every
    value zero and no statistics computed (what fits, not what it costs: --max-batch)."""
    n = -(-(ctx + extra) // sparse.page_size)

    def fill(i, name, d, dtype):
        if zeros:
            return jnp.zeros(d.shape, dtype)
        k = jax.random.fold_in(jax.random.fold_in(key, i), FIELD_IDS[name])
        if name in kvc.SCALE_FIELDS:
            return jnp.full(d.shape, 1 / 64, dtype)
        if jnp.dtype(dtype) == jnp.dtype(INT8):
            return jax.random.randint(k, d.shape, -127, 128, jnp.int32).astype(dtype)
        if jnp.issubdtype(dtype, jnp.integer):
            return jnp.zeros(d.shape, dtype)
        return (jax.random.normal(k, d.shape, jnp.float32) * (64 if is_kv8(dtype) else 1)).astype(dtype)

    cache = kvc.init_cache(cfg, layout, sparse, batch=batch, num_pages=batch * n + 1, max_pages_per_seq=n,
                           dtype=jnp.bfloat16, fill=fill, kv_dtype=kv_dtype)
    table = jnp.arange(1, batch * n + 1, dtype=jnp.int32).reshape(batch, n)
    if zeros:
        return cache.replace(page_table=table, lengths=jnp.full((batch,), ctx, jnp.int32))
    layers = []
    scale = 1 / 64 if kv_dtype is not None else 1.0  # the statistics are of the keys the values stand for
    stats = jax.jit(lambda k: kvc.page_stats(k.astype(jnp.float32) * scale, sparse.logical_page_size))
    for lc in cache.layers:
        # a few thousand pages at a time: a whole layer in float32 (4.5 GiB at 128K x 24) does not fit
        # beside a cache sized to the device (the --max-batch runs of 2026-12-06)
        p = lc.k_pages.shape[1]
        parts = [stats(lc.k_pages[:, i:i + STATS_CHUNK]) for i in range(0, p, STATS_CHUNK)]
        k_min, k_max = (jnp.concatenate(x, axis=1) if len(parts) > 1 else x[0] for x in zip(*parts))
        layers.append(lc.replace(k_min=k_min.astype(lc.k_min.dtype), k_max=k_max.astype(lc.k_max.dtype)))
    return cache.replace(layers=tuple(layers), page_table=table, lengths=jnp.full((batch,), ctx, jnp.int32))


def dense_contiguous_step(params, kc, vc, tokens, lengths, cfg, implementation="cudnn"):
    """The dense baseline: the model's decode skeleton over contiguous [B, T, Hkv, D] caches,
    attention through cuDNN."""
    rows = jnp.arange(tokens.shape[0])

    def attend(i, q, k, v):
        k_l = kc[i].at[rows, lengths].set(k)
        v_l = vc[i].at[rows, lengths].set(v)
        return dense_decode_attention(q, k_l, v_l, lengths + 1, implementation=implementation), (k_l, v_l)

    out, kv = decode_forward(params, tokens, lengths, cfg, attend)
    return out, tuple(k for k, _ in kv), tuple(v for _, v in kv), lengths + 1


def step_times(step, state, steps, warmup, free=True):
    """First call (compile included), `warmup` more, then `steps` timed steps, each synced, then
    `steps` more unsynced (pipelined, as a server that keeps sampling on the device would run).
    The headline is the mean over the synced steps: refresh steps included at their rate."""
    t = time.perf_counter()
    jax.block_until_ready(step(state))
    first = time.perf_counter() - t
    for _ in range(warmup):
        jax.block_until_ready(step(state))
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        jax.block_until_ready(step(state))
        times.append(time.perf_counter() - t)
    t = time.perf_counter()
    out = None
    for _ in range(steps):
        out = step(state)
    jax.block_until_ready(out)
    pipelined = (time.perf_counter() - t) / steps
    if free:
        state.clear()  # free the cache before the next variant
        gc.collect()
    return {"mean_s": statistics.fmean(times), "median_s": statistics.median(times), "min_s": min(times),
            "max_s": max(times), "pipelined_s": pipelined, "steps": steps, "first_call_s": first}


def multi_step(params, cache, tokens, spec, steps):
    """`steps` greedy decode steps in one program (a fori_loop): -> (last logits, cache). What a
    step costs the host (dispatch, the command buffer's launch and updates) is paid once."""
    def body(_, carry):
        cache, tok, _ = carry
        logits, cache = decode_step(params, cache, tok, spec=spec)
        return cache, jnp.argmax(logits, -1).astype(tok.dtype), logits

    logits0 = jnp.zeros((tokens.shape[0], spec.model.vocab_size), jnp.float32)
    cache, _, logits = jax.lax.fori_loop(0, steps, body, (cache, tokens, logits0))
    return logits, cache


def paged_stepper(params, cfg, layout, sparse, batch, ctx, extra, tp=1, host_refresh=False, kernels=Kernels(),
                  kv_dtype=None, steps_per_call=1, zeros=False):
    """(step, state): one decode step per call over a random cache. The selection refresh is
    decided on the device as the engine does it, or (host_refresh) by the host, every
    `selector_interval` steps, alternating two static programs. steps_per_call > 1: that many
    greedy steps per call in one program (`multi_step`; the cache holds `extra` calls' tokens)."""
    spec = ModelSpec(cfg, layout, sparse, kernels, tp=tp)
    cache = shard_cache(random_cache(cfg, layout, sparse, batch, ctx, extra * steps_per_call, jax.random.key(3),
                                     kv_dtype, zeros=zeros), tp)
    selecting = host_refresh and selection_active(spec, cache.page_table.shape[1])
    if steps_per_call > 1:
        if host_refresh:
            raise ValueError("steps_per_call > 1 decides the refresh on the device only")
        fn = jax.jit(functools.partial(multi_step, spec=spec, steps=steps_per_call), donate_argnames=("cache",))
    else:
        fn = jax.jit(functools.partial(decode_step, spec=spec), donate_argnames=("cache",),
                     static_argnames=("refresh",))
    tokens = jnp.ones((batch,), jnp.int32)
    state = {"cache": cache, "i": 0}
    del cache

    def step(st):
        kw = {"refresh": refresh_due(spec, st["i"]) if selecting else None} if steps_per_call == 1 else {}
        logits, st["cache"] = fn(params, st["cache"], tokens, **kw)
        st["i"] += 1
        return logits

    return step, state


def per_token(times: dict, per_call: int) -> dict:
    """step_times of calls that each run `per_call` steps, as times per step (first call as is)."""
    return {k: v / per_call if k.endswith("_s") and k != "first_call_s" else v for k, v in times.items()} | {
        "steps_per_call": per_call}


def run_paged(params, cfg, layout, sparse, batch, ctx, steps, warmup, tp=1, kernels=Kernels(), kv_dtype=None,
              steps_per_call=1, zeros=False):
    step, state = paged_stepper(params, cfg, layout, sparse, batch, ctx, 2 * steps + warmup + 2, tp, kernels=kernels,
                                kv_dtype=kv_dtype, steps_per_call=steps_per_call, zeros=zeros)
    return per_token(step_times(step, state, steps, warmup), steps_per_call)


def dense_multi_step(params, kc, vc, tokens, lengths, cfg, steps, implementation="cudnn"):
    """`steps` greedy steps of the dense baseline in one program (as `multi_step`)."""
    def body(_, carry):
        kc, vc, lengths, tok, _ = carry
        logits, kc, vc, lengths = dense_contiguous_step(params, kc, vc, tok, lengths, cfg, implementation)
        return kc, vc, lengths, jnp.argmax(logits, -1).astype(tok.dtype), logits

    logits0 = jnp.zeros((tokens.shape[0], cfg.vocab_size), jnp.float32)
    kc, vc, lengths, _, logits = jax.lax.fori_loop(0, steps, body, (kc, vc, lengths, tokens, logits0))
    return logits, kc, vc, lengths


def dense_stepper(params, cfg, batch, ctx, extra, steps_per_call=1):
    """(step, state) of the dense cuDNN baseline over contiguous caches with room for `extra`
    calls (of `steps_per_call` steps each)."""
    extra *= steps_per_call
    tmax = ctx + extra + 64
    key = jax.random.key(5)
    shape = (batch, tmax, cfg.num_kv_heads, cfg.head_dim)
    kc = tuple(jax.random.normal(jax.random.fold_in(key, i), shape, jnp.bfloat16) for i in range(cfg.num_layers))
    vc = tuple(jax.random.normal(jax.random.fold_in(key, 100 + i), shape, jnp.bfloat16) for i in range(cfg.num_layers))
    fn = jax.jit(functools.partial(dense_contiguous_step, cfg=cfg) if steps_per_call == 1 else
                 functools.partial(dense_multi_step, cfg=cfg, steps=steps_per_call), donate_argnums=(1, 2))
    state = {"kc": kc, "vc": vc, "len": jnp.full((batch,), ctx, jnp.int32)}
    del kc, vc
    tokens = jnp.ones((batch,), jnp.int32)

    def step(st):
        logits, st["kc"], st["vc"], st["len"] = fn(params, st["kc"], st["vc"], tokens, st["len"])
        return logits

    return step, state


def run_dense_cudnn(params, cfg, batch, ctx, steps, warmup, steps_per_call=1):
    step, state = dense_stepper(params, cfg, batch, ctx, 2 * steps + warmup, steps_per_call)
    return per_token(step_times(step, state, steps, warmup), steps_per_call)


TUNE_CONFIGS = [  # sparse_decode kwargs tried by --tune (the first is the shipped default)
    {},
    dict(pages_per_block=4, num_warps=8),
    dict(pages_per_block=2),
    dict(pages_per_block=2, min_split_tokens=128),
    dict(pages_per_block=2, num_warps=8),
    dict(pages_per_block=2, num_stages=3),
    dict(pages_per_block=2, min_split_tokens=512, num_stages=3),
    dict(pages_per_block=1, min_split_tokens=128),
    dict(pages_per_block=1, num_stages=3),
    dict(pages_per_block=4, num_warps=8, min_split_tokens=512, num_stages=3),
]
# the dense paged path reads every page: fewer, longer splits may beat the sparse path's choice
DENSE_TUNE_CONFIGS = TUNE_CONFIGS + [
    dict(pages_per_block=2, min_split_tokens=2048, num_stages=3),
    dict(pages_per_block=2, min_split_tokens=4096, num_stages=3),
    dict(pages_per_block=2, min_split_tokens=8192, num_stages=3),
    dict(pages_per_block=2, min_split_tokens=2048, num_stages=3, num_warps=8),
    dict(pages_per_block=1, min_split_tokens=2048, num_stages=4),
    dict(pages_per_block=4, min_split_tokens=4096, num_stages=2, num_warps=8),
]


def tune_layer(cfg, layout, sparse, batch, ctx, reps=20, dense=False, kv_dtype=None, configs=None):
    """Times `sparse_decode` configs on one layer of this point (the most common retrieval
    count, kv_head selection of the full budget), `reps` dependent calls in one jit; returns
    [{options, us, rel_err}] with errors vs the reference (a config that is wrong is skipped).
    dense: the dense paged path instead (every head a retrieval head reading every page).
    kv_dtype: 8-bit pages and rings (`kv8.KV8`, per-token scales) as the `+kv8` variants read
    them: the kernel's best tiles for them need not be bf16's. configs: the Triton options tried
    (default TUNE_CONFIGS, or DENSE_TUNE_CONFIGS)."""
    from lserve_jax.ops import decode_attention

    r = cfg.num_kv_heads if dense else max(set(layout.num_retrieval), key=list(layout.num_retrieval).count)
    s, d, page = cfg.num_kv_heads - r, cfg.head_dim, sparse.page_size
    n = -(-(ctx + 1) // page)
    k_sel = n if dense else kvc.selection_width(sparse, n)
    key = jax.random.key(11)
    ks = jax.random.split(key, 6)
    pool = batch * n + 1
    kp = jax.random.normal(ks[0], (r, pool, page, d), jnp.bfloat16)
    vp = jax.random.normal(ks[1], (r, pool, page, d), jnp.bfloat16)
    rk = jax.random.normal(ks[2], (s, batch, sparse.ring_size, d), jnp.bfloat16)
    rv = jax.random.normal(ks[3], (s, batch, sparse.ring_size, d), jnp.bfloat16)
    q = jax.random.normal(ks[4], (batch, cfg.num_heads, d), jnp.bfloat16)
    table = jnp.arange(1, pool, dtype=jnp.int32).reshape(batch, n)
    lengths = jnp.full((batch,), ctx + 1, jnp.int32)
    if dense:  # every page in order, as the model's dense path passes them
        sel = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch, r, n))
    else:  # distinct pages per row, the newest first, as topk_pages makes them
        sel = jax.vmap(lambda k: jax.random.permutation(k, n - 1)[: k_sel - 1])(jax.random.split(ks[5], batch * r))
        sel = jnp.concatenate([jnp.full((batch * r, 1), n - 1), sel], axis=1).reshape(batch, r, k_sel).astype(jnp.int32)
    cnt = jnp.full((batch, r), k_sel, jnp.int32)
    if is_kv8(kv_dtype):
        kp, vp, rk, rv = (KV8(*quantize_tokens(x, kv_dtype)) for x in (kp, vp, rk, rv))
    args = (kp, vp, rk, rv, table, lengths, sel, cnt)

    def loop(opts, impl="triton"):
        choice = OpChoice.from_options(opts, impls=(impl,))

        def f(q, kp, vp, rk, rv, table, lengths, sel, cnt):
            def body(_, carry):
                qq = carry
                o = decode_attention(qq, kp, vp, rk, rv, table, lengths, sel, cnt, mode="kv_head", dense=dense,
                                     choice=choice)
                return (qq + o * 0).astype(qq.dtype)  # a dependency chain: calls run one after another
            return jax.lax.fori_loop(0, reps, body, q)
        return jax.jit(f)

    one = lambda opts, impl="triton": jax.jit(lambda *a: decode_attention(
        a[0], *a[1:], mode="kv_head", dense=dense, choice=OpChoice.from_options(opts, impls=(impl,))))
    ref = one(None, "reference")(q, *args)
    out = []
    # the dense path also times cuDNN's paged attention (decode "cudnn", first in the default order)
    configs = [(opts, "triton") for opts in (configs or (DENSE_TUNE_CONFIGS if dense else TUNE_CONFIGS))]
    for opts, impl in configs + ([(None, "cudnn")] if dense else []):
        rec = {"options": opts} if impl == "triton" else {"impl": impl}
        try:
            got = one(opts, impl)(q, *args)
            rec["rel_err"] = float(jnp.linalg.norm((got - ref).astype(jnp.float32)) /
                                   jnp.linalg.norm(ref.astype(jnp.float32)))
            f = loop(opts, impl)
            jax.block_until_ready(f(q, *args))
            ts = []
            for _ in range(5):
                t = time.perf_counter()
                jax.block_until_ready(f(q, *args))
                ts.append(time.perf_counter() - t)
            rec["us"] = min(ts) / reps * 1e6
        except Exception as e:  # a config the GPU rejects
            rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        log(f"tune{' dense' if dense else ''}{' ' + jnp.dtype(kv_dtype).name if kv_dtype is not None else ''} "
            f"ctx={ctx} B={batch} R={r}: {opts if impl == 'triton' else impl} -> "
            f"{rec.get('us', float('nan')):.1f} us "
            f"(rel err {rec.get('rel_err', float('nan')):.1e})")
        out.append(rec)
    return {"retrieval_heads": r, "kv_dtype": None if kv_dtype is None else jnp.dtype(kv_dtype).name, "configs": out}


HEADROOM = 2 << 30  # device bytes kept free for the step's activations and workspace


def seq_cache_bytes(cfg, layout, sparse, ctx, kv_dtype=None) -> tuple[int, int]:
    """(bytes of one more sequence's cache at ctx tokens, bytes of the cache's fixed part): shapes
    only, as `random_cache` would build it (pages for ctx + 64 tokens)."""
    n = -(-(ctx + 64) // sparse.page_size)

    def total(b):
        shapes = jax.eval_shape(lambda: kvc.init_cache(cfg, layout, sparse, batch=b, num_pages=b * n + 1,
                                                       max_pages_per_seq=n, dtype=jnp.bfloat16, kv_dtype=kv_dtype))
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))

    one, two = total(1), total(2)
    return two - one, 2 * one - two


def max_batch(params, cfg, layout, sparse, ctx, kernels, kv_dtype, weights_bytes, limit_bytes, tries=4):
    """The largest batch whose cache at ctx tokens fits beside the weights (and HEADROOM) in
    `limit_bytes`, confirmed by running decode steps at it (on an allocation failure, 5% fewer
    rows, up to `tries` times). Returns {max_batch, per_seq_bytes, fits, attempts}."""
    per_seq, fixed = seq_cache_bytes(cfg, layout, sparse, ctx, kv_dtype)
    b = int((limit_bytes - weights_bytes - HEADROOM - fixed) // per_seq)
    attempts = []
    for _ in range(tries):
        if b < 1:
            break
        try:
            # a zero cache: no random fill or statistics of ~100 GB per try (the 2026-12-06 H200 call
            # spent its 170 s on two tries of one variant)
            r = run_paged(params, cfg, layout, sparse, b, ctx, 4, 1, kernels=kernels, kv_dtype=kv_dtype, zeros=True)
            attempts.append({"batch": b, "ok": True, "mean_s": r["mean_s"]})
            return {"max_batch": b, "per_seq_bytes": per_seq, "fits": True, "attempts": attempts}
        except Exception as e:  # out of memory: fewer rows
            attempts.append({"batch": b, "ok": False, "error": f"{type(e).__name__}: {str(e)[:200]}"})
            gc.collect()
            b = int(b * 0.95)
    return {"max_batch": None, "per_seq_bytes": per_seq, "fits": False, "attempts": attempts}


def check_fits(cfg, layout, sparse, batch, ctx, kind, kv_dtype, live_weight_bytes, limit_bytes) -> None:
    """MemoryError naming the sizes when the variant's cache (random_cache's pages, or the cuDNN
    baseline's contiguous K/V) beside the live weights and HEADROOM exceeds the device's limit:
    a run that cannot fit is skipped at once (XLA's allocator otherwise retries for minutes)."""
    if limit_bytes is None:
        return
    if kind == "dense_cudnn":
        cache = 2 * cfg.num_layers * batch * (ctx + 64) * cfg.num_kv_heads * cfg.head_dim * BF16
    else:
        per_seq, fixed = seq_cache_bytes(cfg, layout, sparse, ctx, kv_dtype)
        cache = batch * per_seq + fixed
    need = live_weight_bytes + cache + HEADROOM
    if need > limit_bytes:
        raise MemoryError(f"does not fit: cache {cache / 2**30:.1f} GiB + weights {live_weight_bytes / 2**30:.1f} GiB "
                          f"+ headroom {HEADROOM / 2**30:.0f} GiB > the device's {limit_bytes / 2**30:.1f} GiB")


def bytes_floor(cfg, layout, sparse, batch, ctx, variant, weights, kv_dtype=None):
    """Bytes a step must read: weights + the KV it attends to + the page statistics it scores.
    8-bit KV: one byte a value plus a float32 scale per token and head."""
    d = cfg.head_dim
    per_token = d * 2 * BF16 if kv_dtype is None else (d + 4) * 2  # K and V of one token and head
    kv = stats = 0
    for r in layout.num_retrieval:
        s = cfg.num_kv_heads - r
        if variant.startswith("dense"):
            kv += cfg.num_kv_heads * ctx * per_token
            continue
        kv += r * min(sparse.token_budget, ctx) * per_token + s * min(sparse.ring_size, ctx) * per_token
        n_pages = -(-ctx // sparse.page_size)
        stats += r * n_pages * (sparse.page_size // sparse.logical_page_size) * d * 2 * BF16 / sparse.selector_interval
    return weights + batch * (kv + stats)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--points", default="131072x4,262144x1,32768x16,65536x4",
                   help="comma-separated CONTEXTxBATCH")
    p.add_argument("--variants", default="sparse_query_head,sparse_kv_head,dense_paged,dense_cudnn")
    p.add_argument("--steps", type=int, default=64, help="timed steps (a multiple of the selector interval)")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--steps-per-call", default="auto",
                   help="decode steps per call, one program (a fori_loop), for every variant: what a call costs "
                        "the host is paid once per that many tokens ('auto': the engine's decode_steps for the "
                        "platform, 4 on a GPU, 1 on a CPU); times are per step")
    p.add_argument("--max-batch", type=int, metavar="CTX",
                   help="instead of timing: the largest batch at CTX tokens whose cache fits the device beside the "
                        "weights, per paged variant (e.g. sparse_kv_head vs sparse_kv_head+kv8), confirmed by "
                        "running decode steps at it")
    p.add_argument("--tune", action="store_true",
                   help="time sparse_decode configs on one layer of each point first (the sparse path, and the "
                        "dense paged path on its own grid); the paged variants of that point then use the "
                        "fastest correct one")
    p.add_argument("--qmatmul", default="",
                   help="order of the 8-bit weight product's implementations for every variant, e.g. 'triton,xla' "
                        "(the weight-only Triton skinny GEMM, XLA's W8A8 GEMMs where it declines); default: the "
                        "registry's ('xla')")
    args = p.parse_args(argv)

    if args.qmatmul:
        order, known = tuple(x for x in args.qmatmul.split(",") if x), REGISTRY.names("qmatmul")
        unknown = [x for x in order if x not in known]
        if not order or unknown:
            p.error(f"--qmatmul: no qmatmul implementation {unknown}; there are {sorted(known)}")
        qmatmul_order(order).start()  # for the whole run
    if args.tune and jax.default_backend() != "gpu":
        p.error("--tune times the Triton decode kernel's options: it needs a GPU")
    if args.steps_per_call == "auto":
        per_call = DEFAULT_DECODE_STEPS.get(jax.default_backend(), 1)
    elif args.steps_per_call.isdigit() and int(args.steps_per_call) >= 1:
        per_call = int(args.steps_per_call)
    else:
        p.error(f"--steps-per-call takes a positive number or 'auto', got {args.steps_per_call!r}")
    try:
        variants = [(v, *parse_variant(v)) for v in args.variants.split(",") if v]  # before any run
    except ValueError as e:
        p.error(str(e))
    stats = jax.devices()[0].memory_stats() or {}
    if args.max_batch and "bytes_limit" not in stats:
        p.error("--max-batch needs a device that reports its memory (a GPU)")
    cfg = model_config(args.shape)
    env = environment()
    log("env", env)
    bw = copy_bandwidth() if jax.default_backend() == "gpu" else None
    log(f"copy bandwidth {bw / 1e12:.2f} TB/s" if bw else "copy bandwidth: not measured off GPU")
    params = as_served(init_params(cfg, jax.random.key(0), jnp.bfloat16), cfg, args.tp)
    weights = param_bytes(params)
    layout_sparse = sparse_layout(args.shape, cfg, args.sparsity, args.tp)
    params = shard_params(params, cfg, args.tp)
    quantized = {None: (params, weights)}  # weight mode -> (params, bytes), made on first use

    def weights_for(mode):
        if mode not in quantized:
            for m in [m for m in quantized if m is not None]:  # one 8-bit copy at a time beside bf16
                del quantized[m]
            gc.collect()
            qp = quantize_model(params, cfg, mode)  # int8: smoothed over random calibration ids
            quantized[mode] = (qp, param_bytes(qp))
        return quantized[mode]

    dense_layout = HeadLayout.dense(cfg.num_layers, cfg.num_kv_heads)
    base = SparseConfig()
    results = {"env": env, "shape": args.shape, "copy_bandwidth_Bps": bw, "weights_bytes": weights,
               "knobs": base.__dict__ | {"static_sparsity": args.sparsity, "tp": args.tp,
                                         "qmatmul": args.qmatmul or "default"},
               "retrieval_per_layer": list(layout_sparse.num_retrieval), "points": []}
    out_file = os.path.join(args.out, f"decode-{env['date'][:10]}.json")
    if args.max_batch:
        results["max_batch"] = []
        for name, kind, wmode, kv in variants:
            if kind == "dense_cudnn":
                continue
            p_run, w_bytes = weights_for(wmode)
            layout = dense_layout if kind == "dense_paged" else layout_sparse
            sp = SparseConfig(sparse_decode=False) if kind == "dense_paged" else \
                SparseConfig(selection_mode=kind.removeprefix("sparse_"))
            r = max_batch(p_run, cfg, layout, sp, args.max_batch, Kernels(), kv, w_bytes, stats["bytes_limit"])
            r.update(variant=name, ctx=args.max_batch, bytes_limit=stats["bytes_limit"], weights_bytes=w_bytes)
            results["max_batch"].append(r)
            log(f"max batch at {args.max_batch} tokens, {name}: {r['max_batch']} "
                f"({r['per_seq_bytes'] / 2**30:.2f} GiB a sequence)")
            write_json(out_file, results)
        print("\n| context | variant | max batch | GiB per sequence |\n|---|---|---|---|")
        for r in results["max_batch"]:
            print(f"| {r['ctx']} | {r['variant']} | {r['max_batch']} | {r['per_seq_bytes'] / 2**30:.2f} |")
        return results
    for point in args.points.split(","):
        ctx, batch = (int(x) for x in point.split("x"))
        # (dense?, KV dtype) -> Kernels: default orders and tiles unless --tune finds better options
        # for that path and page format (session 16, H200: the 128K x 4 options tuned on bf16
        # pages ran the int8-page step at 7.96 ms, slower than bf16's 6.47)
        tuned_kernels = {}
        if args.tune:
            def tuned(dense, kv):
                t = tune_layer(cfg, layout_sparse, base, batch, ctx, dense=dense, kv_dtype=kv)
                ok = [c for c in t["configs"] if "us" in c and c["rel_err"] < 2e-2 and "options" in c]
                t["chosen"] = min(ok, key=lambda c: c["us"])["options"] if ok else {}
                key = point if kv is None else f"{point}+{jnp.dtype(kv).name}"
                results.setdefault("tuning_dense" if dense else "tuning", {})[key] = t
                log(f"ctx={ctx} B={batch}: {'dense paged' if dense else 'sparse'} decode options "
                    f"{t['chosen']}{'' if kv is None else ' (' + jnp.dtype(kv).name + ' pages)'}")
                # the default order with the tuned Triton options (for the paged variants' ModelSpec,
                # whose Kernels carry it into decode_step)
                return Kernels().with_options(decode=t["chosen"])

            for dense, kv in dict.fromkeys((kind == "dense_paged", kv) for _, kind, _, kv in variants
                                           if kind != "dense_cudnn"):
                tuned_kernels[dense, kv] = tuned(dense, kv)
        for name, kind, wmode, kv in variants:
            log(f"ctx={ctx} B={batch} {name} ...")
            try:
                if (wmode or kv is not None) and args.tp > 1:
                    raise NotImplementedError("FP8 weights and 8-bit KV run on one GPU only")
                p_run, w_bytes = weights_for(wmode)
                layout = layout_sparse if kind.startswith("sparse") else dense_layout
                sp = SparseConfig(sparse_decode=False) if kind == "dense_paged" else base
                if args.tp == 1:  # the bf16 params stay alive beside an 8-bit copy
                    check_fits(cfg, layout, sp, batch, ctx, kind, kv, weights + (w_bytes if wmode else 0),
                               stats.get("bytes_limit"))
                if kind == "dense_cudnn":
                    if args.tp > 1:
                        raise NotImplementedError("the contiguous cuDNN baseline runs on one GPU only")
                    r = run_dense_cudnn(p_run, cfg, batch, ctx, args.steps, args.warmup, per_call)
                elif kind == "dense_paged":
                    r = run_paged(p_run, cfg, layout, SparseConfig(sparse_decode=False), batch, ctx,
                                  args.steps, args.warmup, args.tp, tuned_kernels.get((True, kv), Kernels()), kv,
                                  per_call)
                else:
                    mode = kind.removeprefix("sparse_")
                    r = run_paged(p_run, cfg, layout, SparseConfig(selection_mode=mode), batch, ctx,
                                  args.steps, args.warmup, args.tp, tuned_kernels.get((False, kv), Kernels()), kv,
                                  per_call)
                floor = bytes_floor(cfg, layout, base, batch, ctx, kind, w_bytes, kv)
                r["bytes_floor"] = floor
                if kind.startswith("sparse") or kind == "dense_paged":
                    r["kernel_options"] = tuned_kernels.get((kind == "dense_paged", kv), Kernels()).decode.kwargs
                if bw:
                    r["floor_s"] = floor / bw
                    r["floor_fraction"] = r["floor_s"] / r["pipelined_s"]
                    r["floor_fraction_synced"] = r["floor_s"] / r["mean_s"]
            except Exception as e:  # keep the other points
                log(f"FAILED: {type(e).__name__}: {str(e)[:300]}")
                r = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
            r.update(ctx=ctx, batch=batch, variant=name)
            results["points"].append(r)
            log(f"ctx={ctx} B={batch} {name}: {r.get('pipelined_s', float('nan')) * 1e3:.2f} ms/token pipelined, "
                f"{r.get('mean_s', float('nan')) * 1e3:.2f} synced (floor fraction {r.get('floor_fraction')})")
            write_json(out_file, results)
    results["summary"] = summarize(results["points"])
    write_json(out_file, results)
    print("\n| context | batch | variant | ms/token (pipelined) | speedup vs cuDNN | ms/token (synced) | speedup | "
          "bytes-floor fraction |\n|---|---|---|---|---|---|---|---|")
    for r in results["points"]:
        dense = next((x for x in results["points"] if (x["ctx"], x["batch"], x["variant"]) ==
                      (r["ctx"], r["batch"], "dense_cudnn")), {})
        sp = ratio(dense.get("pipelined_s"), r.get("pipelined_s"))
        sy = ratio(dense.get("mean_s"), r.get("mean_s"))
        ff = r.get("floor_fraction")
        print(f"| {r['ctx']} | {r['batch']} | {r['variant']} | {r.get('pipelined_s', float('nan')) * 1e3:.2f} | "
              f"{'' if sp is None else f'{sp:.2f}x'} | {r.get('mean_s', float('nan')) * 1e3:.2f} | "
              f"{'' if sy is None else f'{sy:.2f}x'} | {'' if ff is None else f'{ff:.0%}'} |")
    print(results["summary"])


def summarize(points):
    """Speedups of the best sparse variant over cuDNN dense per point: the headline on the
    pipelined rate (steps dispatched back to back, as the engine runs them), `_synced` on the
    mean of synced steps; the bytes-floor fraction at 128K batch 4. bf16 against bf16; with
    quantised variants also sparse W8A8+KV8 against dense bf16 cuDNN (LServe's comparison) and
    against the fastest dense variant in the same precision."""
    summary = {}
    for key, suffix in (("pipelined_s", ""), ("mean_s", "_synced")):
        t = {(r["ctx"], r["batch"], r["variant"]): r.get(key) for r in points}
        for c, b in sorted({(r["ctx"], r["batch"]) for r in points}):
            def best(prefix, mods):
                ms = [m for (cc, bb, v), m in t.items() if (cc, bb) == (c, b) and m and v.startswith(prefix)
                      and sorted(v.split("+")[1:]) == sorted(mods)]
                return min(ms) if ms else None

            at = f"{c // 1024}k_b{b}{suffix}"
            summary[f"tpot_speedup_vs_cudnn_{at}"] = ratio(t.get((c, b, "dense_cudnn")), best("sparse", []))
            eight = {w: best("sparse", [w, "kv8"]) for w in ("w8a8", "w8a8int8")}
            eight = {w: m for w, m in eight.items() if m}
            fp8 = min(eight.values()) if eight else None  # the faster W8A8 format, named in the summary
            if fp8:
                summary[f"w8a8_format_{at}"] = min(eight, key=eight.get)
                summary[f"tpot_speedup_fp8_vs_dense_bf16_{at}"] = ratio(t.get((c, b, "dense_cudnn")), fp8)
                dense_fp8 = [m for w in ("w8a8", "w8a8int8") for m in (best("dense", [w, "kv8"]), best("dense", [w])) if m]
                summary[f"tpot_speedup_fp8_vs_dense_fp8_{at}"] = ratio(min(dense_fp8) if dense_fp8 else None, fp8)
    frac = [r.get("floor_fraction") for r in points
            if r["ctx"] == 131072 and r["batch"] == 4 and r["variant"].startswith("sparse") and "+" not in r["variant"]
            and r.get("floor_fraction")]
    summary["sparse_bytes_floor_fraction_128k_b4"] = max(frac) if frac else None
    return summary


if __name__ == "__main__":
    main()
