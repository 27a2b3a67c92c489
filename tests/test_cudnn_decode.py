"""The dense layout's decode through cuDNN's paged attention (`ops/cudnn.py`): on CPU, the
operands it hands cuDNN address exactly the tokens the reference reads, the implementation
refuses what it cannot run, and the model marks its dense decode as such. (Compiled on a GPU:
tests/test_decode_kernel.py::test_gpu_cudnn_paged_decode_equals_dense.)"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lserve_jax import cache as kvc
from lserve_jax.config import SparseConfig
from lserve_jax.heads import HeadLayout
from lserve_jax.model import ModelSpec, decode_step, prefill
from lserve_jax.ops import Kernels, OpChoice, Unsupported, decode_attention
from lserve_jax.ops import decode as ops_decode
from lserve_jax.ops.cudnn import paged_operands
from lserve_jax.params import init_params

from .kernel_base import rel_err
from .test_decode_kernel import make_layer
from .tiny import tiny_config


def cudnn_paged_semantics(query, key, value, table, kv_len, scale):
    """numpy: what cuDNN's paged attention computes for one query token per batch row: row i
    reads blocks table[i, 0, :, 0] of the [blocks, 1, block, D] pools, its first kv_len[i] keys."""
    rows, g, _, d = query.shape
    out = np.zeros((rows, g, d))
    for i in range(rows):
        ids = table[i, 0, :, 0]
        k = key[ids, 0].reshape(-1, d)[: kv_len[i]].astype(np.float64)
        v = value[ids, 0].reshape(-1, d)[: kv_len[i]].astype(np.float64)
        s = query[i, :, 0].astype(np.float64) @ k.T * scale
        e = np.exp(s - s.max(axis=-1, keepdims=True))
        out[i] = (e / e.sum(axis=-1, keepdims=True)) @ v
    return out


@pytest.mark.parametrize("g", [1, 4])
def test_paged_operands_address_the_reference_tokens(g):
    """Each (sequence, KV head) row of the cuDNN operands reads that head's pages of that
    sequence from a pool larger than B x N pages (page 0 and spares unused), with -1 table
    entries past the sequence clipped into the pool."""
    rng = np.random.default_rng(7)
    b, r, d, page = 3, 2, 32, 16
    lay = make_layer(rng, b=b, r=r, s=0, g=g, d=d, page=page, lengths=[1, 47, 96], sink=0, local=1,
                     num_pages=40)
    table = lay["page_table"].copy()
    table[0, 1:] = -1  # unused entries of a short sequence
    scale = d ** -0.5
    ops = [np.asarray(x) for x in paged_operands(jnp.asarray(lay["q"]), jnp.asarray(lay["k_pages"]),
                                                 jnp.asarray(lay["v_pages"]), jnp.asarray(table),
                                                 jnp.asarray(lay["lengths"]))]
    query, key, value, ptab, q_len, kv_len = ops
    assert query.shape == (b * r, g, 1, d) and key.shape == (r * 40, 1, page, d)
    assert ptab.shape == (b * r, 1, table.shape[1], 1) and np.all(q_len == 1)
    np.testing.assert_array_equal(kv_len, np.repeat(lay["lengths"], r))
    got = cudnn_paged_semantics(query, key, value, ptab, kv_len, scale).reshape(b, r * g, d)
    n = table.shape[1]
    sel = np.broadcast_to(np.arange(n, dtype=np.int32), (b, r, n))
    cnt = np.broadcast_to((-(-lay["lengths"] // page))[:, None], (b, r)).astype(np.int32)
    want = decode_attention(*(jnp.asarray(lay[k]) for k in ("q", "k_pages", "v_pages", "ring_k", "ring_v")),
                            jnp.asarray(lay["page_table"]), jnp.asarray(lay["lengths"]), jnp.asarray(sel),
                            jnp.asarray(cnt), mode="kv_head", dense=True, choice=OpChoice(("reference",)))
    assert rel_err(got, np.asarray(want)) < 1e-6


def test_cudnn_decode_refuses_what_it_cannot_run():
    rng = np.random.default_rng(1)
    lay = make_layer(rng, b=2, r=2, s=1, g=2, d=32, page=16, lengths=[5, 40], sink=4, local=8)
    n = lay["page_table"].shape[1]
    sel = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (2, 2, n))
    cnt = jnp.full((2, 2), n, jnp.int32)
    args = [jnp.asarray(lay[k]) for k in ("q", "k_pages", "v_pages", "ring_k", "ring_v", "page_table", "lengths")]
    run = functools.partial(decode_attention, *args, sel, cnt, mode="kv_head", choice=OpChoice(("cudnn",)))
    with pytest.raises(Unsupported, match="selection"):
        run(dense=False)
    with pytest.raises(Unsupported, match="streaming heads"):
        run(dense=True)
    no_ring = args[:3] + [args[3][:0], args[4][:0]] + args[5:]
    q2 = no_ring[0][:, :4]  # the retrieval heads' queries only
    with pytest.raises(Unsupported, match="GPU" if jax.default_backend() != "gpu" else "float32"):
        decode_attention(q2, *no_ring[1:], sel, cnt, mode="kv_head", dense=True, choice=OpChoice(("cudnn",)))


@pytest.mark.parametrize("layout,sparse_decode,want", [
    (HeadLayout(2, (2, 2)), False, [True, True]),  # dense layout: every layer dense
    (HeadLayout(2, (0, 1)), True, [True, False]),  # no retrieval head reads pages in layer 0; layer 1 selects
])
def test_decode_step_marks_dense_layers(monkeypatch, layout, sparse_decode, want):
    """decode_step passes dense=True exactly where a layer reads every page (no selection)."""
    cfg = tiny_config(vocab_size=64, hidden_size=32, intermediate_size=48, head_dim=8, max_position_embeddings=256)
    sparse = SparseConfig(page_size=16, logical_page_size=4, token_budget=32, selector_interval=2, decode_sink=4,
                          decode_local=12, prefill_sink=4, prefill_local=28, sparse_decode=sparse_decode)
    spec = ModelSpec(cfg, layout, sparse, Kernels.from_names(prefill="reference", decode="reference"))
    params = init_params(cfg, jax.random.key(0), jnp.float32, scale=0.5)
    b, max_pages = 2, 8
    cache = kvc.init_cache(cfg, layout, sparse, batch=b, num_pages=b * max_pages + 1, max_pages_per_seq=max_pages,
                           dtype=jnp.float32)
    cache = cache.replace(page_table=jnp.arange(1, b * max_pages + 1, dtype=jnp.int32).reshape(b, max_pages))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (b, 80)), jnp.int32)
    cache = prefill(params, cache, tokens, jnp.asarray([70, 80], jnp.int32), spec)[1]
    seen = []
    dispatch = ops_decode.REGISTRY.dispatch

    def spy(op, choice, *args, **kwargs):
        if op == "decode":
            seen.append(kwargs["dense"])
        return dispatch(op, choice, *args, **kwargs)

    monkeypatch.setattr(ops_decode.REGISTRY, "dispatch", spy)
    decode_step(params, cache, jnp.asarray([1, 2], jnp.int32), spec)
    assert seen == want
