"""FP8 attention backend: the retrieval heads' prefill attention with e4m3 Q, K, V and
probabilities (Hopper FP8 tensor cores through cuDNN), an opt-in for time to first token.

* "cudnn8+triton" (GPU, explicit choices only): for prompts of at least `FP8_MIN_TOKENS` tokens
  (option `fp8_min_tokens`; shorter ones run the retrieval heads through cuDNN in the input
  dtype), the retrieval heads (every head when all attend densely) through cuDNN's FP8 flash attention, the streaming heads through the Triton kernel in
  the input dtype, concatenated along heads; a chunk of a longer prompt (`q_offset`) goes through
  the Triton kernel's offset form, in the input dtype.
* "reference8" (any platform, explicit only): the same split with `fp8_attention_emulated` for
  the retrieval heads and the jnp reference for the streaming ones: the CPU model of what the GPU
  computes, for tests and perplexity (bench/fp8_accuracy.py --attn8).

Numerics (`fp8_attention_emulated` is the spec): K is centred and Q and K rotated by one fixed
orthogonal matrix (`incoherent_qk`: the logits' softmax is unchanged, their rounding error much
smaller); Q, K and V are each scaled by one float32 number (the tensor's amax / 448) and rounded
to e4m3; the logits are the exact products of the rounded
values times the scales; each row's probabilities exp(s - rowmax), in [0, 1], are rounded to
e4m3 after a scale of 448 for the PV product, while the denominator sums them unrounded (as flash
attention accumulates it); the output, bounded by max |V|, is rounded to e4m3 with V's scale (cuDNN
returns the FP8 operand type) and comes back in the input dtype. cuDNN normalises by a running
row max per key block, so its rounding of the probabilities differs from the emulation's (which
uses the final row max and so rounds small probabilities no more finely than cuDNN does).

Measured on an H100 (bench/attn8_check.sh; no H200 was lent): one layer's retrieval heads (Hq 16
/ Hkv 4, D 128, causal, this module's centring, rotation and quantisation inside the timed call)
1.54x cuDNN bf16 at 128K tokens (77.2 vs 119.0 ms), 1.35x at 32K, 0.78x at 8K (hence
`FP8_MIN_TOKENS`); output error against bf16 5.6% relative RMS on i.i.d. inputs, 15% where a few
keys dominate. Whole-model TTFT at 128K (llama3-8b shape, the real pattern at 0.5): sparse with
this and INT8 W8A8 weights 5.61 s against cuDNN dense bf16 11.90 s (2.12x); with bf16 weights
6.64 s (1.79x; 8.41 s without FP8 attention on another H100). Perplexity on SmolLM2-135M at 4K
(bench/fp8_accuracy.py --attn8, emulated): 1.005x dense / 1.004x sparse, and INT8 W8A8 + int8 KV
+ FP8 attention 1.016x / 1.012x.

Padding: cuDNN's FP8 graph takes no sequence lengths; with the causal mask a row i < length sees
only keys j <= i < length, so the rows that count are exact without them, and rows >= length are
zeroed after, as the bf16 engines do.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ..pallas import compat
from ..pallas.prefill import prefill_attention_reference
from ..quant import FP8, FP8_MAX
from . import cudnn, triton
from .prefill import every_head_dense
from .registry import Unsupported, register

_TINY = 1e-12


@functools.lru_cache(maxsize=None)
def _rotation_np(d: int) -> np.ndarray:
    """A fixed orthogonal [d, d] matrix: a Sylvester Hadamard matrix with random column signs
    (seeded) for a power-of-2 d, else the Q of a seeded Gaussian matrix."""
    rng = np.random.default_rng(8)
    if d & (d - 1) == 0:
        h = np.ones((1, 1))
        while h.shape[0] < d:
            h = np.block([[h, h], [h, -h]])
        m = h / np.sqrt(d) * np.where(rng.random(d) < 0.5, -1.0, 1.0)[None, :]
    else:
        m = np.linalg.qr(rng.standard_normal((d, d)))[0]
    return m.astype(np.float32)


def rotation(d: int) -> jax.Array:
    return jnp.asarray(_rotation_np(d))


def incoherent_qk(q: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
    """q, k (float32, [..., T, H, D] with tokens on axis 1) transformed so their e4m3 roundings
    disturb the logits least, leaving every row's softmax unchanged: K centred per (head,
    channel) over batch and tokens (the logits of a row shift by one constant, q . mean), then both
    rotated by one orthogonal matrix (q R . k R = q . k), which spreads the few channels that carry
    most of a logit over all of them (measured on SmolLM2-135M at 4K tokens, FP8 attention in every
    head: perplexity 1.027x exact without either, 1.021x centred, 1.015x rotated, 1.0046x both)."""
    r = rotation(q.shape[-1])
    kf = k.astype(jnp.float32)
    kf = kf - jnp.mean(kf, axis=(0, 1), keepdims=True)
    return q.astype(jnp.float32) @ r, kf @ r


def per_tensor(x: jax.Array, heads: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """x -> (e4m3 array, float32 scalar scale): one scale for the whole tensor, amax / 448;
    heads: bool [H] (x's axis 2): the amax over those heads only (the others may clip)."""
    xf = x.astype(jnp.float32)
    a = jnp.abs(xf) if heads is None else jnp.where(heads[None, None, :, None], jnp.abs(xf), 0.0)
    s = jnp.maximum(jnp.max(a), _TINY) / FP8_MAX
    return jnp.clip(xf / s, -FP8_MAX, FP8_MAX).astype(FP8), s


def _round_e4m3(x: jax.Array) -> jax.Array:
    return x.astype(FP8).astype(jnp.float32)


def fp8_softmax_pv(s: jax.Array, pv, v_scale: jax.Array) -> jax.Array:
    """FP8 attention's roundings after the logits (float32 `s`, masked keys -inf, keys last):
    the probabilities exp(s - rowmax) rounded to e4m3 after a scale of 448 for the PV product
    `pv(p)` (p @ V, V already rounded and dequantised), the denominator summed from the unrounded
    ones, the output rounded to e4m3 with V's scale `v_scale`. float32 output."""
    p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    o = pv(_round_e4m3(p * FP8_MAX)) / (FP8_MAX * jnp.sum(p, axis=-1, keepdims=True))
    return _round_e4m3(o / v_scale) * v_scale


def quantized_operands(q, k, v):
    """The FP8 operands and their scales: ((q8, sq), (k8, sk), (v8, sv)), q and k through
    `incoherent_qk` first."""
    qr, kr = incoherent_qk(q, k)
    return per_tensor(qr), per_tensor(kr), per_tensor(v)


def fp8_attention_emulated(q, k, v, lengths, scale: float) -> jax.Array:
    """Causal GQA attention with FP8 operands, emulated in float32 (the module's numerics).
    q [B, T, Hq, D], k/v [B, T, Hkv, D], lengths int32[B] -> [B, T, Hq, D] in q.dtype, rows >=
    length zero. Materialises [T, T] logits per head: tests and short windows."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    (q8, sq), (k8, sk), (v8, sv) = quantized_operands(q, k, v)
    qf = q8.astype(jnp.float32).reshape(b, t, hkv, g, d)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qf, k8.astype(jnp.float32)) * (sq * sk * scale)
    causal = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]
    vf = v8.astype(jnp.float32) * sv
    o = fp8_softmax_pv(jnp.where(causal, s, -jnp.inf), lambda p: jnp.einsum("bhgqk,bkhd->bhgqd", p, vf), sv)
    o = o.transpose(0, 3, 1, 2, 4).reshape(b, t, hq, d)
    return _zero_padding(o, lengths, q.dtype)


def _zero_padding(o, lengths, dtype):
    row_ok = jnp.arange(o.shape[1])[None, :] < lengths[:, None]
    return jnp.where(row_ok[:, :, None, None], o, 0.0).astype(dtype)


def _cudnn_module():
    try:
        from jax._src.cudnn import fused_attention_stablehlo as fas
    except ImportError as e:
        raise Unsupported(f"no cuDNN attention module in this jax: {e}") from e
    needed = ("dot_product_attention", "fp8_params_keys", "MaskType")
    missing = [n for n in needed if not hasattr(fas, n)]
    if missing:
        raise Unsupported(f"this jax's cuDNN attention module lacks {missing} (no FP8 attention)")
    return fas


def fp8_attention_cudnn(q, k, v, lengths, scale: float) -> jax.Array:
    """`fp8_attention_emulated`'s computation on cuDNN's FP8 flash attention (GPU)."""
    if not compat.on_gpu():
        raise Unsupported(f"cuDNN FP8 attention needs a GPU; the default backend is {compat.platform()!r}")
    fas = _cudnn_module()
    (q8, sq), (k8, sk), (v8, sv) = quantized_operands(q, k, v)
    one = jnp.ones((1, 1, 1, 1), jnp.float32)
    params = {key: one for key in fas.fp8_params_keys}  # the backward's entries are unused
    params.update(descale_q=one * sq, descale_k=one * sk, descale_v=one * sv, descale_s=one / FP8_MAX,
                  scale_s=one * FP8_MAX, scale_o=one / sv)
    try:
        out, _, _ = fas.dot_product_attention(q8, k8, v8, fp8_params=params, scale=float(scale),
                                              mask_type=fas.MaskType.CAUSAL, qkv_layout="BTNH", use_fp8=True)
    except (NotImplementedError, RuntimeError, TypeError, ValueError) as e:
        # cuDNN's FP8 rules (architecture, head dim, library version) or a moved private signature
        raise Unsupported(f"cuDNN FP8 attention rejected {q.shape=} {k.shape=}: {type(e).__name__}: {e}") from e
    return _zero_padding(out.astype(jnp.float32) * sv, lengths, q.dtype)


# Below this many tokens the retrieval heads stay in the input dtype: FP8's rotation and
# quantisation passes cost more than its faster product there (bench/fp8_attn.py, H100, one layer's
# retrieval heads: 0.78x cuDNN bf16 at 8K, 1.35x at 32K, 1.54x at 128K). Option `fp8_min_tokens`.
FP8_MIN_TOKENS = 16384


def _hybrid8(dense_fp8, dense_plain, streaming, offset_form, check):
    def run(q, k, v, lengths, *, num_retrieval, sink, local, scale, q_offset=None, options):
        options = dict(options)
        min_tokens = options.pop("fp8_min_tokens", FP8_MIN_TOKENS)
        if not isinstance(min_tokens, int) or min_tokens < 0:
            raise ValueError(f"fp8_min_tokens must be an int >= 0, got {min_tokens!r}")
        check(q, options)
        dense = dense_plain if q.shape[1] < min_tokens else dense_fp8  # short: the input dtype's engine
        if q_offset is not None:  # a chunk: the input dtype through the offset form
            return offset_form(q, k, v, lengths, num_retrieval=num_retrieval, sink=sink, local=local, scale=scale,
                               q_offset=q_offset, options=options)
        if every_head_dense(q, k, num_retrieval=num_retrieval, sink=sink, local=local):
            return dense(q, k, v, lengths, scale)
        r = num_retrieval
        if r == 0:
            return streaming(q, k, v, lengths, sink=sink, local=local, scale=scale, options=options)
        g = q.shape[2] // k.shape[2]
        out_r = dense(q[:, :, :r * g], k[:, :, :r], v[:, :, :r], lengths, scale)
        out_s = streaming(q[:, :, r * g:], k[:, :, r:], v[:, :, r:], lengths, sink=sink, local=local, scale=scale,
                          options=options)
        return jnp.concatenate([out_r, out_s], axis=2)

    return run


def _check_gpu(q, options):
    triton.check_prefill(q, options)
    if not compat.on_gpu():
        raise Unsupported(f"cuDNN FP8 attention needs a GPU; the default backend is {compat.platform()!r}")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise Unsupported(f"cudnn8+triton takes bfloat16/float16 activations, got {q.dtype}")


def _check_any(q, options):
    if options:
        raise ValueError(f"reference8 takes only fp8_min_tokens, got {sorted(options)}")


def _cudnn_bf16(q, k, v, lengths, scale):
    return cudnn.dense_causal(q, k, v, lengths, scale, "cudnn")


def _reference_dense(q, k, v, lengths, scale):
    return prefill_attention_reference(q, k, v, lengths, num_retrieval=k.shape[2], sink=0, local=0, scale=scale)


def _triton_streaming(q, k, v, lengths, *, sink, local, scale, options):
    return triton.prefill(q, k, v, lengths, num_retrieval=0, sink=sink, local=local, scale=scale, options=options)


def _triton_offset(q, k, v, lengths, *, num_retrieval, sink, local, scale, q_offset, options):
    return triton.prefill(q, k, v, lengths, num_retrieval=num_retrieval, sink=sink, local=local, scale=scale,
                          q_offset=q_offset, options=options)


def _reference_streaming(q, k, v, lengths, *, sink, local, scale, options):
    del options
    return prefill_attention_reference(q, k, v, lengths, num_retrieval=0, sink=sink, local=local, scale=scale)


def _reference_offset(q, k, v, lengths, *, num_retrieval, sink, local, scale, q_offset, options):
    del options
    return prefill_attention_reference(q, k, v, lengths, num_retrieval=num_retrieval, sink=sink, local=local,
                                       scale=scale, q_offset=q_offset)


register("prefill", "cudnn8+triton")(_hybrid8(fp8_attention_cudnn, _cudnn_bf16, _triton_streaming, _triton_offset,
                                              _check_gpu))
register("prefill", "reference8")(_hybrid8(fp8_attention_emulated, _reference_dense, _reference_streaming,
                                           _reference_offset, _check_any))
