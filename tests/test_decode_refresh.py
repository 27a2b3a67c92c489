"""Reused page selections: `insert_newest` keeps the newest page in a reused selection, and a
decode loop whose refreshes are decided on the host (two static programs) equals the one that
decides them on the device (lax.cond), step for step, with selection actually dropping pages."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lserve_jax import cache as kvc
from lserve_jax.config import SparseConfig
from lserve_jax.heads import HeadLayout
from lserve_jax.ops import Kernels
from lserve_jax.model import ModelSpec, decode_step, prefill, refresh_due, selection_active
from lserve_jax.params import init_params
from lserve_jax.selection import insert_newest, topk_pages

from .tiny import tiny_config

PAGE = 16


def brute_insert(sel, cnt, lengths):
    """Numpy spec of insert_newest."""
    sel, cnt = sel.copy(), cnt.copy()
    b, h, k = sel.shape
    for bi in range(b):
        newest = max((int(lengths[bi]) - 1) // PAGE, 0)
        for hi in range(h):
            c = int(cnt[bi, hi])
            if newest in sel[bi, hi, :c]:
                continue
            if c < k:
                sel[bi, hi, c] = newest
                cnt[bi, hi] = c + 1
            else:
                opened = newest - int(sel[bi, hi, 0]) - 1
                sel[bi, hi, min(max(k - 1 - opened, min(1, k - 1)), k - 1)] = newest
    return sel, cnt


@pytest.mark.parametrize("k", [1, 2, 4, 9])
def test_insert_newest_matches_spec_and_keeps_the_newest_page(k):
    rng = np.random.default_rng(k)
    b, h, n = 3, 2, 12
    lengths = np.array([5, 60, 150], np.int32)  # 1, 4 and 10 pages
    sel, cnt = topk_pages(jnp.asarray(rng.standard_normal((b, h, n)), jnp.float32), jnp.asarray(lengths),
                          page_size=PAGE, max_pages=k)
    sel, cnt = np.asarray(sel), np.asarray(cnt)
    for step in range(40):  # appends cross several page boundaries, never refreshing
        lengths = lengths + 1
        want = brute_insert(sel, cnt, lengths)
        sel, cnt = (np.asarray(x) for x in insert_newest(jnp.asarray(sel), jnp.asarray(cnt),
                                                          jnp.asarray(lengths), page_size=PAGE))
        np.testing.assert_array_equal(sel, want[0])
        np.testing.assert_array_equal(cnt, want[1])
        for bi in range(b):
            n_valid = -(-int(lengths[bi]) // PAGE)
            for hi in range(h):
                used = sel[bi, hi, : cnt[bi, hi]]
                assert n_valid - 1 in used, (step, bi, hi)
                assert len(set(used.tolist())) == len(used)  # distinct pages
                assert used.max() < n_valid and cnt[bi, hi] == min(k, max(cnt[bi, hi], 1))
                if k > 1 and cnt[bi, hi] == k:
                    assert sel[bi, hi, 0] <= n_valid - 1  # the previous newest page is kept
            if n_valid <= k:  # the budget covers the sequence: every page is read
                assert set(sel[bi, 0, : cnt[bi, 0]].tolist()) == set(range(n_valid))


CFG = tiny_config(vocab_size=64, hidden_size=32, intermediate_size=48, head_dim=8, max_position_embeddings=256)


@pytest.mark.parametrize("mode", ["query_head", "kv_head"])
def test_host_decided_refresh_equals_device_decided(mode):
    sparse = SparseConfig(page_size=PAGE, logical_page_size=4, token_budget=48, selector_interval=3,
                          decode_sink=4, decode_local=12, prefill_sink=4, prefill_local=28, selection_mode=mode)
    layout = HeadLayout(2, (1, 1))  # one retrieval and one streaming head per layer
    spec = ModelSpec(CFG, layout, sparse, Kernels.from_names(prefill="reference", decode="reference"))
    params = init_params(CFG, jax.random.key(1), jnp.float32, scale=0.5)
    b, max_pages = 2, 8
    assert selection_active(spec, max_pages)
    lengths = np.array([45, 62], np.int32)
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (b, 64)).astype(np.int32)
    cont = np.random.default_rng(1).integers(0, CFG.vocab_size, (20, b)).astype(np.int32)

    def fresh_cache():
        cache = kvc.init_cache(CFG, layout, sparse, batch=b, num_pages=b * max_pages + 1,
                               max_pages_per_seq=max_pages, dtype=jnp.float32)
        table = np.arange(1, b * max_pages + 1, dtype=np.int32).reshape(b, max_pages)
        cache = cache.replace(page_table=jnp.asarray(table))
        return prefill(params, cache, jnp.asarray(tokens), jnp.asarray(lengths), spec)[1]

    dyn = jax.jit(functools.partial(decode_step, spec=spec))
    static = jax.jit(functools.partial(decode_step, spec=spec), static_argnames=("refresh",))
    c1 = c2 = fresh_cache()
    for step, toks in enumerate(cont):  # 20 steps: both rows open new pages in between refreshes
        l1, c1 = dyn(params, c1, jnp.asarray(toks))
        l2, c2 = static(params, c2, jnp.asarray(toks), refresh=refresh_due(spec, step))
        np.testing.assert_allclose(np.asarray(l1), np.asarray(l2), atol=1e-6, rtol=0)
        for a, z in zip(c1.layers, c2.layers):
            np.testing.assert_array_equal(np.asarray(a.sel_pages), np.asarray(z.sel_pages))
            np.testing.assert_array_equal(np.asarray(a.sel_count), np.asarray(z.sel_count))
            newest = (np.asarray(c1.lengths) - 1) // PAGE
            for bi in range(b):  # the newest page is always read
                assert np.all(np.any(np.asarray(a.sel_pages)[bi] == newest[bi], axis=-1))
    assert np.all(np.asarray(c1.step) == 20)


CFG3 = tiny_config(vocab_size=64, hidden_size=48, intermediate_size=64, num_heads=9, num_kv_heads=3,
                   max_position_embeddings=256)


@pytest.mark.parametrize("mode", ["query_head", "kv_head"])
def test_kernel_decode_equals_reference_decode(mode):
    """The decode step with the Pallas kernels (fused append, one-launch sparse attention; in
    interpret mode on CPU, compiled on a GPU) equals the jnp reference step by step, over
    refreshes, reused selections and page boundaries, with G = 3 (rows padded in the kernel)."""
    sparse = SparseConfig(page_size=PAGE, logical_page_size=4, token_budget=48, selector_interval=3,
                          decode_sink=4, decode_local=28, prefill_sink=4, prefill_local=28, selection_mode=mode)
    layout = HeadLayout(3, (1, 2))
    params = init_params(CFG3, jax.random.key(2), jnp.float32, scale=0.5)
    b, max_pages = 2, 8
    lengths = np.array([40, 61], np.int32)
    tokens = np.random.default_rng(3).integers(0, CFG3.vocab_size, (b, 64)).astype(np.int32)
    cont = np.random.default_rng(4).integers(0, CFG3.vocab_size, (12, b)).astype(np.int32)
    outs = {}
    # HIGHEST: on a GPU, f32 projections otherwise run in TF32, whose rounding turns the two
    # paths' 1e-7 attention differences into 1e-3 logit differences at some steps
    for impl in ("reference", "pallas"):
        spec = ModelSpec(CFG3, layout, sparse, Kernels.from_names(prefill="reference", decode=impl))
        cache = kvc.init_cache(CFG3, layout, sparse, batch=b, num_pages=b * max_pages + 1,
                               max_pages_per_seq=max_pages, dtype=jnp.float32)
        cache = cache.replace(page_table=jnp.asarray(np.arange(1, b * max_pages + 1, dtype=np.int32)
                                                     .reshape(b, max_pages)))
        with jax.default_matmul_precision("highest"):
            cache = prefill(params, cache, jnp.asarray(tokens), jnp.asarray(lengths), spec)[1]
            step = jax.jit(functools.partial(decode_step, spec=spec), donate_argnames=("cache",))
            logits = []
            for toks in cont:
                lg, cache = step(params, cache, jnp.asarray(toks))
                logits.append(np.asarray(lg))
        outs[impl] = (np.stack(logits), cache)
    np.testing.assert_allclose(outs["pallas"][0], outs["reference"][0], atol=2e-3, rtol=0)
    for a, z in zip(outs["pallas"][1].layers, outs["reference"][1].layers):
        np.testing.assert_array_equal(np.asarray(a.sel_pages), np.asarray(z.sel_pages))
        np.testing.assert_allclose(np.asarray(a.k_min), np.asarray(z.k_min), atol=1e-4)
        np.testing.assert_allclose(np.asarray(a.ring_v), np.asarray(z.ring_v), atol=1e-4)
