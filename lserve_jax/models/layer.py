"""THE decoder layer, used by prefill, decode, the reference forward, calibration's gated
forwards and every benchmark baseline; attention is a callable the caller passes.

    x, aux = decoder_layer(lp, x, positions, cfg, attend)

x [..., T, hidden], positions int [..., T]; `attend(q, k, v)` gets q [..., T, Hq, D] and k, v
[..., T, Hkv, D] after the projections, the per-head q/k norms (when the family declares
them) and RoPE, and returns (o [..., T, Hq, D], aux): prefill attends and writes the paged
cache, decode appends and reads selected pages, calibration mixes full and streaming
attention, a benchmark baseline runs cuDNN over a contiguous cache. `aux` (new cache, layer
statistics, anything) is handed back untouched.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from ..arrays import Arrays
from ..config import ModelConfig
from ..fuse import BIASES, FUSED
from ..ops.qmatmul import qmatmul
from ..quant import BF16_MIN_ROWS, QUANTIZED, Bf16Prefill
from ..rope import apply_rope, attention_scaling, inv_frequencies

Attend = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, Any]]


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    xf = xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return w * xf.astype(x.dtype)  # HF casts back before the weight


def project(x: jax.Array, w, b: jax.Array | None = None) -> jax.Array:
    """x [..., in] @ w [in, out] (+ b), accumulated in float32, returned in x's dtype (a bfloat16 w
    is multiplied with x rounded to bfloat16).
    w may be an 8-bit weight (`lserve_jax.quant`), multiplied by the registry op "qmatmul"
    (`lserve_jax.ops.qmatmul`, default order: XLA's products): FP8Linear, an FP8 GEMM (W8A8) or a
    product with the weight converted (W8A16); Int8Linear, an INT8 GEMM on smoothed activations
    (W8A8); scales applied to the float32 result."""
    rows = math.prod(x.shape[:-1])
    if isinstance(w, Bf16Prefill):  # many rows: the bfloat16 copy; few: the float32 weight
        w = w.w16 if rows >= BF16_MIN_ROWS else w.w
    if isinstance(w, QUANTIZED):
        y = qmatmul(x, w)
    else:
        # a bfloat16 weight takes bfloat16 activations (`quant.bf16_linear`), not a float32 copy of
        # itself made on every call: the product of a bf16 GEMM, float32 accumulation
        xw = x.astype(w.dtype) if w.dtype == jnp.bfloat16 else x
        if w.dtype == jnp.bfloat16 and rows == 1 and jax.default_backend() == "cpu":
            # XLA:CPU's bf16 product of a single row is 3-4x slower than of two (SmolLM2's 576 x
            # 1536 weight: ~400 vs ~120 us on 2 cores, float32's ~110): decode at batch 1 gets a zero row
            xw = jnp.pad(xw.reshape(1, -1), ((0, 1), (0, 0)))
            y = jnp.einsum("rh,hk->rk", xw, w, preferred_element_type=jnp.float32)[:1].reshape(*x.shape[:-1], -1)
        else:
            y = jnp.einsum("...h,hk->...k", xw, w, preferred_element_type=jnp.float32)
    if b is not None:
        y = y + b.astype(jnp.float32)
    return y.astype(x.dtype)


def projections(lp: Arrays, h: jax.Array, fused: str, sections) -> list[jax.Array]:
    """h's products with the weights `fused` stands for (`fuse.FUSED[fused]`), with their biases: one
    product with the layer's fused weight split at `sections` (jnp.split's: indices or a count of
    equal parts) when it has one, else one product per weight."""
    if fused in lp:
        return jnp.split(project(h, lp[fused], lp.get(BIASES.get(fused))), sections, axis=-1)
    return [project(h, lp[n], lp.get(BIASES.get(n))) for n in FUSED[fused]]


def attention_inputs(lp: Arrays, x: jax.Array, positions: jax.Array, cfg: ModelConfig
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Pre-norm, q/k/v projections (fused or not: `projections`), per-head q/k norms if declared,
    RoPE, and the key centre if the layer has one (`kv8.key_centers`).
    x [..., T, hidden] -> q [..., T, Hq, D], k, v [..., T, Hkv, D]."""
    lead = x.shape[:-1]
    h = rms_norm(x, lp.attn_norm, cfg.rms_norm_eps)
    q_cols, kv_cols = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    q, k, v = projections(lp, h, "wqkv", [q_cols, q_cols + kv_cols])
    q = q.reshape(*lead, cfg.num_heads, cfg.head_dim)
    k = k.reshape(*lead, cfg.num_kv_heads, cfg.head_dim)
    v = v.reshape(*lead, cfg.num_kv_heads, cfg.head_dim)
    if "q_norm" in lp:  # Qwen3: RMSNorm over each head's channels, before RoPE
        q = rms_norm(q, lp.q_norm, cfg.rms_norm_eps)
        k = rms_norm(k, lp.k_norm, cfg.rms_norm_eps)
    inv_freq, scaling = inv_frequencies(cfg), attention_scaling(cfg)
    k = apply_rope(k, positions, inv_freq, scaling)
    if "k_center" in lp:  # 8-bit KV: a calibrated key offset, removed (softmax-invariant; `kv8.key_centers`)
        k = k - lp.k_center.astype(k.dtype)
    return apply_rope(q, positions, inv_freq, scaling), k, v


def gated_act(lp: Arrays, h: jax.Array) -> jax.Array:
    """SwiGLU's hidden activation silu(gate(h)) * up(h), the down projection's input."""
    gate, up = projections(lp, h, "w_gate_up", 2)
    return jax.nn.silu(gate) * up


def mlp(lp: Arrays, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """The residual SwiGLU block: x + down(silu(gate(h)) * up(h)), h = norm(x)."""
    return x + project(gated_act(lp, rms_norm(x, lp.mlp_norm, cfg.rms_norm_eps)), lp.w_down)


def attention_block(lp: Arrays, x: jax.Array, positions: jax.Array, cfg: ModelConfig,
                    attend: Attend) -> tuple[jax.Array, Any]:
    """The residual attention block: x + o_proj(attend(q, k, v)) -> (that, attend's aux)."""
    q, k, v = attention_inputs(lp, x, positions, cfg)
    o, aux = attend(q, k, v)
    return x + project(o.astype(x.dtype).reshape(*x.shape[:-1], -1), lp.wo), aux


def decoder_layer(lp: Arrays, x: jax.Array, positions: jax.Array, cfg: ModelConfig,
                  attend: Attend) -> tuple[jax.Array, Any]:
    """One decoder layer: x [..., T, hidden] -> (next layer's input, attend's aux)."""
    x, aux = attention_block(lp, x, positions, cfg, attend)
    return mlp(lp, x, cfg), aux


def final_norm(params, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    return rms_norm(x, params.final_norm, cfg.rms_norm_eps)


def lm_logits(params, hidden: jax.Array) -> jax.Array:
    """[..., hidden] normed hidden states -> float32 [..., vocab] logits (tied or not)."""
    if params.lm_head is None:
        return jnp.einsum("...h,vh->...v", hidden, params.embed, preferred_element_type=jnp.float32)
    return jnp.einsum("...h,hv->...v", hidden, params.lm_head, preferred_element_type=jnp.float32)


def logits(params, x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Final norm then the LM head: [..., hidden] -> float32 [..., vocab]."""
    return lm_logits(params, final_norm(params, x, cfg))


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Plain dense causal GQA attention, [B, T, H, D] in and out (the reference forward's)."""
    t, hq, d = q.shape[-3:]
    g = hq // k.shape[-2]
    k = jnp.repeat(k, g, axis=-2)
    v = jnp.repeat(v, g, axis=-2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(d).astype(jnp.float32)
    mask = jnp.tril(jnp.ones((t, t), bool))
    p = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v.astype(jnp.float32)).astype(q.dtype)
