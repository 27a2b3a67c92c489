"""Page selection: scores and top-k vs a brute-force numpy reference; the page-score kernel
(interpreted on CPU, compiled under the `gpu` marker) vs its reference."""

from __future__ import annotations

import functools

import jax
import numpy as np
import jax.numpy as jnp
import pytest

from lserve_jax.ops import OpChoice, Unsupported
from lserve_jax.ops import page_scores as ops_page_scores
from lserve_jax.pallas.page_scores import page_scores, page_scores_reference
from lserve_jax.selection import select_pages

from .kernel_base import COMPILED, GPU_MARKS, INTERPRET, gpu_only, kernel_cases, rel_err

REFERENCE = OpChoice(("reference",))


def make_stats(rng, *, b, r, g, d, page, lp, lengths, spare=2):
    """Key stats of random token keys over VALID tokens (empty logical pages: 0, as the cache)."""
    lengths = np.asarray(lengths, np.int32)
    n = -(-int(lengths.max()) // page) + spare
    p = b * n + 1
    perm = rng.permutation(np.arange(1, p))[: b * n].reshape(b, n).astype(np.int32)
    lpp = page // lp
    kmin = rng.standard_normal((r, p, lpp, d)).astype(np.float32)  # garbage for unused pages
    kmax = kmin + 1
    for bi in range(b):
        keys = rng.standard_normal((r, n * page, d)).astype(np.float32)
        for j in range(n):
            for l in range(lpp):
                lo = j * page + l * lp
                hi = min(lo + lp, int(lengths[bi]))
                if hi > lo:
                    kmin[:, perm[bi, j], l] = keys[:, lo:hi].min(axis=1)
                    kmax[:, perm[bi, j], l] = keys[:, lo:hi].max(axis=1)
                elif j * page < lengths[bi]:
                    kmin[:, perm[bi, j], l] = 0
                    kmax[:, perm[bi, j], l] = 0
    q = rng.standard_normal((b, r * g, d)).astype(np.float32)
    return q, kmin, kmax, perm, lengths


def brute_scores(q, kmin, kmax, page_table):
    """[B, R, G, N] float64: sum_i max(q_i kmax_i, q_i kmin_i), max over logical pages."""
    b, hq, d = q.shape
    r = kmin.shape[0]
    g = hq // r
    out = np.zeros((b, r, g, page_table.shape[1]))
    for bi in range(b):
        for i in range(hq):
            qi = q[bi, i].astype(np.float64)
            for j, pid in enumerate(page_table[bi]):
                s = np.maximum(qi * kmax[i // g, pid], qi * kmin[i // g, pid]).sum(-1)
                out[bi, i // g, i % g, j] = s.max()
    return out


def check_selection(sel, cnt, scores, lengths, *, page, k):
    """sel/cnt against brute-force scores [B, H, N]: validity, newest, top-k property."""
    sel, cnt = np.asarray(sel), np.asarray(cnt)
    b, h, _ = scores.shape
    assert sel.shape == (b, h, k) and cnt.shape == (b, h)
    for bi in range(b):
        nv = -(-int(lengths[bi]) // page)
        for hi in range(h):
            c = int(cnt[bi, hi])
            assert c == min(nv, k)
            chosen = sel[bi, hi, :c]
            assert len(set(chosen.tolist())) == c
            assert chosen.min() >= 0 and chosen.max() < nv
            assert nv - 1 in chosen
            assert np.all(sel[bi, hi, c:] == nv - 1)
            if nv <= k:
                assert set(chosen.tolist()) == set(range(nv))
            else:
                rest = np.setdiff1d(np.arange(nv - 1), chosen)
                picked = np.setdiff1d(chosen, [nv - 1])
                # every picked page scores at least as high as every page left out
                assert scores[bi, hi, picked].min() >= scores[bi, hi, rest].max() - 1e-4


@pytest.mark.parametrize("g", [1, 4])
def test_scores_reference_matches_brute_force(g):
    rng = np.random.default_rng(0)
    q, kmin, kmax, pt, _ = make_stats(rng, b=2, r=2, g=g, d=16, page=16, lp=4, lengths=[50, 93])
    got = page_scores_reference(jnp.asarray(q), jnp.asarray(kmin), jnp.asarray(kmax), jnp.asarray(pt))
    np.testing.assert_allclose(np.asarray(got), brute_scores(q, kmin, kmax, pt), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("runner,case", kernel_cases(
    [(g, chunk, dtype) for dtype in (jnp.float32, jnp.bfloat16) for g, chunk in [(1, 4), (8, 16)]],
    ids=lambda c: f"G{c[0]}-chunk{c[1]}-{c[2].dtype.name}"))
def test_pallas_scores_match_reference(runner, case):
    g, chunk, dtype = case
    rng = np.random.default_rng(1)
    q, kmin, kmax, pt, lengths = make_stats(rng, b=2, r=2, g=g, d=32, page=16, lp=4, lengths=[50, 130])
    c = lambda x: jnp.asarray(x, dtype)
    ref = page_scores_reference(c(q), c(kmin), c(kmax), jnp.asarray(pt))
    out = page_scores(c(q), c(kmin), c(kmax), jnp.asarray(pt), chunk=chunk, **runner.kw)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5 if dtype == jnp.float32 else 2e-2,
                               atol=1e-4 if dtype == jnp.float32 else 0.1)
    # with lengths, pages past the sequence may be skipped; valid ones must still match
    out_l = np.asarray(page_scores(c(q), c(kmin), c(kmax), jnp.asarray(pt), jnp.asarray(lengths),
                                   page_size=16, chunk=chunk, **runner.kw))
    for bi, ln in enumerate(lengths):
        nv = -(-int(ln) // 16)
        np.testing.assert_allclose(out_l[bi, ..., :nv], np.asarray(ref)[bi, ..., :nv], rtol=1e-5, atol=0.1)


@pytest.mark.parametrize("runner,impl", [(INTERPRET, "reference"), (INTERPRET, "triton"),
                                         pytest.param(COMPILED, "triton", marks=GPU_MARKS)])
@pytest.mark.parametrize("mode", ["query_head", "kv_head"])
@pytest.mark.parametrize("k", [3, 20])  # below and above the context's page count
def test_select_pages_matches_brute_force(mode, k, runner, impl):
    rng = np.random.default_rng(2)
    page, lp, g, r = 16, 4, 4, 2
    q, kmin, kmax, pt, lengths = make_stats(rng, b=3, r=r, g=g, d=16, page=page, lp=lp,
                                            lengths=[1, 70, 250])
    sel, cnt = select_pages(jnp.asarray(q), jnp.asarray(kmin), jnp.asarray(kmax), jnp.asarray(pt),
                            jnp.asarray(lengths), max_pages=k, mode=mode, page_size=page,
                            choice=runner.choice(impl))
    s = brute_scores(q, kmin, kmax, pt)  # [B, R, G, N]
    s = s.reshape(3, r * g, -1) if mode == "query_head" else s.max(axis=2)
    check_selection(sel, cnt, s, lengths, page=page, k=k)


def test_page_scores_api():
    """The ops API: the default order on CPU is the reference; the kernel refuses shapes it does
    not tile (naming why) and the default order falls through to the reference."""
    rng = np.random.default_rng(4)
    q, kmin, kmax, pt, lengths = make_stats(rng, b=2, r=2, g=2, d=16, page=16, lp=4, lengths=[20, 40])
    args = tuple(jnp.asarray(x) for x in (q, kmin, kmax, pt, lengths))
    ref = page_scores_reference(*args[:4])
    np.testing.assert_array_equal(np.asarray(ops_page_scores(*args, page_size=16)), np.asarray(ref))
    odd = (args[0], args[1][:, :, :3], args[2][:, :, :3], args[3], args[4])  # 3 logical pages per page
    with pytest.raises(Unsupported, match="power-of-2"):
        ops_page_scores(*odd, page_size=12, choice=INTERPRET.choice("triton"))
    ops_page_scores(*odd, page_size=12, choice=OpChoice(("triton", "reference"), (("interpret", True),)))
    with pytest.raises(ValueError, match="k_min"):
        ops_page_scores(args[0], args[1][:1], args[2], *args[3:], page_size=16)


def test_kv_head_sum_reduce_and_wide_budget():
    rng = np.random.default_rng(3)
    page, lp = 32, 8
    q, kmin, kmax, pt, lengths = make_stats(rng, b=2, r=1, g=8, d=16, page=page, lp=lp,
                                            lengths=[400, 129], spare=0)
    n = pt.shape[1]
    sel, cnt = select_pages(jnp.asarray(q), jnp.asarray(kmin), jnp.asarray(kmax), jnp.asarray(pt),
                            jnp.asarray(lengths), max_pages=5, mode="kv_head", group_reduce="sum",
                            page_size=page, choice=REFERENCE)
    check_selection(sel, cnt, brute_scores(q, kmin, kmax, pt).sum(axis=2), lengths, page=page, k=5)
    # a budget wider than the page table: every valid page, padded with the newest
    sel, cnt = select_pages(jnp.asarray(q), jnp.asarray(kmin), jnp.asarray(kmax), jnp.asarray(pt),
                            jnp.asarray(lengths), max_pages=n + 3, mode="kv_head", page_size=page,
                            choice=REFERENCE)
    check_selection(sel, cnt, brute_scores(q, kmin, kmax, pt).max(axis=2), lengths, page=page, k=n + 3)


def test_no_retrieval_heads_and_errors():
    q = jnp.zeros((2, 0, 16))
    stats = jnp.zeros((0, 5, 4, 16))
    sel, cnt = select_pages(q, stats, stats, jnp.zeros((2, 3), jnp.int32), jnp.ones((2,), jnp.int32),
                            max_pages=4, mode="query_head")
    assert sel.shape == (2, 0, 4) and cnt.shape == (2, 0)
    with pytest.raises(ValueError, match="mode"):
        select_pages(jnp.zeros((2, 4, 16)), jnp.zeros((2, 5, 4, 16)), jnp.zeros((2, 5, 4, 16)),
                     jnp.zeros((2, 3), jnp.int32), jnp.ones((2,), jnp.int32), max_pages=4, mode="x")
    with pytest.raises(ValueError, match="q.shape"):
        select_pages(jnp.zeros((2, 3, 16)), jnp.zeros((2, 5, 4, 16)), jnp.zeros((2, 5, 4, 16)),
                     jnp.zeros((2, 3), jnp.int32), jnp.ones((2,), jnp.int32), max_pages=4, mode="kv_head")


@gpu_only
@pytest.mark.parametrize("mode", ["query_head", "kv_head"])
def test_gpu_llama_scores_and_selection(mode):
    """llama3-8b retrieval heads (R 4, G 4, D 128, bf16), pages 64 / logical 16, an 8K context,
    a 64-page budget (moved from bench/decode_attn.py): the compiled kernel's scores match the
    jnp ones and the selections they produce overlap by more than 95%."""
    b, r, g, d, page, lp, t = 2, 4, 4, 128, 64, 16, 8192
    n = t // page
    ks = jax.random.split(jax.random.PRNGKey(1), 4)
    q = jax.random.normal(ks[0], (b, r * g, d), jnp.bfloat16)
    kmin = jax.random.normal(ks[1], (r, b * n + 1, page // lp, d), jnp.bfloat16)
    kmax = (kmin + jnp.abs(jax.random.normal(ks[2], kmin.shape, jnp.bfloat16))).astype(jnp.bfloat16)
    pt = (1 + jax.random.permutation(ks[3], b * n)).reshape(b, n).astype(jnp.int32)
    lengths = jnp.asarray([t - 5, t // 2 + 7], jnp.int32)
    out = page_scores(q, kmin, kmax, pt, interpret=False)
    assert rel_err(out, jax.jit(page_scores_reference)(q, kmin, kmax, pt)) < 1e-3
    select = lambda choice: jax.jit(functools.partial(select_pages, max_pages=64, mode=mode, page_size=page,
                                                      choice=choice))(q, kmin, kmax, pt, lengths)
    (sa, ca), (sb, cb) = select(COMPILED.choice("triton")), select(REFERENCE)
    np.testing.assert_array_equal(np.asarray(ca), np.asarray(cb))
    sa, sb, cb = np.asarray(sa), np.asarray(sb), np.asarray(cb)
    overlap = np.mean([len(set(sa[i, h, :cb[i, h]]) & set(sb[i, h, :cb[i, h]])) / max(int(cb[i, h]), 1)
                       for i in range(b) for h in range(sa.shape[1])])
    assert overlap > 0.95
