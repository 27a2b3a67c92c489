"""FP8 prefill attention (`lserve_jax.ops.attn8`): the emulation's roundings, the hybrid's
assembly (retrieval heads in FP8, streaming heads and chunks untouched), the perplexity model's
FP8 path (`calibrate.gated_attention(fp8=True)`) against it, and cuDNN's FP8 attention against
the emulation on a GPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lserve_jax.calibrate.gated import gated_attention
from lserve_jax.ops import OpChoice, Unsupported, prefill_attention
from lserve_jax.ops.attn8 import fp8_attention_emulated, incoherent_qk, per_tensor, rotation
from lserve_jax.pallas import compat
from lserve_jax.pallas.prefill import prefill_attention_reference
from lserve_jax.quant import FP8_MAX

from .kernel_base import gpu_only
from .kernel_base import rel_err as _rel


def _inputs(seed, b, t, hq, hkv, d, dtype=jnp.float32, k_scale=1.0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(kq, (b, t, hq, d), jnp.float32).astype(dtype),
            (k_scale * jax.random.normal(kk, (b, t, hkv, d), jnp.float32)).astype(dtype),
            jax.random.normal(kv, (b, t, hkv, d), jnp.float32).astype(dtype))


FP8_ALWAYS = {"fp8_min_tokens": 0}  # FP8 at any length (the default keeps short prompts in bf16)


def _attn(q, k, v, lens, impl, options=FP8_ALWAYS, **kw):
    return prefill_attention(q, k, v, lens, choice=OpChoice.from_options(options, impls=(impl,)), **kw)


@pytest.mark.parametrize("amax", [1e-3, 1.0, 300.0])
def test_per_tensor_round_trip(amax):
    x = jax.random.uniform(jax.random.key(1), (4, 64, 3, 16), jnp.float32, -amax, amax)
    x8, s = per_tensor(x)
    assert x8.dtype == jnp.float8_e4m3fn and s.shape == ()
    np.testing.assert_allclose(float(s), float(jnp.max(jnp.abs(x))) / FP8_MAX, rtol=1e-6)
    back = x8.astype(jnp.float32) * s
    # e4m3: 3 mantissa bits (relative step 2^-3, half of it by rounding) above 2^-6, then steps of 2^-9
    bound = jnp.maximum(jnp.abs(x) * 2.0 ** -4, s * 2.0 ** -10)
    assert bool(jnp.all(jnp.abs(back - x) <= bound * (1 + 1e-6)))
    assert float(jnp.max(jnp.abs(back))) == pytest.approx(float(jnp.max(jnp.abs(x))), rel=1e-6)


@pytest.mark.parametrize("d", [16, 64, 96, 128])
def test_incoherent_qk_keeps_every_softmax(d):
    """Centring K shifts each row's logits by one constant; the rotation is orthogonal."""
    r = np.asarray(rotation(d))
    np.testing.assert_allclose(r @ r.T, np.eye(d), atol=1e-5)
    q, k, _ = _inputs(7, 2, 20, 4, 2, d)
    k = k + 3.0  # an offset the centring removes
    qr, kr = incoherent_qk(q, k)
    assert float(jnp.max(jnp.abs(jnp.mean(kr, axis=(0, 1))))) < 1e-4
    logits = lambda q, k: jnp.einsum("bqhgd,bkhd->bhgqk", q.reshape(2, 20, 2, 2, d), k)  # noqa: E731
    np.testing.assert_allclose(jax.nn.softmax(logits(qr, kr) / 4, -1), jax.nn.softmax(logits(q, k) / 4, -1),
                               atol=2e-5)


def test_emulation_is_fp8_attention():
    """Close to exact attention (FP8's few percent), not equal to it; padding rows zero."""
    q, k, v = _inputs(0, 2, 80, 8, 2, 32)
    lens = jnp.array([80, 33], jnp.int32)
    exact = prefill_attention_reference(q, k, v, lens, num_retrieval=2, sink=0, local=0)
    got = fp8_attention_emulated(q, k, v, lens, 32 ** -0.5)
    err = _rel(got, exact)
    assert 1e-3 < err < 0.08
    assert bool(jnp.all(got[1, 33:] == 0))
    # the first row sees one key (probability 1, exact in e4m3 at 448): its value, rounded once
    v8, sv = per_tensor(v)
    np.testing.assert_array_equal(got[0, 0], jnp.repeat(v8[0, 0].astype(jnp.float32) * sv, 4, axis=0))


@pytest.mark.parametrize("nr", [0, 1, 3])
def test_reference8_splits_heads(nr):
    """Retrieval heads: the FP8 emulation on their slice; streaming heads: the reference, exactly."""
    b, t, hq, hkv, d = 2, 70, 8, 4, 16
    q, k, v = _inputs(2, b, t, hq, hkv, d)
    lens = jnp.array([70, 50], jnp.int32)
    kw = dict(num_retrieval=nr, sink=4, local=9)
    got = _attn(q, k, v, lens, "reference8", **kw)
    ref = prefill_attention_reference(q, k, v, lens, **kw)
    g = hq // hkv
    np.testing.assert_array_equal(got[:, :, nr * g:], ref[:, :, nr * g:])
    if nr:
        want = fp8_attention_emulated(q[:, :, :nr * g], k[:, :, :nr], v[:, :, :nr], lens, d ** -0.5)
        np.testing.assert_array_equal(got[:, :, :nr * g], want)
        assert _rel(got, ref) > 1e-3


def test_reference8_dense_and_chunk():
    q, k, v = _inputs(3, 1, 48, 4, 2, 16)
    lens = jnp.array([48], jnp.int32)
    # a window covering the sequence: every head dense, all in FP8
    got = _attn(q, k, v, lens, "reference8", num_retrieval=1, sink=4, local=64)
    np.testing.assert_array_equal(got, fp8_attention_emulated(q, k, v, lens, 0.25))
    # a chunk (q_offset): the reference's offset form, unquantised
    kw = dict(num_retrieval=1, sink=4, local=9, q_offset=jnp.array([32], jnp.int32))
    qc, lc = q[:, 32:], jnp.array([16], jnp.int32)
    np.testing.assert_array_equal(_attn(qc, k, v, lc, "reference8", **kw),
                                  prefill_attention_reference(qc, k, v, lc, **kw))


def test_short_prompts_stay_unquantised():
    """Below fp8_min_tokens (default FP8_MIN_TOKENS) the retrieval heads run unquantised."""
    from lserve_jax.ops.attn8 import FP8_MIN_TOKENS
    q, k, v = _inputs(8, 1, 40, 4, 2, 16)
    lens = jnp.array([40], jnp.int32)
    kw = dict(num_retrieval=1, sink=4, local=9)
    ref = prefill_attention_reference(q, k, v, lens, **kw)
    assert FP8_MIN_TOKENS > 40
    np.testing.assert_allclose(_attn(q, k, v, lens, "reference8", options={}, **kw), ref, atol=1e-6)
    np.testing.assert_allclose(_attn(q, k, v, lens, "reference8", options={"fp8_min_tokens": 41}, **kw), ref,
                               atol=1e-6)
    assert _rel(_attn(q, k, v, lens, "reference8", options={"fp8_min_tokens": 40}, **kw), ref) > 1e-3
    for bad in (-1, 2.5):
        with pytest.raises(ValueError, match="fp8_min_tokens"):
            _attn(q, k, v, lens, "reference8", options={"fp8_min_tokens": bad}, **kw)


@pytest.mark.parametrize("gate", [None, [True, False, True, False], [1.0, 0.0, 0.0, 1.0]], ids=str)
def test_gated_fp8_matches_reference8(gate):
    """The perplexity model's FP8 heads (gates in the original head order) equal the op's
    emulation (retrieval heads first)."""
    b, t, hq, hkv, d = 1, 96, 8, 4, 32
    q, k, v = _inputs(4, b, t, hq, hkv, d, k_scale=2.0)
    lens = jnp.array([t], jnp.int32)
    sel = np.ones(hkv, bool) if gate is None else np.asarray(gate) > 0.5
    perm = np.argsort(~sel, kind="stable")
    g = hq // hkv
    qp = q.reshape(b, t, hkv, g, d)[:, :, perm].reshape(b, t, hq, d)
    want = _attn(qp, k[:, :, perm], v[:, :, perm], lens, "reference8", num_retrieval=int(sel.sum()), sink=4, local=8)
    gate_arr = None if gate is None else jnp.asarray(gate)
    got = gated_attention(q, k, v, gate_arr, 4, 8, block=32, fp8=True)[:, :, perm].reshape(b, t, hq, d)
    np.testing.assert_allclose(got, want, atol=2e-5)
    plain = gated_attention(q, k, v, gate_arr, 4, 8, block=32)[:, :, perm].reshape(b, t, hq, d)
    assert _rel(plain, want) > 1e-3  # the flag changes what the full heads compute


@pytest.mark.skipif(compat.on_gpu(), reason="CPU dispatch")
def test_cudnn8_needs_a_gpu():
    q, k, v = _inputs(5, 1, 32, 4, 2, 16, jnp.bfloat16)
    with pytest.raises(Unsupported, match="needs a GPU"):
        _attn(q, k, v, jnp.array([32], jnp.int32), "cudnn8+triton", num_retrieval=1, sink=4, local=8)
    with pytest.raises(ValueError, match="reference8 takes only fp8_min_tokens"):
        prefill_attention(q, k, v, jnp.array([32], jnp.int32), num_retrieval=1, sink=4, local=8,
                          choice=OpChoice.from_options({"block_m": 64}, impls=("reference8",)))


@gpu_only
@pytest.mark.parametrize("t,nr,lengths", [(1024, 2, [1024]), (2048, 8, [2048]), (777, 3, [777, 500])])
def test_cudnn8_matches_emulation_gpu(t, nr, lengths):
    """cuDNN's FP8 attention against the emulation (same scales; cuDNN's running-max rounding of
    the probabilities differs) and against exact attention (FP8's error)."""
    b, hq, hkv, d = len(lengths), 32, 8, 128
    q, k, v = _inputs(6, b, t, hq, hkv, d, jnp.bfloat16)
    lens = jnp.array(lengths, jnp.int32)
    kw = dict(num_retrieval=nr, sink=64, local=256)
    got = jax.jit(lambda q, k, v, l: _attn(q, k, v, l, "cudnn8+triton", **kw))(q, k, v, lens)
    emu = _attn(*(x.astype(jnp.float32) for x in (q, k, v)), lens, "reference8", **kw)
    exact = prefill_attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)), lens, **kw)
    assert _rel(got, emu) <= 0.05
    assert _rel(got, exact) <= 0.08
    for bi, n in enumerate(lengths):
        assert bool(jnp.all(got[bi, n:] == 0))
