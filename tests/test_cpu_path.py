"""The CPU backend (lserve_jax/ops/cpu.py) equals the reference: prefill (plain and offset form)
and decode over a sweep of small shapes, float32 to 1e-5; it is first in the CPU default order.
(The model-level suites, e.g. test_model_hf and test_chunked_prefill, run through it as the CPU
default.)"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lserve_jax import ops
from lserve_jax.ops import OpChoice, Unsupported
from lserve_jax.ops.registry import REGISTRY

REF = OpChoice(("reference",))
TOL = 1e-5


def cpu(**options) -> OpChoice:
    return OpChoice.from_options(options, impls=("cpu",))


def close(out, ref, tol=TOL):
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=tol, atol=tol)


def test_cpu_first_in_the_cpu_order():
    from lserve_jax.ops import Kernels

    assert REGISTRY.default_order("prefill", "cpu")[:2] == ("cpu", "reference")
    assert REGISTRY.default_order("decode", "cpu")[:2] == ("cpu", "reference")
    assert "cpu" not in REGISTRY.default_order("prefill", "gpu")
    assert "cpu" not in REGISTRY.default_order("decode", "gpu")
    # the legacy names: append follows decode, so "cpu" must name an append too
    assert Kernels.from_names(prefill="cpu", decode="cpu").append == OpChoice(("cpu",))


# -- prefill ----------------------------------------------------------------------------------

# (B, T, Tk, Hkv, G, R, sink, local, block_q, block_k, block_k_edge): Tk None = plain form, else
# the q_offset form
PREFILL_CASES = [
    (2, 40, None, 3, 1, 1, 0, 1, 8, 16, 4),      # mixed heads, sink 0, local 1 (the diagonal), T not a block multiple
    (1, 33, None, 2, 4, 0, 3, 9, 8, 16, 4),      # streaming only, G 4, an unmasked window interior
    (2, 24, None, 2, 2, 1, 4, 64, 256, 512, 128),  # a window covering every key (dense), default blocks
    (2, 16, 48, 2, 2, 1, 3, 7, 8, 8, 4),         # offset form, mixed
    (1, 20, 37, 3, 1, 0, 0, 1, 8, 16, 8),        # offset form, streaming, sink 0 local 1
]


def _prefill_inputs(b, t, tk, hkv, g, seed):
    ks = jax.random.split(jax.random.key(seed), 3)
    tk_ = t if tk is None else tk
    q = jax.random.normal(ks[0], (b, t, hkv * g, 16), jnp.float32)
    k = jax.random.normal(ks[1], (b, tk_, hkv, 16), jnp.float32)
    v = jax.random.normal(ks[2], (b, tk_, hkv, 16), jnp.float32)
    return q, k, v


@functools.partial(jax.jit, static_argnames=("choice", "r", "sink", "local"))
def _prefill(q, k, v, lengths, q_offset, *, choice, r, sink, local):
    return ops.prefill_attention(q, k, v, lengths, num_retrieval=r, sink=sink, local=local, q_offset=q_offset,
                                 choice=choice)


@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: "x".join(map(str, c)))
def test_prefill_equals_reference(case):
    b, t, tk, hkv, g, r, sink, local, bq, bk, bke = case
    q, k, v = _prefill_inputs(b, t, tk, hkv, g, seed=sum(case[:3]) if tk else sum(case[:2]))
    rng = np.random.default_rng(t)
    lengths = jnp.asarray([t] + list(rng.integers(1, t + 1, b - 1)), jnp.int32)  # full and shorter
    if tk is None:
        off = None
    else:  # every chunk fits its keys: off + length <= Tk; one row at the end, one at 0
        off = jnp.asarray([tk - t] + list(rng.integers(0, tk - t + 1, b - 1)), jnp.int32)
    kw = dict(r=r, sink=sink, local=local)
    ref = _prefill(q, k, v, lengths, off, choice=REF, **kw)
    out = _prefill(q, k, v, lengths, off, choice=cpu(block_q=bq, block_k=bk, block_k_edge=bke), **kw)
    close(out, ref)


def test_prefill_bf16():
    q, k, v = (x.astype(jnp.bfloat16) for x in _prefill_inputs(1, 16, None, 2, 2, seed=3))
    lengths = jnp.asarray([5], jnp.int32)
    out = _prefill(q, k, v, lengths, None, choice=cpu(block_q=4, block_k=4, block_k_edge=4), r=1, sink=1, local=3)
    ref = _prefill(q, k, v, lengths, None, choice=REF, r=1, sink=1, local=3)
    assert out.dtype == jnp.bfloat16
    assert not np.any(np.asarray(out, np.float32)[:, 5:])  # rows past the length
    close(out, ref, tol=2e-2)


def test_prefill_options_and_refusals():
    q, k, v = _prefill_inputs(1, 8, None, 1, 1, seed=0)
    lengths = jnp.asarray([8], jnp.int32)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['pages'\]"):
        ops.prefill_attention(q, k, v, lengths, num_retrieval=1, sink=0, local=1, choice=cpu(pages=2))
    qi = q.astype(jnp.int32)
    with pytest.raises(Unsupported, match="float32/bfloat16"):
        ops.prefill_attention(qi, qi, qi, lengths, num_retrieval=1, sink=0, local=1, choice=cpu())


# -- decode -----------------------------------------------------------------------------------


def _decode_inputs(b, r, s, g, d, page, n, k_slots, w, lengths, mode, sel_kind, seed):
    """One layer's decode operands; sel_kind: "all" (every valid page, shuffled: the shared path),
    "some" (a subset: the per-head path), "dense" (arange over the table, kv_head mode)."""
    rng = np.random.default_rng(seed)
    ks = jax.random.split(jax.random.key(seed), 5)
    p = b * n + 1
    hq = (r + s) * g
    q = jax.random.normal(ks[0], (b, hq, d), jnp.float32)
    k_pages = jax.random.normal(ks[1], (r, p, page, d), jnp.float32)
    v_pages = jax.random.normal(ks[2], (r, p, page, d), jnp.float32)
    ring_k = jax.random.normal(ks[3], (s, b, w, d), jnp.float32)
    ring_v = jax.random.normal(ks[4], (s, b, w, d), jnp.float32)
    table = (1 + rng.permutation(b * n)).reshape(b, n).astype(np.int32)
    hsel = r * g if mode == "query_head" else r
    sel = np.zeros((b, hsel, k_slots), np.int32)
    count = np.zeros((b, hsel), np.int32)
    for i in range(b):
        nv = -(-int(lengths[i]) // page)
        for h in range(hsel):
            if sel_kind == "dense":
                sel[i, h, :] = np.arange(k_slots)
                count[i, h] = nv
                continue
            pages = rng.permutation(nv) if sel_kind == "all" else rng.permutation(nv)[: max(1, nv // 2)]
            pages = pages[:k_slots]
            sel[i, h, : len(pages)] = pages
            sel[i, h, len(pages):] = nv - 1  # unused slots: any valid index
            count[i, h] = len(pages)
    return (q, k_pages, v_pages, ring_k, ring_v, jnp.asarray(table), jnp.asarray(lengths, jnp.int32),
            jnp.asarray(sel), jnp.asarray(count))


@functools.partial(jax.jit, static_argnames=("choice", "mode"))
def _decode(*args, choice, mode):
    return ops.decode_attention(*args, mode=mode, choice=choice)


# (B, R, S, G, page, N table columns, K slots, W ring, lengths, mode, selection)
DECODE_CASES = [
    (2, 2, 1, 2, 4, 8, 8, 6, [30, 7], "query_head", "all"),    # shared path, a short row
    (2, 2, 0, 2, 4, 8, 4, 6, [30, 17], "query_head", "some"),  # a budget below the pages, no ring
    (1, 1, 2, 4, 8, 4, 4, 12, [25], "kv_head", "dense"),       # dense layer form, GQA 4, ring full
    (2, 1, 1, 1, 4, 4, 2, 8, [16, 1], "kv_head", "some"),      # kv_head selection, GQA 1, length 1
    (1, 0, 2, 2, 4, 4, 4, 8, [5], "query_head", "all"),        # streaming only, ring not full
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"{c[9]}-{c[10]}-r{c[1]}s{c[2]}g{c[3]}")
def test_decode_equals_reference(case):
    b, r, s, g, page, n, k_slots, w, lengths, mode, kind = case
    args = _decode_inputs(b, r, s, g, 16, page, n, k_slots, w, lengths, mode, kind, seed=b + r + s + n)
    ref = _decode(*args, choice=REF, mode=mode)
    out = _decode(*args, choice=cpu(), mode=mode)
    close(out, ref)


def test_decode_shared_path_only_when_every_page_is_read_once():
    """A selection that names a valid page twice (against the API's contract, but the reference
    counts it twice) must not take the shared path: the result still equals the reference."""
    args = list(_decode_inputs(1, 1, 0, 2, 16, 4, 4, 4, 4, [16], "query_head", "all", seed=5))
    sel = np.asarray(args[7]).copy()
    sel[0, 0] = [0, 1, 1, 3]  # page 2 missing, page 1 twice
    args[7] = jnp.asarray(sel)
    close(_decode(*args, choice=cpu(), mode="query_head"), _decode(*args, choice=REF, mode="query_head"))
