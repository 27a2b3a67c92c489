"""Rotary position embeddings (HF's half-rotation layout) with `linear`, `llama3` and `yarn` scaling."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from .config import ModelConfig


def inv_frequencies(cfg: ModelConfig) -> np.ndarray:
    """[head_dim // 2] inverse frequencies after scaling, computed once on the host in float64."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    rs = cfg.rope_scaling
    if rs.kind == "linear":
        inv = inv / rs.factor
    elif rs.kind == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, a smooth blend between.
        low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
        high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
        wavelen = 2 * math.pi / inv
        smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
            rs.high_freq_factor - rs.low_freq_factor)
        blended = (1 - smooth) * inv / rs.factor + smooth * inv
        inv = np.where(wavelen > low_wavelen, inv / rs.factor,
                       np.where(wavelen < high_wavelen, inv, blended))
    elif rs.kind == "yarn":
        return _yarn_inv_frequencies(cfg)
    return inv.astype(np.float32)


def _yarn_correction_dim(rotations: float, dim: int, base: float, orig_ctx: int) -> float:
    """The (fractional) rotary dimension whose wavelength makes `rotations` turns over `orig_ctx`."""
    return (dim * math.log(orig_ctx / (rotations * 2 * math.pi))) / (2 * math.log(base))


def yarn_ramp_bounds(cfg: ModelConfig) -> tuple[float, float]:
    """YaRN's [low, high] dimension band (in float64, as transformers): frequency pairs below `low`
    keep their original frequency, those above `high` are interpolated (divided by `factor`)."""
    rs, d = cfg.rope_scaling, cfg.head_dim
    low = _yarn_correction_dim(rs.beta_fast, d, cfg.rope_theta, rs.original_max_position_embeddings)
    high = _yarn_correction_dim(rs.beta_slow, d, cfg.rope_theta, rs.original_max_position_embeddings)
    if rs.truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, d - 1)


def _yarn_inv_frequencies(cfg: ModelConfig) -> np.ndarray:
    """YaRN (NTK-by-parts) inverse frequencies, rounded like transformers' float32 torch code.

    transformers builds them in float32 step by step; each step is reproduced here with float32
    numpy arithmetic (identical IEEE rounding for + - * /). The one transcendental, theta ** x, is
    taken in float64 on the float32-rounded exponent and rounded once, which agrees with torch's
    float32 pow to the bit on almost every element (torch's own is not always correctly rounded).
    """
    rs, d = cfg.rope_scaling, cfg.head_dim
    f32 = np.float32
    exponent = np.arange(0, d, 2, dtype=f32) / f32(d)  # float32-rounded, as torch
    pos_freqs = np.power(np.float64(cfg.rope_theta), exponent.astype(np.float64)).astype(f32)
    extrapolated = f32(1) / pos_freqs  # the original frequencies
    interpolated = f32(1) / (f32(rs.factor) * pos_freqs)  # slowed down by `factor`
    low, high = yarn_ramp_bounds(cfg)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = np.clip((np.arange(d // 2, dtype=f32) - f32(low)) / f32(high - low), f32(0), f32(1))
    keep = f32(1) - ramp  # weight of the original frequency: 1 below `low`, 0 above `high`
    inv = interpolated * (f32(1) - keep) + extrapolated * keep
    return inv.astype(f32)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1 * mscale * ln(factor) + 1 (1 when factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def attention_scaling(cfg: ModelConfig) -> float:
    """Factor on cos and sin (so on q.k twice): 1 except for YaRN's attention temperature.

    YaRN: the configured `attention_factor` if given; else, with both `mscale` and `mscale_all_dim`
    nonzero (DeepSeek style), mscale(factor, mscale) / mscale(factor, mscale_all_dim); else
    mscale(factor) = 0.1 ln(factor) + 1. A Python float (float64), as transformers keeps it.
    """
    rs = cfg.rope_scaling
    if rs.kind != "yarn":
        return 1.0
    if rs.attention_factor is not None:
        return float(rs.attention_factor)
    if rs.mscale and rs.mscale_all_dim:
        return float(yarn_mscale(rs.factor, rs.mscale) / yarn_mscale(rs.factor, rs.mscale_all_dim))
    return yarn_mscale(rs.factor)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray, scaling: float = 1.0) -> jax.Array:
    """Rotates x [..., T, heads, head_dim] by positions [..., T] (int). Computed in float32.
    `scaling` multiplies cos and sin (HF's `attention_scaling`)."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [..., T, d/2]
    if jax.default_backend() == "cpu" and positions.shape[-1] > 1:
        # XLA:CPU fuses the tables into the rotation's loop over x [T, heads, D], so every element
        # recomputed its cos and sin (2 x heads x 2 transcendentals per angle): a fifth of a 2K
        # SmolLM2 prompt's TTFT on 2 cores. Made inside a conditional (both branches the same),
        # the tables are buffers of [T, D/2] that no loop can fuse (an optimization barrier does
        # not stop it: XLA expands barriers before fusion). Decode (one position) and GPUs keep
        # the fused form: there the tables are small or their transcendentals cheap, and a
        # table would be a kernel of its own in each layer of the decode step.
        def tables(a):
            return jnp.cos(a), jnp.sin(a)
        cos, sin = jax.lax.cond(positions.reshape(-1)[0] >= 0, tables, tables, angles)
    else:
        cos, sin = jnp.cos(angles), jnp.sin(angles)
    cos, sin = cos[..., None, :], sin[..., None, :]  # broadcast over heads
    if scaling != 1.0:
        cos, sin = cos * scaling, sin * scaling
    # halves as an axis of 2: out = (x1 cos - x2 sin, x2 cos + x1 sin) with the halves swapped by
    # a reverse and signed, not split and concatenated, so that XLA can fuse the rotation with
    # its producer (the projection's epilogue) and q's with k's (a concatenate is a kernel of its
    # own on the GPU: two a layer in the decode step). The same products and sums, bit for bit.
    xf = x.astype(jnp.float32)
    half = xf.reshape(*xf.shape[:-1], 2, xf.shape[-1] // 2)
    signed = jnp.flip(half, axis=-2) * jnp.asarray([[-1.0], [1.0]], jnp.float32)  # (-x2, x1)
    out = half * cos[..., None, :] + signed * sin[..., None, :]
    return out.reshape(xf.shape).astype(x.dtype)
