"""8-bit linear weights (`lserve_jax.quant`, `lserve_jax.smoothquant`): round trips within e4m3's
and int8's error bounds, the FP8 and INT8 products equal the float32 product of the dequantised
operands, SmoothQuant smoothing keeps the function and rescues an outlier channel, a tiny model
stays within a stated tolerance of its float32 logits, checkpoints converted with --quantize load
and generate, and bad combinations fail clearly."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lserve_jax.checkpoint import META_FILE, CheckpointError, open_checkpoint, write_checkpoint
from lserve_jax.engine import Engine
from lserve_jax.heads import layout_and_permutation
from lserve_jax.model import forward_reference
from lserve_jax.params import permute_kv_heads
from lserve_jax.quant import (FP8, FP8_MAX, LINEAR_NAMES, QUANTIZED, FP8Linear, Int8Linear, dequantize_weight,
                              fp8_matmul, int8_matmul, quantize_amax, quantize_params, quantize_rows,
                              quantize_weight, quantize_weight_int8, smoothing, weights_mode)
from lserve_jax.smoothquant import activation_amax, quantize_model
from lserve_jax.sampling import SamplingParams

from .tiny import TINY, tiny_params

# e4m3 keeps 3 mantissa bits: round to nearest is within 2^-4 of a normal value; below the
# smallest normal (2^-6) the spacing is the smallest subnormal, 2^-9 (half of it: 2^-10)
REL, SUB = 2.0 ** -4, 2.0 ** -10


def _bound(x, scale):
    return np.abs(x) * REL + scale * SUB + 1e-7


@pytest.mark.parametrize("shape,spread", [((64, 96), 1.0), ((33, 7), 1e-3), ((16, 5), 1e3)])
def test_weight_round_trip_within_e4m3_error(shape, spread):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal(shape) * spread * np.exp(rng.uniform(-4, 4, shape))).astype(np.float32)
    w[:, 0] = 0.0  # an all-zero channel gets a finite scale and stays zero
    qw = quantize_weight(jnp.asarray(w))
    assert qw.w.dtype == FP8 and qw.w.shape == shape[::-1] and qw.shape == shape
    scale = np.asarray(qw.scale)
    np.testing.assert_allclose(scale[1:], np.abs(w).max(0)[1:] / FP8_MAX, rtol=1e-6)
    back = np.asarray(dequantize_weight(qw))
    assert np.all(np.isfinite(back)) and np.all(back[:, 0] == 0)
    assert np.all(np.abs(back - w) <= _bound(w, scale[None, :]))
    # each channel's largest weight is represented exactly (it maps to 448)
    j = np.argmax(np.abs(w[:, 1]))
    np.testing.assert_allclose(back[j, 1], w[j, 1], rtol=1e-6)


def test_row_quantisation_round_trip():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((3, 5, 40)) * np.exp(rng.uniform(-3, 3, (3, 5, 1)))).astype(np.float32)
    xq, s = quantize_rows(jnp.asarray(x))
    assert xq.dtype == FP8 and s.shape == (3, 5, 1)
    back = np.asarray(xq.astype(jnp.float32)) * np.asarray(s)
    assert np.all(np.abs(back - x) <= _bound(x, np.asarray(s)))


@pytest.mark.parametrize("act", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fp8_matmul_is_the_product_of_the_dequantised_operands(act, dtype):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 7, 48)), dtype)
    w = jnp.asarray(rng.standard_normal((48, 24)), jnp.float32)
    qw = quantize_weight(w, quantize_activations=act)
    got = np.asarray(fp8_matmul(x, qw))
    wd = np.asarray(dequantize_weight(qw), np.float64)
    if act:
        xq, s = quantize_rows(x)
        xd = np.asarray(xq.astype(jnp.float32), np.float64) * np.asarray(s, np.float64)
    else:
        xd = np.asarray(x.astype(jnp.float32), np.float64)
    np.testing.assert_allclose(got, xd @ wd, rtol=2e-5, atol=2e-5)
    # and close to the exact product, within FP8's error
    exact = np.asarray(x.astype(jnp.float32), np.float64) @ np.asarray(w, np.float64)
    rel = np.linalg.norm(got - exact) / np.linalg.norm(exact)
    assert rel < (0.06 if act else 0.04), rel


def test_quantize_params_touches_only_the_linear_weights():
    p = tiny_params(TINY)
    q = quantize_params(p, "fp8")
    assert weights_mode(q) == "fp8" and weights_mode(quantize_params(p, "fp8-weight-only")) == "fp8-weight-only"
    assert weights_mode(p) is None
    for lp, lq in zip(p.layers, q.layers):
        for name, w in lq.items():
            if name in LINEAR_NAMES:
                assert isinstance(w, FP8Linear) and w.shape == lp[name].shape
            else:
                assert w is lp[name]
    assert q.embed is p.embed and q.final_norm is p.final_norm
    with pytest.raises(ValueError, match="already"):
        quantize_params(q, "fp8")
    with pytest.raises(ValueError, match="unknown weight quantisation"):
        quantize_params(p, "int4")
    with pytest.raises(ValueError, match="channel maxima"):
        quantize_params(p, "int8")  # int8 needs calibration
    q8 = quantize_model(p, TINY, "int8")  # random calibration ids without a tokenizer
    assert weights_mode(q8) == "int8"
    for lp, lq in zip(p.layers, q8.layers):
        for name, w in lq.items():
            if name in LINEAR_NAMES:
                assert isinstance(w, Int8Linear) and w.shape == lp[name].shape and w.w.dtype == jnp.int8
                assert w.inv_smooth.shape == (lp[name].shape[0],)
    with pytest.raises(ValueError, match=r"already quantised \(int8\)"):
        quantize_params(q8, "fp8")


@pytest.mark.parametrize("mode,tol", [("fp8", 0.1), ("fp8-weight-only", 0.08), ("int8", 0.04)])
def test_tiny_model_logits_within_tolerance(mode, tol):
    """Stated tolerance: the logits' relative L2 error against float32 stays below `tol` on the
    tiny model with random N(0, 0.05) weights (measured 0.061 W8A8 FP8, 0.049 W8A16, 0.017 W8A8
    INT8: each product carries the format's rounding and random weights pass it on undamped; real
    models lose far less, see the perplexity rows in BENCHMARKS.md)."""
    cfg, p = TINY, tiny_params(TINY, scale=0.05)
    toks = jnp.asarray(np.random.default_rng(3).integers(1, cfg.vocab_size, (2, 24)), jnp.int32)
    ref = np.asarray(forward_reference(p, toks, cfg))
    got = np.asarray(forward_reference(quantize_model(p, cfg, mode), toks, cfg))
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert np.all(np.isfinite(got)) and rel < tol, rel


@pytest.mark.parametrize("mode", ["fp8", "int8"])
def test_engine_with_8bit_weights_equals_the_reference_forward(mode):
    """Greedy decoding through the engine (paged cache, prefill + decode programs) with 8-bit
    weights gives the reference forward's argmax at every step, on the same 8-bit weights."""
    cfg = TINY
    q = quantize_model(tiny_params(cfg), cfg, mode)
    prompt = [3, 17, 5, 9, 44, 2, 8]
    out = Engine(q, cfg, max_seq_len=64).generate([prompt], SamplingParams(max_new_tokens=6))[0].token_ids
    ref = np.asarray(forward_reference(q, jnp.asarray([prompt + out[:-1]]), cfg))[0]  # teacher-forced
    assert out == [int(t) for t in np.argmax(ref, -1)[len(prompt) - 1:]]


@pytest.mark.parametrize("mode", ["fp8", "int8"])
def test_permuting_heads_of_8bit_weights_keeps_the_function(mode):
    cfg = TINY
    q = quantize_model(tiny_params(cfg), cfg, mode)
    retrieval = np.array([[False, True], [True, False]])
    _, perms = layout_and_permutation(retrieval)
    assert np.any(perms != np.arange(cfg.num_kv_heads))
    toks = jnp.asarray([[5, 6, 7, 8, 9, 10]], jnp.int32)
    a = np.asarray(forward_reference(q, toks, cfg))
    b = np.asarray(forward_reference(permute_kv_heads(q, cfg, perms), toks, cfg))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["fp8", "int8"])
def test_8bit_checkpoint_round_trip_and_generation(tmp_path, mode):
    cfg = TINY
    q = quantize_model(tiny_params(cfg), cfg, mode)
    write_checkpoint(tmp_path, q, cfg, "float32", extra_meta={"weights": mode})
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.weights == mode
    got = ckpt.load_params()
    assert jax.tree.structure(got) == jax.tree.structure(q)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(q)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))
    half = ckpt.load_params("bfloat16")  # the cast leaves the 8-bit weights and scales alone
    assert half.embed.dtype == jnp.bfloat16 and half.layers[0].wq.w.dtype == (FP8 if mode == "fp8" else jnp.int8)
    assert half.layers[0].wq.scale.dtype == jnp.float32
    out = Engine(got, cfg, max_seq_len=64).generate([[1, 2, 3]], SamplingParams(max_new_tokens=4))[0]
    assert len(out.token_ids) == 4


def test_unknown_weights_in_a_checkpoint_is_refused(tmp_path):
    cfg = TINY
    write_checkpoint(tmp_path, tiny_params(cfg), cfg, "float32")
    meta = json.loads((tmp_path / META_FILE).read_text())
    (tmp_path / META_FILE).write_text(json.dumps({**meta, "weights": "int3"}))
    with pytest.raises(CheckpointError, match="unknown weights 'int3'"):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize("mode", ["fp8", "int8"])
def test_8bit_weights_with_tensor_parallelism_are_refused(mode):
    with pytest.raises(ValueError, match="tp=1 only"):
        Engine(quantize_model(tiny_params(TINY), TINY, mode), TINY, max_seq_len=64, tp=2)


def test_convert_quantize_fp8_loads_and_generates(tmp_path):
    """python -m convert <hf dir> <dest> --quantize fp8, then load and generate through the API."""
    from lserve_jax.api import load
    from lserve_jax.convert.cli import main as convert_main

    from .hf_models import make_hf_model

    src, dest = tmp_path / "hf", tmp_path / "ckpt"
    make_hf_model("llama3", src)
    assert convert_main([str(src), str(dest), "--dtype", "float32", "--quantize", "fp8", "--quiet"]) == 0
    ckpt = open_checkpoint(dest)
    assert ckpt.weights == "fp8"
    eng = load(dest, pattern=None, max_seq_len=64, progress=False)
    assert weights_mode(eng.params) == "fp8"
    assert len(eng.generate([[1, 2, 3, 4]], SamplingParams(max_new_tokens=3))[0].token_ids) == 3
    # a float32 checkpoint quantised on load gives the same weights as one converted with --quantize
    plain = tmp_path / "plain"
    assert convert_main([str(src), str(plain), "--dtype", "float32", "--quiet"]) == 0
    eng2 = load(plain, pattern=None, max_seq_len=64, progress=False, weights="fp8")
    for a, b in zip(jax.tree.leaves(eng.params), jax.tree.leaves(eng2.params)):
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))
    with pytest.raises(ValueError, match="unknown weights 'fp4'; choose from auto, checkpoint, bf16"):
        load(plain, pattern=None, max_seq_len=64, progress=False, weights="fp4")
    with pytest.raises(SystemExit) as e:  # argparse's usage error
        convert_main([str(src), str(tmp_path / "bad"), "--quantize", "int4", "--quiet"])
    assert e.value.code == 2
    assert not (tmp_path / "bad").exists()


def test_convert_quantize_int8_calibrates_with_the_models_tokenizer(tmp_path):
    """--quantize int8 smooths with activation maxima over the calibration text through the
    source's own tokenizer: the converted weights equal `load(weights="int8")` of a plain conversion
    with the projections unfused (fused ones share a smoothing; the converted ones stay separate),
    and the engine generates with them."""
    from lserve_jax.api import load
    from lserve_jax.convert.cli import main as convert_main

    from .hf_models import make_hf_model

    src, dest, plain = tmp_path / "hf", tmp_path / "ckpt", tmp_path / "plain"
    make_hf_model("llama3", src)
    assert convert_main([str(src), str(dest), "--dtype", "float32", "--quantize", "int8", "--quiet"]) == 0
    assert convert_main([str(src), str(plain), "--dtype", "float32", "--quiet"]) == 0
    assert open_checkpoint(dest).weights == "int8"
    eng = load(dest, pattern=None, max_seq_len=64, progress=False)
    eng2 = load(plain, pattern=None, max_seq_len=64, progress=False, weights="int8", fuse=False)
    assert weights_mode(eng.params) == weights_mode(eng2.params) == "int8"
    assert jax.tree.structure(eng.params) == jax.tree.structure(eng2.params)
    for a, b in zip(jax.tree.leaves(eng.params), jax.tree.leaves(eng2.params)):
        np.testing.assert_allclose(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)),
                                   rtol=1e-6, atol=1e-6)
    assert len(eng.generate([[1, 2, 3, 4]], SamplingParams(max_new_tokens=3))[0].token_ids) == 3


def test_int8_weight_round_trip_within_int8_error():
    """Unsmoothed, each weight is within half a step (its channel's amax / 127 / 2) of its value."""
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((40, 24)) * np.exp(rng.uniform(-3, 3, (1, 24)))).astype(np.float32)
    w[:, 3] = 0.0
    qw = quantize_weight_int8(jnp.asarray(w), None)
    assert isinstance(qw, Int8Linear) and qw.w.dtype == jnp.int8 and qw.shape == w.shape
    np.testing.assert_array_equal(np.asarray(qw.inv_smooth), 1.0)
    back = np.asarray(dequantize_weight(qw))
    step = np.abs(w).max(0) / 127
    assert np.all(np.abs(back - w) <= step / 2 * (1 + 1e-5) + 1e-7) and np.all(back[:, 3] == 0)


def test_smoothing_factors():
    """s = amax_x^alpha / amax_w^(1-alpha) per input channel; a channel that never fires keeps 1."""
    ax = jnp.asarray([4.0, 100.0, 0.0, 1.0])
    w = jnp.asarray([[1.0, -2.0], [0.5, 0.25], [3.0, 1.0], [0.0, 0.0]])
    s = np.asarray(smoothing(ax, w, 0.5))
    np.testing.assert_allclose(s[:2], [np.sqrt(4.0) / np.sqrt(2.0), np.sqrt(100.0) / np.sqrt(0.5)], rtol=1e-6)
    np.testing.assert_array_equal(s[2:], 1.0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_int8_matmul_is_the_product_of_the_dequantised_operands(dtype):
    """The INT8 product equals the float32 product of the smoothed, quantised activations and the
    quantised smoothed weight: an exact int32 accumulation, both scales applied."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((2, 7, 48)), dtype)
    w = jnp.asarray(rng.standard_normal((48, 24)), jnp.float32)
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)).reshape(-1, 48), axis=0)
    qw = quantize_weight_int8(w, amax)
    got = np.asarray(int8_matmul(x, qw))
    xq, sx = quantize_amax(x.astype(jnp.float32) * qw.inv_smooth, -1, jnp.int8)
    xd = np.asarray(xq, np.float64) * np.asarray(sx, np.float64)
    wd = np.asarray(qw.w, np.float64).T * np.asarray(qw.scale, np.float64)
    np.testing.assert_allclose(got, xd @ wd, rtol=1e-5, atol=1e-5)
    exact = np.asarray(x.astype(jnp.float32), np.float64) @ np.asarray(w, np.float64)
    assert np.linalg.norm(got - exact) / np.linalg.norm(exact) < 0.02


def test_smoothing_rescues_an_outlier_input_channel():
    """Activations with one channel 100x the rest: per-token int8 without smoothing rounds the
    other channels away; smoothed, the product stays close to the exact one."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((64, 96)).astype(np.float32)
    x[:, 5] *= 100.0
    w = jnp.asarray(rng.standard_normal((96, 32)) * 0.05, jnp.float32)
    exact = x.astype(np.float64) @ np.asarray(w, np.float64)
    amax = jnp.asarray(np.abs(x).max(0))

    def err(qw):
        got = np.asarray(int8_matmul(jnp.asarray(x), qw))
        return np.linalg.norm(got - exact) / np.linalg.norm(exact)

    plain, smooth = err(quantize_weight_int8(w, None)), err(quantize_weight_int8(w, amax))
    assert smooth < 0.02 and smooth < plain / 3, (plain, smooth)


def test_activation_amax_reads_each_projections_input():
    """Layer 0's q/k/v maxima are those of the attention norm's output of the embeddings, every
    linear gets its input width, the fused q/k/v and gate/up their parts', and the maxima are
    finite and positive."""
    from lserve_jax.models.layer import rms_norm

    cfg, p = TINY, tiny_params(TINY)
    ids = np.arange(1, 30)
    amax = activation_amax(p, cfg, ids)
    assert len(amax) == cfg.num_layers
    h = rms_norm(p.embed[jnp.asarray(ids)], p.layers[0].attn_norm, cfg.rms_norm_eps)
    np.testing.assert_allclose(np.asarray(amax[0]["wq"]), np.abs(np.asarray(h, np.float32)).max(0), rtol=1e-6)
    for a, lp in zip(amax, p.layers):
        for n in [n for n in LINEAR_NAMES if n in lp]:
            assert a[n].shape == (lp[n].shape[0],) and np.all(np.isfinite(a[n])) and np.all(np.asarray(a[n]) > 0)
        # fused weights (lserve_jax.fuse) read their parts' input
        for fused, part in [("wqkv", "wq"), ("wqkv", "wv"), ("w_gate_up", "w_gate"), ("w_gate_up", "w_up")]:
            np.testing.assert_array_equal(np.asarray(a[fused]), np.asarray(a[part]))
    q = quantize_params(p, "int8", act_amax=amax).layers[0]
    assert all(isinstance(w, QUANTIZED) == (n in LINEAR_NAMES) for n, w in q.items())
