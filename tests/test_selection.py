"""Page selection: scores and top-k vs a brute-force numpy reference; Pallas scores (interpret)."""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp
import pytest

from lserve_jax.pallas.page_scores import page_scores
from lserve_jax.selection import page_scores_reference, select_pages


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


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("g,chunk", [(1, 4), (8, 16)])
def test_pallas_scores_match_reference(g, chunk, dtype):
    rng = np.random.default_rng(1)
    q, kmin, kmax, pt, lengths = make_stats(rng, b=2, r=2, g=g, d=32, page=16, lp=4, lengths=[50, 130])
    c = lambda x: jnp.asarray(x, dtype)
    ref = page_scores_reference(c(q), c(kmin), c(kmax), jnp.asarray(pt))
    out = page_scores(c(q), c(kmin), c(kmax), jnp.asarray(pt), chunk=chunk)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5 if dtype == jnp.float32 else 2e-2,
                               atol=1e-4 if dtype == jnp.float32 else 0.1)
    # with lengths, pages past the sequence may be skipped; valid ones must still match
    out_l = np.asarray(page_scores(c(q), c(kmin), c(kmax), jnp.asarray(pt), jnp.asarray(lengths),
                                   page_size=16, chunk=chunk))
    for bi, ln in enumerate(lengths):
        nv = -(-int(ln) // 16)
        np.testing.assert_allclose(out_l[bi, ..., :nv], np.asarray(ref)[bi, ..., :nv], rtol=1e-5, atol=0.1)


@pytest.mark.parametrize("impl", ["reference", "pallas"])
@pytest.mark.parametrize("mode", ["query_head", "kv_head"])
@pytest.mark.parametrize("k", [3, 20])  # below and above the context's page count
def test_select_pages_matches_brute_force(mode, k, impl):
    rng = np.random.default_rng(2)
    page, lp, g, r = 16, 4, 4, 2
    q, kmin, kmax, pt, lengths = make_stats(rng, b=3, r=r, g=g, d=16, page=page, lp=lp,
                                            lengths=[1, 70, 250])
    sel, cnt = select_pages(jnp.asarray(q), jnp.asarray(kmin), jnp.asarray(kmax), jnp.asarray(pt),
                            jnp.asarray(lengths), max_pages=k, mode=mode, page_size=page, impl=impl)
    s = brute_scores(q, kmin, kmax, pt)  # [B, R, G, N]
    s = s.reshape(3, r * g, -1) if mode == "query_head" else s.max(axis=2)
    check_selection(sel, cnt, s, lengths, page=page, k=k)


def test_kv_head_sum_reduce_and_wide_budget():
    rng = np.random.default_rng(3)
    page, lp = 32, 8
    q, kmin, kmax, pt, lengths = make_stats(rng, b=2, r=1, g=8, d=16, page=page, lp=lp,
                                            lengths=[400, 129], spare=0)
    n = pt.shape[1]
    sel, cnt = select_pages(jnp.asarray(q), jnp.asarray(kmin), jnp.asarray(kmax), jnp.asarray(pt),
                            jnp.asarray(lengths), max_pages=5, mode="kv_head", group_reduce="sum",
                            page_size=page, impl="reference")
    check_selection(sel, cnt, brute_scores(q, kmin, kmax, pt).sum(axis=2), lengths, page=page, k=5)
    # a budget wider than the page table: every valid page, padded with the newest
    sel, cnt = select_pages(jnp.asarray(q), jnp.asarray(kmin), jnp.asarray(kmax), jnp.asarray(pt),
                            jnp.asarray(lengths), max_pages=n + 3, mode="kv_head", page_size=page,
                            impl="reference")
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
