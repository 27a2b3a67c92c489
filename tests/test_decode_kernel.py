"""Paged sparse decode: kernel (interpreted on CPU, compiled under the `gpu` marker) vs reference
vs brute-force numpy; the ops API's implementations and validation."""

from __future__ import annotations

import functools

import jax
import numpy as np
import jax.numpy as jnp
import pytest

from lserve_jax.ops import OpChoice, Unsupported, decode_attention, dense_decode_attention
from lserve_jax.pallas.decode import (paged_decode, paged_decode_reference, sparse_decode,
                                      sparse_decode_reference)
from lserve_jax.selection import select_pages

from .kernel_base import COMPILED, GPU_MARKS, INTERPRET, gpu_only, kernel_cases, rel_err

REFERENCE = OpChoice(("reference",))


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


def layer_args(layer, sel, cnt, dtype):
    """decode_attention's positional arrays."""
    c = lambda x: jnp.asarray(x, dtype)
    return (c(layer["q"]), c(layer["k_pages"]), c(layer["v_pages"]), c(layer["ring_k"]), c(layer["ring_v"]),
            jnp.asarray(layer["page_table"]), jnp.asarray(layer["lengths"]), jnp.asarray(sel), jnp.asarray(cnt))


def run_attention(layer, sel, cnt, *, mode, choice, dtype):
    return decode_attention(*layer_args(layer, sel, cnt, dtype), mode=mode, choice=choice)


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
    ref = run_attention(layer, sel, cnt, mode=mode, choice=REFERENCE, dtype=jnp.float32)
    bf = brute_force(layer, sel, cnt, r=r, s=s, g=g, page=page, sink=sink, local=max(local, 1), mode=mode)
    assert ref.shape == layer["q"].shape
    assert rel_err(ref, bf) < 1e-5


# (mode, case, dtype) through the ops API's "triton" implementation
_ATTN_CASES = [(mode, case, dtype) for dtype in (jnp.float32, jnp.bfloat16)
               for mode, case in [("query_head", CASES[0]), ("kv_head", CASES[0]), ("kv_head", CASES[1]),
                                  ("query_head", CASES[2]), ("kv_head", CASES[3]),
                                  ("kv_head", (2, 2, 4, 16, [150, 37], 4, 8, 32))]]  # W=40: two launches


@pytest.mark.parametrize("runner,mc", kernel_cases(_ATTN_CASES, ids=lambda c: f"{c[0]}-R{c[1][0]}S{c[1][1]}-"
                                                                              f"W{c[1][6] + c[1][7]}-{c[2].dtype.name}"))
def test_triton_matches_reference(runner, mc):
    mode, case, dtype = mc
    layer, sel, cnt = case_layer(case, mode, 2)
    ref = run_attention(layer, sel, cnt, mode=mode, choice=REFERENCE, dtype=dtype)
    out = run_attention(layer, sel, cnt, mode=mode, dtype=dtype,
                        choice=runner.choice("triton", pages_per_block=2, pages_per_split=2))
    assert out.dtype == dtype and out.shape == layer["q"].shape
    assert rel_err(out, ref) < runner.tol(dtype)


@pytest.mark.parametrize("runner,impl", [(INTERPRET, "reference"), (INTERPRET, "triton"),
                                         pytest.param(COMPILED, "triton", marks=GPU_MARKS)])
@pytest.mark.parametrize("g", [1, 4])
def test_dense_paged_decode_equals_softmax_attention(runner, impl, g):
    rng = np.random.default_rng(3)
    hkv, d, page = 2, 32, 16
    layer = make_layer(rng, b=3, r=hkv, s=0, g=g, d=d, page=page, lengths=[1, 47, 96], sink=0, local=1)
    n = layer["page_table"].shape[1]
    lengths = layer["lengths"]
    for mode in ("kv_head", "query_head"):
        hsel = hkv if mode == "kv_head" else hkv * g
        sel = np.broadcast_to(np.arange(n, dtype=np.int32), (3, hsel, n))
        cnt = np.broadcast_to((-(-lengths // page))[:, None], (3, hsel)).astype(np.int32)
        out = run_attention(layer, sel, cnt, mode=mode, choice=runner.choice(impl), dtype=jnp.float32)
        t = layer["kf"].shape[1]
        with jax.default_matmul_precision("float32"):  # XLA's float32 dots on a GPU default to TF32
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
        assert rel_err(out, want) < runner.tol(jnp.float32), mode
        assert rel_err(dense, want) < 1e-5


_SWEEP = [(ppb, pps, m, off, dtype) for dtype in (jnp.float32, jnp.bfloat16)
          for ppb, pps, m, off in [(1, None, 1, 0), (2, 2, 4, 1), (4, 4, 8, 0), (2, None, 16, 0), (2, 4, 3, 2)]]


@pytest.mark.parametrize("runner,case", kernel_cases(_SWEEP, ids=lambda c: f"ppb{c[0]}-pps{c[1]}-m{c[2]}-off{c[3]}-"
                                                                           f"{c[4].dtype.name}"))
def test_kernel_sweep(runner, case):
    """The primitive alone: random (possibly repeated-page) slot lists, empty programs, splits,
    rows fewer than 16 (repeated in the kernel) or not a power of 2 (padded), a q head offset."""
    ppb, pps, m, off, dtype = case
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
    out = paged_decode(q, kp, vp, ids, lg, cnt, ln, pages_per_block=ppb, pages_per_split=pps, head_offset=off,
                       **runner.kw)
    assert out.shape == (b, h, m, d) and out.dtype == dtype
    assert np.all(np.asarray(out[0, 3], np.float32) == 0)  # count 0 -> zeros
    assert rel_err(out, ref) < runner.tol(dtype)


def test_validation_errors():
    rng = np.random.default_rng(5)
    layer = make_layer(rng, b=1, r=1, s=1, g=2, d=16, page=16, lengths=[20], sink=4, local=4)
    sel, cnt = random_selection(rng, layer["lengths"], hsel=2, k=2, page=16)
    with pytest.raises(ValueError, match="sel_pages"):
        run_attention(layer, sel, cnt, mode="kv_head", choice=REFERENCE, dtype=jnp.float32)
    with pytest.raises(ValueError, match="mode"):
        run_attention(layer, sel, cnt, mode="bogus", choice=REFERENCE, dtype=jnp.float32)
    with pytest.raises(ValueError, match="q.shape"):
        paged_decode(jnp.zeros((1, 2, 16)), jnp.zeros((1, 4, 16, 16)), jnp.zeros((1, 4, 16, 16)),
                     jnp.zeros((1, 2, 2), jnp.int32), jnp.zeros((1, 2, 2), jnp.int32),
                     jnp.zeros((1, 2), jnp.int32), jnp.zeros((1,), jnp.int32))
    # the Triton kernel refuses a head_dim that is not a multiple of 16 before tracing, naming why
    odd = make_layer(rng, b=1, r=1, s=1, g=2, d=24, page=16, lengths=[20], sink=4, local=12)
    sel, cnt = random_selection(rng, odd["lengths"], hsel=1, k=2, page=16)
    with pytest.raises(Unsupported, match="head_dim multiple of 16"):
        run_attention(odd, sel, cnt, mode="kv_head", choice=INTERPRET.choice("triton"), dtype=jnp.float32)
    # the default order still runs it (on CPU the CPU backend, equal to the reference to rounding)
    assert rel_err(run_attention(odd, sel, cnt, mode="kv_head", choice=OpChoice(), dtype=jnp.float32),
                   run_attention(odd, sel, cnt, mode="kv_head", choice=REFERENCE, dtype=jnp.float32)) < 1e-5


def test_head_dim_pieces():
    from lserve_jax.pallas.decode import _d_pieces, head_dim_supported

    assert _d_pieces(128) == ((0, 128),)
    assert _d_pieces(96) == ((0, 64), (64, 32))
    assert _d_pieces(80) == ((0, 64), (64, 16))
    assert _d_pieces(112) == ((0, 64), (64, 32), (96, 16))
    assert [d for d in range(1, 257) if head_dim_supported(d)] == list(range(16, 257, 16))


# Head dims that are not a power of 2 (read in power-of-2 pieces by the kernel), through the ops
# API's "triton": (d, dtype, mode, case). W = 40 (case 5) takes the two-launch paged_decode path.
_ODD_D = [(96, jnp.float32, "kv_head", CASES[0]), (96, jnp.bfloat16, "query_head", CASES[0]),
          (80, jnp.float32, "kv_head", (2, 2, 4, 16, [150, 37], 4, 8, 32))]
# the GPU: llama-like heads at D 96 (Hq 32 over 4 + 4 KV heads), 64-token pages, long contexts
_ODD_D_GPU = [(96, jnp.bfloat16, "kv_head", (4, 4, 4, 64, [3000, 1500], 16, 64, 256)),
              (96, jnp.bfloat16, "query_head", (4, 4, 4, 64, [3000, 1500], 16, 64, 256)),
              (80, jnp.float32, "kv_head", (2, 2, 4, 16, [1000, 37], 32, 8, 120)),
              (48, jnp.float32, "kv_head", CASES[3])]


@pytest.mark.parametrize("runner,case", kernel_cases(_ODD_D, _ODD_D_GPU, ids=lambda c: f"D{c[0]}-{c[2]}-R{c[3][0]}S{c[3][1]}-"
                                                                                 f"W{c[3][6] + c[3][7]}-{c[1].dtype.name}"))
def test_triton_odd_head_dim(runner, case):
    """D = 96, 80, 48: the Triton decode serves them (no fallback, no padded copy of the pools)."""
    d, dtype, mode, (r, s, g, page, lengths, k, sink, local) = case
    rng = np.random.default_rng(d)
    layer = make_layer(rng, b=2, r=r, s=s, g=g, d=d, page=page, lengths=lengths, sink=sink, local=local)
    hsel = r * g if mode == "query_head" else r
    sel, cnt = random_selection(rng, layer["lengths"], hsel=hsel, k=k, page=page)
    args = layer_args(layer, sel, cnt, dtype)
    ref = jax.jit(functools.partial(decode_attention, mode=mode, choice=REFERENCE))(*args)
    out = decode_attention(*args, mode=mode, choice=runner.choice("triton", pages_per_block=2))
    assert out.dtype == dtype and out.shape == layer["q"].shape
    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
    assert rel_err(out, ref) < runner.tol(dtype)


def test_impl_names_and_kernel_options():
    """Implementation names and tuning options reach the kernel through an OpChoice."""
    layer, sel, cnt = case_layer(CASES[0], "kv_head", 2)
    args = layer_args(layer, sel, cnt, jnp.float32)
    ref = decode_attention(*args, mode="kv_head", choice=REFERENCE)
    choice = OpChoice.from_name("decode", "pallas", dict(pages_per_block=2))
    out = decode_attention(*args, mode="kv_head", choice=choice)
    assert rel_err(out, ref) < 1e-5
    with pytest.raises(ValueError, match="unknown decode implementation"):
        OpChoice.from_name("decode", "mosaic")


_SPARSE_SWEEP = [(r, s, m, w, ppb, pps, dtype) for dtype in (jnp.float32, jnp.bfloat16)
                 for r, s, m, w, ppb, pps in [(2, 2, 4, 48, 2, None), (1, 3, 1, 48, 1, 2), (2, 0, 8, 32, 4, 4),
                                              (0, 2, 4, 96, None, None), (3, 1, 3, 64, 2, 2)]]


@pytest.mark.parametrize("runner,case", kernel_cases(
    _SPARSE_SWEEP, ids=lambda c: f"R{c[0]}S{c[1]}-m{c[2]}-W{c[3]}-{c[6].dtype.name}"))
def test_sparse_decode_sweep(runner, case):
    """One launch for retrieval + ring programs vs its reference: splits, rings before and after
    they fill (lengths below and above W), empty slot lists, R = 0 or S = 0, M not a power of 2."""
    r, s, m, w, ppb, pps, dtype = case
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
    out = sparse_decode(q, kp, vp, rk, rv, ids, lg, cnt, ln, pages_per_block=ppb, pages_per_split=pps, **runner.kw)
    assert out.shape == (b, hp, m, d) and out.dtype == dtype
    assert rel_err(out, ref) < runner.tol(dtype)
    if r:
        zero = np.argwhere(np.asarray(cnt) == 0)
        for bi, hi in zero:  # an empty selection reads nothing
            assert np.all(np.asarray(out[bi, hi], np.float32) == 0)


# ------------------------------------------------------------------------------------------
# GPU only (moved from bench/decode_attn.py): one llama3-8b layer (Hq 32, Hkv 8, D 128, bf16),
# R = S = 4, pages 64 / logical 16, a 64-page budget, ring 128 + 256, an 8K context.
# ------------------------------------------------------------------------------------------

_HQ, _HKV, _D, _R, _S, _PAGE, _LP, _KSEL, _W = 32, 8, 128, 4, 4, 64, 16, 64, 128 + 256


def _llama_layer(t=8192, b=2, seed=1):  # b <= 3
    """Random device-side pools for every KV head (the first R used by the sparse layer), the
    second sequence shorter (ring wrapped, pages unused)."""
    n = t // _PAGE
    p = b * n + 1
    ks = jax.random.split(jax.random.PRNGKey(seed), 8)
    kp = jax.random.normal(ks[0], (_HKV, p, _PAGE, _D), jnp.bfloat16)
    kmin = jax.random.normal(ks[6], (_R, p, _PAGE // _LP, _D), jnp.bfloat16)
    return dict(
        q=jax.random.normal(ks[1], (b, _HQ, _D), jnp.bfloat16),
        page_table=(1 + jax.random.permutation(ks[2], b * n)).reshape(b, n).astype(jnp.int32),
        lengths=jnp.asarray([t - 5, t // 2 + 7, t // 3 + 1][:b], jnp.int32),
        ring_k=jax.random.normal(ks[3], (_S, b, _W, _D), jnp.bfloat16),
        ring_v=jax.random.normal(ks[4], (_S, b, _W, _D), jnp.bfloat16),
        k_pages8=kp, v_pages8=jax.random.normal(ks[5], kp.shape, jnp.bfloat16),
        k_min=kmin, k_max=(kmin + jnp.abs(jax.random.normal(ks[7], kmin.shape, jnp.bfloat16))).astype(jnp.bfloat16))


@gpu_only
@pytest.mark.parametrize("options", [{}, dict(pages_per_split=8, pages_per_block=2),
                                     dict(pages_per_block=4, num_warps=8)], ids=str)
@pytest.mark.parametrize("mode", ["query_head", "kv_head"])
def test_gpu_sparse_layer(mode, options):
    lay = _llama_layer()
    sel, cnt = select_pages(lay["q"][:, :_R * (_HQ // _HKV)], lay["k_min"], lay["k_max"], lay["page_table"],
                            lay["lengths"], max_pages=_KSEL, mode=mode, page_size=_PAGE)
    args = (lay["q"], lay["k_pages8"][:_R], lay["v_pages8"][:_R], lay["ring_k"], lay["ring_v"], lay["page_table"],
            lay["lengths"], sel, cnt)
    run = lambda choice: jax.jit(functools.partial(decode_attention, mode=mode, choice=choice))(*args)
    out = run(COMPILED.choice("triton", **options))
    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
    assert rel_err(out, run(REFERENCE)) < COMPILED.tol(jnp.bfloat16)


@gpu_only
@pytest.mark.parametrize("options", [{}, dict(pages_per_split=16)], ids=str)
@pytest.mark.parametrize("engine", ["cudnn", "xla"])
def test_gpu_dense_paged_equals_dense(engine, options):
    """Every page of all 8 KV heads through the paged kernel = dense attention over the same
    tokens gathered into a contiguous cache."""
    lay = _llama_layer()
    b, n = lay["page_table"].shape
    sel = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, _HKV, n))
    cnt = jnp.broadcast_to(((lay["lengths"] + _PAGE - 1) // _PAGE)[:, None], (b, _HKV)).astype(jnp.int32)
    ring0 = jnp.zeros((0, b, _W, _D), jnp.bfloat16)
    out = jax.jit(functools.partial(decode_attention, mode="kv_head", choice=COMPILED.choice("triton", **options)))(
        lay["q"], lay["k_pages8"], lay["v_pages8"], ring0, ring0, lay["page_table"], lay["lengths"], sel, cnt)

    def contiguous(pages):  # [8, P, page, D] -> [B, T, 8, D]
        x = pages[:, lay["page_table"]]  # [8, B, n, page, D]
        return x.transpose(1, 2, 3, 0, 4).reshape(b, n * _PAGE, _HKV, _D)

    dense = jax.jit(functools.partial(dense_decode_attention, implementation=engine))(
        lay["q"], contiguous(lay["k_pages8"]), contiguous(lay["v_pages8"]), lay["lengths"])
    assert rel_err(out, dense) < COMPILED.tol(jnp.bfloat16)


@gpu_only
@pytest.mark.parametrize("t,b", [(8192, 2), (1024, 3)])  # t a multiple of the page: the table covers every length
def test_gpu_cudnn_paged_decode_equals_dense(t, b):
    """The dense layout's decode through cuDNN's paged attention (a pool of b*n + 1 pages, not the
    b*n its public wrapper insists on) = cuDNN over the same tokens gathered contiguously; the
    default order takes it for dense=True and falls through to Triton for a selection."""
    lay = _llama_layer(t=t, b=b)
    nb, n = lay["page_table"].shape
    sel = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (nb, _HKV, n))
    cnt = jnp.broadcast_to(((lay["lengths"] + _PAGE - 1) // _PAGE)[:, None], (nb, _HKV)).astype(jnp.int32)
    ring0 = jnp.zeros((0, nb, _W, _D), jnp.bfloat16)
    args = (lay["q"], lay["k_pages8"], lay["v_pages8"], ring0, ring0, lay["page_table"], lay["lengths"], sel, cnt)
    run = lambda choice, dense: jax.jit(functools.partial(decode_attention, mode="kv_head", dense=dense,
                                                          choice=choice))(*args)
    out = run(OpChoice(("cudnn",)), True)

    def contiguous(pages):  # [8, P, page, D] -> [B, T, 8, D]
        x = pages[:, lay["page_table"]]
        return x.transpose(1, 2, 3, 0, 4).reshape(nb, n * _PAGE, _HKV, _D)

    dense = jax.jit(functools.partial(dense_decode_attention, implementation="cudnn"))(
        lay["q"], contiguous(lay["k_pages8"]), contiguous(lay["v_pages8"]), lay["lengths"])
    assert rel_err(out, dense) < COMPILED.tol(jnp.bfloat16)
    assert rel_err(run(OpChoice(), True), dense) < COMPILED.tol(jnp.bfloat16)
    with pytest.raises(Unsupported, match="selection"):
        run(OpChoice(("cudnn",)), False)
    assert rel_err(run(OpChoice(), False), dense) < COMPILED.tol(jnp.bfloat16)  # Triton, same pages


def test_float32_blocks_fit_shared_memory_and_bf16_blocks_stay_tuned():
    """float32 pages at D 128: 128-token blocks in 2 stages asked the GPU for 270368 bytes of
    shared memory (227 KiB available), so float32 blocks shrink until num_stages blocks of K and V
    fit; 16-bit pages keep the tuned sizes."""
    from lserve_jax.pallas.decode import F32_STAGED_KV_BYTES, block_tokens

    for default in (128, 256):
        assert block_tokens(default, 128, 2, 2) == default and block_tokens(default, 128, 2, 3) == default
    assert block_tokens(128, 128, 4, 2) == 64 and block_tokens(128, 64, 4, 2) == 128
    for d in (64, 80, 96, 128, 256):
        for stages in (1, 2, 3, 4):
            t = block_tokens(256, d, 4, stages)
            assert t >= 16 and (stages * 2 * t * (1 << (d - 1).bit_length()) * 4 <= F32_STAGED_KV_BYTES or t == 16)


_COMBINE_CASES = [(b, h, s, m, d, dt) for b, h, s, m, d in [(2, 3, 1, 4, 32), (1, 2, 5, 16, 64), (3, 1, 3, 4, 128),
                                                           (1, 2, 70, 4, 32)]  # 70: the loop, past UNROLL_SPLITS
                  for dt in (jnp.float32, jnp.bfloat16)]
_COMBINE_GPU_CASES = [(4, 32, 16, 16, 128, jnp.bfloat16), (1, 8, 66, 16, 128, jnp.float32)]


@pytest.mark.parametrize("runner,case", kernel_cases(_COMBINE_CASES, _COMBINE_GPU_CASES,
                                                     ids=lambda c: "x".join(map(str, c[:5])) + jnp.dtype(c[5]).name))
def test_combine_splits_equals_the_jnp_combine(runner, case):
    """The split-K merge kernel equals `_combine` (then cast), with splits that saw no key (m at
    the running-max start, l = 0) and rows no split saw (zeros out); rows or a head_dim that are
    not a power of 2 take the jnp combine."""
    from lserve_jax.pallas.decode import _combine, combine_splits

    b, h, s, m, d, dtype = case
    rng = np.random.default_rng(b * 100 + s)
    o = rng.standard_normal((b, h, s, m, d)).astype(np.float32)
    mx = (rng.standard_normal((b, h, s, m)) * 4).astype(np.float32)
    l = rng.uniform(0.5, 3.0, (b, h, s, m)).astype(np.float32)
    empty = rng.random((b, h, s, m)) < 0.3
    mx[empty], l[empty], o[empty] = -1e30, 0.0, 0.0
    mx[0, 0, :, 0], l[0, 0, :, 0], o[0, 0, :, 0] = -1e30, 0.0, 0.0  # a row no split saw
    args = tuple(jnp.asarray(x) for x in (o, mx, l))
    got = combine_splits(*args, dtype=dtype, **runner.kw)
    want = _combine(*args).astype(dtype)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert not np.asarray(got[0, 0, 0], np.float32).any()
    tol = runner.f32_tol if dtype == jnp.float32 else runner.half_tol
    assert rel_err(got, want) < tol
    if runner.interpret:  # the fallback shapes: the jnp combine itself
        odd = combine_splits(args[0][..., : d - d // 4], *args[1:], dtype=dtype, interpret=True)
        np.testing.assert_array_equal(np.asarray(odd, np.float32),
                                      np.asarray(_combine(args[0][..., : d - d // 4], *args[1:]).astype(dtype), np.float32))


@pytest.mark.parametrize("runner", [pytest.param(INTERPRET, id="interpret"),
                                    pytest.param(COMPILED, id="gpu", marks=GPU_MARKS)])
def test_unused_slots_may_name_any_page(runner):
    """Slots past counts[b, h] are never read, whatever they hold: page ids out of the pool
    (negative, past the end) leave the output as it is (the kernel clips before gathering;
    compiled, an unclipped id would read outside the pool)."""
    rng = np.random.default_rng(5)
    b, h, m, d, p, page, n = 2, 2, 4, 64, 9, 16, 6
    q = jnp.asarray(rng.standard_normal((b, h, m, d)), jnp.float32)
    kp, vp = (jnp.asarray(rng.standard_normal((h, p, page, d)), jnp.float32) for _ in range(2))
    ids = rng.integers(0, p, (b, h, n)).astype(np.int32)
    lg = np.tile(np.arange(n, dtype=np.int32), (b, h, 1))
    cnt = jnp.asarray([[2, 6], [3, 1]], jnp.int32)
    ln = jnp.asarray([n * page, 3 * page - 5], jnp.int32)
    bad = ids.copy()
    unused = np.arange(n)[None, None, :] >= np.asarray(cnt)[:, :, None]
    bad[unused] = np.where(rng.random(unused.sum()) < 0.5, -7, p + 1000)
    kw = dict(pages_per_block=2, pages_per_split=2, **runner.kw)
    want = paged_decode(q, kp, vp, jnp.asarray(np.where(unused, 0, ids)), jnp.asarray(lg), cnt, ln, **kw)
    got = paged_decode(q, kp, vp, jnp.asarray(bad), jnp.asarray(lg), cnt, ln, **kw)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
