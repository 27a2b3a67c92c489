"""bfloat16 linear weights (`quant.bf16_linear`, `load(weights=...)`): what "auto" picks, the
products `models.layer.project` runs for each weight form, and models that stay close to float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lserve_jax.checkpoint import write_checkpoint
from lserve_jax.models.layer import project
from lserve_jax.model import forward_reference
from lserve_jax.quant import (BF16_MIN_ROWS, LINEAR_NAMES, Bf16Prefill, auto_weights, bf16_linear,
                              quantize_params)
from lserve_jax.sampling import SamplingParams

from .tiny import TINY, tiny_params


def _linear(params):
    return [w for lp in params.layers for n, w in lp.items() if n in LINEAR_NAMES]


def test_auto_picks_bf16_prefill_only_for_float32_weights_on_a_cpu_without_a_dtype():
    p = tiny_params(TINY)
    assert auto_weights(p, None, "cpu") == "bf16-prefill"
    assert auto_weights(p, "float32", "cpu") is None  # an explicit dtype: exact float32
    assert auto_weights(p, None, "gpu") is None
    assert auto_weights(tiny_params(TINY, dtype=jnp.bfloat16), None, "cpu") is None
    assert auto_weights(quantize_params(p, "fp8"), None, "cpu") is None


def test_bf16_linear_casts_only_the_linear_weights():
    p = tiny_params(TINY)
    b = bf16_linear(p)
    assert all(w.dtype == jnp.bfloat16 for w in _linear(b))
    assert b.embed.dtype == jnp.float32 and b.layers[0].attn_norm.dtype == jnp.float32
    both = bf16_linear(p, keep_float32=True)
    for w, w0 in zip(_linear(both), _linear(p)):
        assert isinstance(w, Bf16Prefill) and w.w is w0 and w.w16.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="already quantised"):
        bf16_linear(quantize_params(p, "fp8"))


@pytest.mark.parametrize("rows", [1, 2, BF16_MIN_ROWS - 1, BF16_MIN_ROWS, 40])
def test_project_takes_the_copy_for_many_rows_and_float32_for_few(rows):
    rng = np.random.default_rng(rows)
    x = jnp.asarray(rng.standard_normal((rows, 48)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((48, 24)), jnp.float32)
    w16 = w.astype(jnp.bfloat16)
    exact = np.asarray(x) @ np.asarray(w)
    bf = np.asarray(x.astype(jnp.bfloat16).astype(jnp.float32)) @ np.asarray(w16.astype(jnp.float32))
    got16 = np.asarray(project(x, w16))  # a bfloat16 weight: bf16 operands, float32 sums, float32 out
    assert got16.dtype == np.float32
    np.testing.assert_allclose(got16, bf, rtol=1e-5, atol=1e-5)
    got = np.asarray(project(x, Bf16Prefill(w, w16)))
    np.testing.assert_allclose(got, bf if rows >= BF16_MIN_ROWS else exact, rtol=1e-5, atol=1e-5)
    assert np.abs(bf - exact).max() > 1e-4  # the two products do differ: the choice is visible
    one = jnp.asarray(rng.standard_normal((1, 1, 48)), jnp.float32)  # one row, leading axes kept
    assert project(one, w16).shape == (1, 1, 24)


def test_bf16_models_stay_close_to_float32():
    """The reference forward (prefill-sized products) with bf16 weights and with bf16-prefill
    weights: logits within bf16's rounding of the float32 model's, the same argmax almost
    everywhere."""
    p = tiny_params(TINY, scale=0.2)
    toks = jnp.asarray(np.random.default_rng(3).integers(1, TINY.vocab_size, (1, 32)), jnp.int32)
    ref = np.asarray(forward_reference(p, toks, TINY))
    for q in (bf16_linear(p), bf16_linear(p, keep_float32=True)):
        got = np.asarray(forward_reference(q, toks, TINY))
        err = np.abs(got - ref)
        assert err.mean() < 0.02 * np.abs(ref).mean() and err.max() < 0.05 * np.abs(ref).max()
        assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def test_load_weights_choices(tmp_path):
    """load(): "auto" on this CPU gives bf16-prefill weights, dtype="float32" or "checkpoint" the
    float32 ones, "bf16" bfloat16 ones; all generate; an unknown choice is one clear error."""
    from lserve_jax.api import load

    write_checkpoint(tmp_path, tiny_params(TINY), TINY, "float32")
    kw = dict(pattern=None, max_seq_len=64, progress=False)
    auto = load(tmp_path, **kw)
    assert jax.default_backend() == "cpu" and all(isinstance(w, Bf16Prefill) for w in _linear(auto.params))
    for exact in (load(tmp_path, dtype="float32", **kw), load(tmp_path, weights="checkpoint", **kw),
                  load(tmp_path, weights=None, **kw)):
        assert all(getattr(w, "dtype", None) == jnp.float32 for w in _linear(exact.params))
    half = load(tmp_path, weights="bf16", **kw)
    assert all(w.dtype == jnp.bfloat16 for w in _linear(half.params))
    sp = SamplingParams(max_new_tokens=5, ignore_eos=True)
    for eng in (auto, half):
        assert len(eng.generate([[3, 17, 5, 9, 44, 2, 8]], sp)[0].token_ids) == 5
    with pytest.raises(ValueError, match="unknown weights 'bf8'.*bf16-prefill"):
        load(tmp_path, weights="bf8", **kw)
    with pytest.raises(ValueError, match="bf16-prefill' runs with tp=1 only"):
        load(tmp_path, weights="bf16-prefill", tp=2, **kw)
