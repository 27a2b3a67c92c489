"""Fused projections (`lserve_jax.fuse`): q/k/v and gate/up as one product each compute the same
logits as the separate weights (prefill and decode, dense and sparse layouts, q/k/v biases and
q/k norms), quantise to 8 bits within the unfused model's tolerances, leave separately smoothed
INT8 weights separate, fuse nothing twice, and stay out of tensor parallelism."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lserve_jax import cache as kvc
from lserve_jax.arrays import Arrays
from lserve_jax.checkpoint import write_checkpoint
from lserve_jax.engine import Engine
from lserve_jax.fuse import FUSED, fuse_layer, fuse_projections, is_fused
from lserve_jax.heads import HeadLayout
from lserve_jax.model import ModelSpec, decode_step, forward_reference, prefill_chunk
from lserve_jax.params import permute_kv_heads
from lserve_jax.quant import LINEAR_NAMES, FP8Linear, Int8Linear, quantize_params, weights_mode
from lserve_jax.sampling import SamplingParams
from lserve_jax.smoothquant import quantize_model

from .test_chunked_prefill import LONG, WINDOWS
from .tiny import TINY, tiny_config, tiny_params

QWEN2 = tiny_config(architecture="qwen2", attention_bias=True, max_position_embeddings=512)
QWEN3 = tiny_config(architecture="qwen3", attention_bias=True, max_position_embeddings=512)
SEPARATE = {p for parts in FUSED.values() for p in parts} | {"bq", "bk", "bv"}


def _params(cfg, scale=0.1):
    """Tiny params with random (not zero) q/k/v biases and q/k norms where the family has them."""
    p = tiny_params(cfg, scale=scale)
    key = jax.random.key(7)
    layers = []
    for i, lp in enumerate(p.layers):
        rand = {n: 1.0 + scale * jax.random.normal(jax.random.fold_in(key, 10 * i + j), lp[n].shape)
                for j, n in enumerate(("bq", "bk", "bv", "q_norm", "k_norm")) if n in lp}
        layers.append(lp.replace(**rand))
    return p.replace(layers=tuple(layers))


_prefill = jax.jit(prefill_chunk, static_argnames=("spec", "context_pages"))
_decode = jax.jit(decode_step, static_argnames=("spec",))


def _logits(params, cfg, layout, chunk=None, n=96):
    """Prefill n tokens (in chunks when `chunk`), then 3 decode steps: every logit row, float32."""
    spec = ModelSpec(cfg, layout, WINDOWS)
    c = kvc.init_cache(cfg, layout, WINDOWS, batch=1, num_pages=12, max_pages_per_seq=8, dtype=jnp.float32,
                       num_stream_pages=12)
    table = jnp.asarray(np.arange(1, 9)[None], jnp.int32)
    c = c.replace(page_table=table, stream_table=table)
    toks = np.random.default_rng(5).integers(1, cfg.vocab_size, n).astype(np.int32)
    chunk = chunk or n
    for start in range(0, n, chunk):
        ctx = None if start == 0 else -(-(start + chunk) // WINDOWS.page_size)
        lg, c = _prefill(params, c, jnp.asarray(toks[None, start:start + chunk]), jnp.asarray([start]),
                         jnp.asarray([chunk]), spec=spec, context_pages=ctx)
    outs = [lg]
    for _ in range(3):
        lg, c = _decode(params, c, jnp.argmax(lg, -1).astype(jnp.int32), spec=spec)
        outs.append(lg)
    return np.concatenate([np.asarray(o) for o in outs])


def _rel(got, ref):
    return float(np.linalg.norm(np.asarray(got) - np.asarray(ref)) / np.linalg.norm(np.asarray(ref)))


DENSE, SPARSE = HeadLayout.dense(2, 2), HeadLayout(2, (1, 0))


@pytest.mark.parametrize("cfg,layout,chunk", [(LONG, DENSE, None), (LONG, SPARSE, None), (QWEN2, DENSE, None),
                                              (QWEN2, SPARSE, None), (QWEN3, SPARSE, 32)],
                         ids=["llama-dense", "llama-sparse", "qwen2-dense", "qwen2-sparse", "qwen3-sparse-chunk32"])
def test_fused_logits_equal_the_separate_weights(cfg, layout, chunk):
    """Prefill and 3 decode steps through the paged cache, float32: the same logits to 1e-6."""
    p = _params(cfg)
    f = fuse_projections(p, cfg)
    assert is_fused(f) and not is_fused(p)
    for lp, lf in zip(p.layers, f.layers):
        assert not SEPARATE & set(lf) and set(lf) - {"wqkv", "w_gate_up", "bqkv"} == set(lp) - SEPARATE
        assert lf.wqkv.shape == (cfg.hidden_size, (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim)
        assert lf.w_gate_up.shape == (cfg.hidden_size, 2 * cfg.intermediate_size)
        assert ("bqkv" in lf) == cfg.attention_bias
    ref, got = (_logits(params, cfg, layout, chunk) for params in (p, f))
    assert _rel(got, ref) <= 1e-6


def test_fusing_twice_changes_nothing_and_what_cannot_fuse_is_kept():
    f = fuse_projections(_params(QWEN2), QWEN2)
    ff = fuse_projections(f, QWEN2)
    assert jax.tree.structure(ff) == jax.tree.structure(f)
    assert all(a is b for a, b in zip(jax.tree.leaves(ff), jax.tree.leaves(f)))
    with pytest.raises(ValueError, match="before fusing"):
        permute_kv_heads(f, QWEN2, np.array([[1, 0], [0, 1]]))
    lp = _params(QWEN2).layers[0]
    only_bq = fuse_layer(Arrays({n: w for n, w in lp.items() if n not in ("bk", "bv")}))
    assert {"wq", "wk", "wv", "bq", "w_gate_up"} <= set(only_bq) and "wqkv" not in only_bq  # a bias would be lost


def test_consume_frees_only_the_replaced_weights():
    p = jax.tree.map(jnp.array, _params(QWEN2))  # a private copy: tiny_params is cached
    f = fuse_projections(p, QWEN2, consume=True)
    assert p.layers[0].wq.is_deleted() and p.layers[1].bv.is_deleted() and p.layers[1].w_up.is_deleted()
    assert not p.layers[0].wo.is_deleted() and f.layers[0].wo is p.layers[0].wo
    assert not any(x.is_deleted() for x in jax.tree.leaves(f))


@pytest.mark.parametrize("mode,tol", [("fp8", 0.1), ("fp8-weight-only", 0.08), ("int8", 0.04)])
def test_quantised_fused_params_stay_close_to_float32(mode, tol):
    """The tolerances of test_fp8's unfused model; a fused weight is one 8-bit product."""
    cfg, p = QWEN2, _params(QWEN2, scale=0.05)
    toks = jnp.asarray(np.random.default_rng(3).integers(1, cfg.vocab_size, (2, 24)), jnp.int32)
    ref = forward_reference(p, toks, cfg)
    q = quantize_model(fuse_projections(p, cfg), cfg, mode)
    assert weights_mode(q) == mode
    kind = Int8Linear if mode == "int8" else FP8Linear
    for lq in q.layers:
        assert isinstance(lq.wqkv, kind) and isinstance(lq.w_gate_up, kind) and not SEPARATE & set(lq)
    got = forward_reference(q, toks, cfg)
    assert np.all(np.isfinite(np.asarray(got))) and _rel(got, ref) < tol
    if mode != "int8":  # per-output-channel scales: quantising then fusing is the same weights
        qf = fuse_projections(quantize_params(p, mode), cfg)
        for a, b in zip(jax.tree.leaves(qf), jax.tree.leaves(q)):
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_int8_weights_fuse_only_with_one_smoothing():
    cfg, p = TINY, _params(TINY)
    toks = jnp.asarray([[5, 6, 7, 8, 9, 10]], jnp.int32)
    smoothed = quantize_model(p, cfg, "int8")  # each weight its own smoothing: stays separate
    kept = fuse_projections(smoothed, cfg)
    assert not is_fused(kept) and all(isinstance(lp.wq, Int8Linear) for lp in kept.layers)
    plain = quantize_params(p, "int8", act_amax=[{n: None for n in LINEAR_NAMES}] * cfg.num_layers)
    fused = fuse_projections(plain, cfg)  # unsmoothed (inv_smooth all 1): one product
    assert all(isinstance(lp.wqkv, Int8Linear) for lp in fused.layers)
    np.testing.assert_allclose(np.asarray(forward_reference(fused, toks, cfg)),
                               np.asarray(forward_reference(plain, toks, cfg)), rtol=1e-5, atol=1e-5)


def test_fused_params_with_tensor_parallelism_are_refused():
    with pytest.raises(ValueError, match="tp=1 only"):
        Engine(fuse_projections(tiny_params(TINY), TINY), TINY, max_seq_len=64, tp=2)


@pytest.mark.parametrize("weights", [None, "int8"])
def test_load_fuses_and_generates(tmp_path, weights):
    """`load` fuses (tp == 1) before quantising; greedy decoding gives the reference forward's
    argmax on the engine's weights and, unquantised, the tokens of the separate weights. An INT8
    checkpoint (smoothed per weight) stays separate."""
    from lserve_jax.api import load

    cfg, p = QWEN2, _params(QWEN2, scale=0.5)
    write_checkpoint(tmp_path, p, cfg, "float32")
    engine = load(tmp_path, pattern=None, weights=weights, max_seq_len=64, progress=False)
    assert is_fused(engine.params) and weights_mode(engine.params) == weights
    prompt, sp = [3, 17, 5, 9, 44, 2, 8], SamplingParams(max_new_tokens=6)
    got = engine.generate([prompt], sp)[0].token_ids
    ref = np.asarray(forward_reference(engine.params, jnp.asarray([prompt + got[:-1]]), cfg))[0]
    assert got == [int(t) for t in np.argmax(ref, -1)[len(prompt) - 1:]]
    if weights is None:
        assert got == Engine(p, cfg, max_seq_len=64).generate([prompt], sp)[0].token_ids
        assert not is_fused(load(tmp_path, pattern=None, max_seq_len=64, progress=False, fuse=False).params)
    else:
        q_dir = tmp_path / "q"
        write_checkpoint(q_dir, quantize_model(p, cfg, weights), cfg, "float32", extra_meta={"weights": weights})
        assert not is_fused(load(q_dir, pattern=None, max_seq_len=64, progress=False).params)
