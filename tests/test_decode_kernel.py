"""Paged sparse decode: kernel (interpret mode on CPU) vs reference vs brute-force numpy."""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp
import pytest

from lserve_jax.attention.decode import decode_attention, dense_decode_attention
from lserve_jax.pallas.decode import paged_decode, paged_decode_reference


def rel_err(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(out - ref) / np.linalg.norm(ref)


def tol(dtype):
    return 1e-5 if dtype == jnp.float32 else 1e-2


def make_layer(rng, *, b, r, s, g, d, page, lengths, sink, local, num_pages=None):
    """A layer's cache filled from random token K/V; garbage wherever nothing was written."""
    lengths = np.asarray(lengths, np.int32)
    t = int(lengths.max())
    n = -(-t // page) + 1  # one spare table column past the longest sequence
    hkv = r + s
    kf = rng.standard_normal((b, t, hkv, d)).astype(np.float32)
    vf = rng.standard_normal((b, t, hkv, d)).astype(np.float32)
    p = num_pages or b * n + 3
    perm = rng.permutation(np.arange(1, p))[: b * n].reshape(b, n)  # page 0 is scratch
    page_table = perm.astype(np.int32)
    k_pages = rng.standard_normal((r, p, page, d)).astype(np.float32) * 3  # garbage
    v_pages = rng.standard_normal((r, p, page, d)).astype(np.float32) * 3
    for bi in range(b):
        for tok in range(lengths[bi]):
            k_pages[:, page_table[bi, tok // page], tok % page] = kf[bi, tok, :r]
            v_pages[:, page_table[bi, tok // page], tok % page] = vf[bi, tok, :r]
    w = sink + local
    ring_k = rng.standard_normal((s, b, w, d)).astype(np.float32) * 3
    ring_v = rng.standard_normal((s, b, w, d)).astype(np.float32) * 3
    for bi in range(b):
        for tok in range(lengths[bi]):
            slot = tok if tok < sink else sink + (tok - sink) % local
            ring_k[:, bi, slot] = kf[bi, tok, r:]
            ring_v[:, bi, slot] = vf[bi, tok, r:]
    q = rng.standard_normal((b, hkv * g, d)).astype(np.float32)
    return dict(q=q, kf=kf, vf=vf, k_pages=k_pages, v_pages=v_pages, ring_k=ring_k, ring_v=ring_v,
                page_table=page_table, lengths=lengths)


def random_selection(rng, lengths, *, hsel, k, page):
    b = len(lengths)
    sel = np.zeros((b, hsel, k), np.int32)
    cnt = np.zeros((b, hsel), np.int32)
    for bi in range(b):
        nv = -(-int(lengths[bi]) // page)
        for h in range(hsel):
            c = min(nv, k)
            others = rng.permutation(nv - 1)[: c - 1]
            chosen = rng.permutation(np.concatenate([others, [nv - 1]]))
            sel[bi, h, :c] = chosen
            sel[bi, h, c:] = nv - 1
            cnt[bi, h] = c
    return sel, cnt


def brute_force(layer, sel, cnt, *, r, s, g, page, sink, local, mode):
    """Attention over the explicit token set each query head may see (float64)."""
    q, kf, vf, lengths = layer["q"], layer["kf"], layer["vf"], layer["lengths"]
    b, hq, d = q.shape
    out = np.zeros((b, hq, d))
    for bi in range(b):
        ln = int(lengths[bi])
        for i in range(hq):
            kv = i // g
            if kv < r:
                hs = i if mode == "query_head" else kv
                toks = [pg * page + o for pg in sel[bi, hs, : cnt[bi, hs]] for o in range(page)]
                toks = [t for t in toks if t < ln]
            else:
                toks = [t for t in range(ln) if t < sink or t >= ln - local]
            kk = kf[bi, toks, kv].astype(np.float64)
            sc = kk @ q[bi, i].astype(np.float64) / np.sqrt(d)
            e = np.exp(sc - sc.max())
            out[bi, i] = e @ vf[bi, toks, kv] / e.sum()
    return out


def run_attention(layer, sel, cnt, *, mode, impl, dtype, **kw):
    c = lambda x: jnp.asarray(x, dtype)
    return decode_attention(
        c(layer["q"]), c(layer["k_pages"]), c(layer["v_pages"]), c(layer["ring_k"]), c(layer["ring_v"]),
        jnp.asarray(layer["page_table"]), jnp.asarray(layer["lengths"]), jnp.asarray(sel),
        jnp.asarray(cnt), mode=mode, impl=impl, **kw)


# (r, s, g, page, lengths, budget_pages, sink, local): budgets above and below the context,
# partly filled last pages, rings before and after wrap-around, R=0 and S=0.
CASES = [
    (2, 2, 4, 16, [150, 37], 4, 8, 24),  # budget < context; ring wrapped / not wrapped
    (1, 1, 8, 16, [64, 200], 16, 16, 16),  # budget > context for seq 0, full last page
    (2, 0, 1, 32, [70, 250], 3, 0, 0),  # S = 0, MHA (G = 1)
    (0, 2, 4, 16, [5, 300], 2, 32, 64),  # R = 0; ring shorter than W / wrapped
]


def case_layer(case, mode, seed):
    """A CASES entry's layer cache and a random selection for `mode`."""
    r, s, g, page, lengths, k, sink, local = case
    rng = np.random.default_rng(seed)
    layer = make_layer(rng, b=2, r=r, s=s, g=g, d=32, page=page, lengths=lengths, sink=sink,
                       local=max(local, 1))
    hsel = r * g if mode == "query_head" else r
    sel, cnt = random_selection(rng, layer["lengths"], hsel=hsel, k=k, page=page)
    return layer, sel, cnt


@pytest.mark.parametrize("mode", ["query_head", "kv_head"])
@pytest.mark.parametrize("case", CASES)
def test_reference_matches_brute_force(case, mode):
    r, s, g, page, lengths, k, sink, local = case
    layer, sel, cnt = case_layer(case, mode, 1)
    ref = run_attention(layer, sel, cnt, mode=mode, impl="reference", dtype=jnp.float32)
    bf = brute_force(layer, sel, cnt, r=r, s=s, g=g, page=page, sink=sink, local=max(local, 1), mode=mode)
    assert ref.shape == layer["q"].shape
    assert rel_err(ref, bf) < 1e-5


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("mode,case", [("query_head", CASES[0]), ("kv_head", CASES[0]),
                                       ("kv_head", CASES[1]), ("query_head", CASES[2]),
                                       ("kv_head", CASES[3]),
                                       ("kv_head", (2, 2, 4, 16, [150, 37], 4, 8, 32))])  # W=40: two launches
def test_pallas_matches_reference(case, mode, dtype):
    layer, sel, cnt = case_layer(case, mode, 2)
    ref = run_attention(layer, sel, cnt, mode=mode, impl="reference", dtype=dtype)
    out = run_attention(layer, sel, cnt, mode=mode, impl="pallas", dtype=dtype,
                        kernel_options=dict(pages_per_block=2, pages_per_split=2))
    assert out.dtype == dtype and out.shape == layer["q"].shape
    assert rel_err(out, ref) < tol(dtype)


@pytest.mark.parametrize("impl", ["reference", "pallas"])
@pytest.mark.parametrize("g", [1, 4])
def test_dense_paged_decode_equals_softmax_attention(impl, g):
    rng = np.random.default_rng(3)
    hkv, d, page = 2, 32, 16
    layer = make_layer(rng, b=3, r=hkv, s=0, g=g, d=d, page=page, lengths=[1, 47, 96], sink=0, local=1)
    n = layer["page_table"].shape[1]
    lengths = layer["lengths"]
    for mode in ("kv_head", "query_head"):
        hsel = hkv if mode == "kv_head" else hkv * g
        sel = np.broadcast_to(np.arange(n, dtype=np.int32), (3, hsel, n))
        cnt = np.broadcast_to((-(-lengths // page))[:, None], (3, hsel)).astype(np.int32)
        out = run_attention(layer, sel, cnt, mode=mode, impl=impl, dtype=jnp.float32)
        t = layer["kf"].shape[1]
        dense = dense_decode_attention(jnp.asarray(layer["q"]), jnp.asarray(layer["kf"]),
                                       jnp.asarray(layer["vf"]), jnp.asarray(lengths), implementation="xla")
        # numpy softmax over the first `length` tokens
        want = np.zeros_like(layer["q"], np.float64)
        for b in range(3):
            for i in range(hkv * g):
                kk = layer["kf"][b, : lengths[b], i // g].astype(np.float64)
                sc = kk @ layer["q"][b, i] / np.sqrt(d)
                e = np.exp(sc - sc.max())
                want[b, i] = e @ layer["vf"][b, : lengths[b], i // g] / e.sum()
        assert t == lengths.max()
        assert rel_err(out, want) < 1e-5, mode
        assert rel_err(dense, want) < 1e-5


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("ppb,pps,m,off", [(1, None, 1, 0), (2, 2, 4, 1), (4, 4, 8, 0), (2, None, 16, 0),
                                            (2, 4, 3, 2)])
def test_kernel_sweep(ppb, pps, m, off, dtype):
    """The primitive alone: random (possibly repeated-page) slot lists, empty programs, splits,
    rows fewer than 16 (repeated in the kernel) or not a power of 2 (padded), a q head offset."""
    rng = np.random.default_rng(4)
    b, h, d, hk, p, page, n = 2, 4, 64, 2, 24, 16, 9
    c = lambda x: jnp.asarray(x, dtype)
    q = c(rng.standard_normal((b, h + off, m, d)))
    kp = c(rng.standard_normal((hk, p, page, d)))
    vp = c(rng.standard_normal((hk, p, page, d)))
    ids = jnp.asarray(rng.integers(0, p, (b, h, n)), jnp.int32)
    lg = jnp.asarray(rng.permuted(np.tile(np.arange(n), (b, h, 1)), axis=-1), jnp.int32)
    cnt = jnp.asarray([[9, 5, 3, 0], [1, 9, 7, 2]], jnp.int32)
    ln = jnp.asarray([130, 71], jnp.int32)
    ref = paged_decode_reference(q, kp, vp, ids, lg, cnt, ln, head_offset=off)
    out = paged_decode(q, kp, vp, ids, lg, cnt, ln, pages_per_block=ppb, pages_per_split=pps, head_offset=off)
    assert out.shape == (b, h, m, d) and out.dtype == dtype
    assert np.all(np.asarray(out[0, 3], np.float32) == 0)  # count 0 -> zeros
    assert rel_err(out, ref) < tol(dtype)


def test_validation_errors():
    rng = np.random.default_rng(5)
    layer = make_layer(rng, b=1, r=1, s=1, g=2, d=16, page=16, lengths=[20], sink=4, local=4)
    sel, cnt = random_selection(rng, layer["lengths"], hsel=2, k=2, page=16)
    with pytest.raises(ValueError, match="sel_pages"):
        run_attention(layer, sel, cnt, mode="kv_head", impl="reference", dtype=jnp.float32)
    with pytest.raises(ValueError, match="mode"):
        run_attention(layer, sel, cnt, mode="bogus", impl="reference", dtype=jnp.float32)
    with pytest.raises(ValueError, match="q.shape"):
        paged_decode(jnp.zeros((1, 2, 16)), jnp.zeros((1, 4, 16, 16)), jnp.zeros((1, 4, 16, 16)),
                     jnp.zeros((1, 2, 2), jnp.int32), jnp.zeros((1, 2, 2), jnp.int32),
                     jnp.zeros((1, 2), jnp.int32), jnp.zeros((1,), jnp.int32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("r,s,m,w,ppb,pps", [(2, 2, 4, 48, 2, None), (1, 3, 1, 48, 1, 2), (2, 0, 8, 32, 4, 4),
                                              (0, 2, 4, 96, None, None), (3, 1, 3, 64, 2, 2)])
def test_sparse_decode_sweep(r, s, m, w, ppb, pps, dtype):
    """One launch for retrieval + ring programs vs its reference: splits, rings before and after
    they fill (lengths below and above W), empty slot lists, R = 0 or S = 0, M not a power of 2."""
    from lserve_jax.pallas.decode import sparse_decode, sparse_decode_reference

    rng = np.random.default_rng(r * 7 + s)
    b, d, p, page, n, g = 3, 32, 20, 16, 7, 2
    c = lambda x: jnp.asarray(x, dtype)
    hp = (r + s) * g
    q = c(rng.standard_normal((b, hp, m, d)))
    kp, vp = c(rng.standard_normal((r, p, page, d))), c(rng.standard_normal((r, p, page, d)))
    rk, rv = c(rng.standard_normal((s, b, w, d))), c(rng.standard_normal((s, b, w, d)))
    ids = jnp.asarray(rng.integers(0, p, (b, r * g, n)), jnp.int32)
    lg = jnp.asarray(rng.permuted(np.tile(np.arange(n), (b, r * g, 1)), axis=-1), jnp.int32)
    cnt = jnp.asarray(rng.integers(0, n + 1, (b, r * g)), jnp.int32)
    ln = jnp.asarray([100, 9, 1], jnp.int32)
    ref = sparse_decode_reference(q, kp, vp, rk, rv, ids, lg, cnt, ln)
    out = sparse_decode(q, kp, vp, rk, rv, ids, lg, cnt, ln, pages_per_block=ppb, pages_per_split=pps)
    assert out.shape == (b, hp, m, d) and out.dtype == dtype
    assert rel_err(out, ref) < tol(dtype)
    if r:
        zero = np.argwhere(np.asarray(cnt) == 0)
        for bi, hi in zero:  # an empty selection reads nothing
            assert np.all(np.asarray(out[bi, hi], np.float32) == 0)
