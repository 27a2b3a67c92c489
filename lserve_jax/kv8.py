"""8-bit KV pages: K and V stored as FP8 (e4m3) or INT8 with one float32 scale per token and head.

    pages = KV8(values, scale)               # values e4m3 or int8 [..., D], scale float32 [...]
    pages = store(pages, (heads, ids, off), x)  # x [..., D] quantised on the way in
    k = load(pages[heads, ids], jnp.bfloat16)   # gathered, then dequantised

Why per token and head (amax of the head's D channels / 448 for e4m3, / 127 for int8): every
writer (a prefill chunk, the one-token append, the decode ring) quantises what it writes without
reading or rewriting anything already stored. Of the e4m3 layouts a writer can keep it lost least
on SmolLM2-135M at 2K tokens (perplexity 1.0077x: scale 1 as vLLM's default, 1.018x; per page,
head and channel, 1.013x; per channel over the whole window, 1.019x; `bench/kv8_scales.py`,
BENCHMARKS.md). INT8 with the same scales (LServe's own KV8 is 8-bit integer) has uniform steps of
amax / 127 where e4m3 keeps a 3-bit mantissa at every magnitude: on SmolLM2 at 2K it loses nothing
(0.9998x), on Qwen2.5-Coder, whose keys carry a few channels of large offset that set every
token's amax, it loses more than e4m3 (1.030x against 1.021x, 2 windows of 2K). With the keys
centred first (`key_centers` below, the engine's default) the offset is gone: at 4K tokens int8
gives 0.9999x on SmolLM2 and 1.0020x on Qwen, e4m3 1.0060x and 1.0157x (`bench/kv8_scales.py`,
2 windows), so int8 with centred keys is the accurate 8-bit KV. Both dequantise exactly into bf16
in the kernels (int8's |values| <= 127 and e4m3 are bf16 numbers).
The selector's page min/max stay in the compute dtype, taken from the unquantised keys.

`KV8` indexes and reshapes its leading (token) axes like the array it stands for, so code that
gathers pages (`x[heads, ids]`, `x.reshape(...)`) works on either; `store` and `load` are the
only places that tell them apart.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from .arrays import Arrays
from .quant import FP8, quantize_amax

INT8 = jnp.int8
# --kv-dtype names -> storage dtype (None: the compute dtype)
KV_DTYPES = {"auto": None, "bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32,
             "fp8_e4m3": FP8, "int8": INT8}
KV8_DTYPES = (jnp.dtype(FP8), jnp.dtype(INT8))  # the storage dtypes that carry scales (KV8)


def is_kv8(dtype) -> bool:
    """Whether K/V stored in `dtype` are 8-bit values with per-token scales (`KV8`)."""
    return dtype is not None and jnp.dtype(dtype) in KV8_DTYPES


def quantize_tokens(x: jax.Array, dtype=FP8) -> tuple[jax.Array, jax.Array]:
    """x [..., D] -> (dtype [..., D], float32 [...]): each vector scaled by its own amax
    (`quant.quantize_amax`: e4m3 to 448, int8 to 127)."""
    q, scale = quantize_amax(x, -1, dtype)
    return q, scale[..., 0]


def fake_quantize(x: jax.Array, dtype) -> jax.Array:
    """x after a round trip through 8-bit pages of `dtype` (what attention reads back), in x's dtype."""
    return KV8(*quantize_tokens(x, dtype)).dequantize(x.dtype)


@struct.dataclass
class KV8:
    """A KV array in 8 bits: values [..., D] e4m3 or int8, scale [...] float32 (value ~= values * scale)."""

    values: jax.Array
    scale: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    @property
    def ndim(self) -> int:
        return self.values.ndim

    @property
    def dtype(self):
        return self.values.dtype

    def __getitem__(self, idx) -> "KV8":
        """Indexes the leading axes (never the last, D)."""
        return KV8(self.values[idx], self.scale[idx])

    def reshape(self, *shape) -> "KV8":
        shape = shape[0] if len(shape) == 1 and isinstance(shape[0], tuple) else shape
        if shape[-1] != self.values.shape[-1]:
            raise ValueError(f"KV8.reshape keeps the last axis ({self.values.shape[-1]}), got {shape}")
        return KV8(self.values.reshape(shape), self.scale.reshape(shape[:-1]))

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return (self.values.astype(jnp.float32) * self.scale[..., None]).astype(dtype)


def store(dest, idx, x: jax.Array):
    """dest.at[idx].set(x) for an array (cast to its dtype) or a KV8 (x quantised per vector)."""
    if isinstance(dest, KV8):
        q, s = quantize_tokens(x, dest.values.dtype)
        return KV8(dest.values.at[idx].set(q), dest.scale.at[idx].set(s))
    return dest.at[idx].set(x.astype(dest.dtype))


def load(x, dtype) -> jax.Array:
    """The values of an array or a KV8 in `dtype`."""
    return x.dequantize(dtype) if isinstance(x, KV8) else x.astype(dtype)


# cache field -> its scale field (present in a layer cache only when its KV is 8-bit)
SCALES = {"k_pages": "k_scale", "v_pages": "v_scale", "ring_k": "ring_ks", "ring_v": "ring_vs",
          "sk_pages": "sk_scale", "sv_pages": "sv_scale"}


def views(lc, *names: str):
    """The named fields of a layer cache, as KV8 where the cache holds 8-bit KV (else the arrays)."""
    return tuple(KV8(lc[n], lc[SCALES[n]]) if SCALES[n] in lc else lc[n] for n in names)


def unviews(lc, **fields):
    """`lc` with these fields replaced (a KV8 writes its values and its scale field)."""
    out = {}
    for n, x in fields.items():
        if isinstance(x, KV8):
            out[n], out[SCALES[n]] = x.values, x.scale
        else:
            out[n] = x
    return lc.replace(**out)


# --- key centres: a calibrated per-head key offset removed before keys reach 8-bit pages --------
#
# Some models' keys carry a few channels with a large offset shared by every token (Qwen2's k_proj
# bias, which RoPE turns slowly in the low-frequency pairs); a per-token scale then spends its
# range on the offset and rounds the informative channels away. Subtracting one constant vector
# c from every key of a head changes each query's logits by the same amount, q.c, for all keys,
# so softmax and the page selector's ranking are unchanged: the model computes the same function,
# and what goes into the 8-bit pages is centred. c is the mean post-RoPE key of each layer and KV
# head over calibration text (a model constant: prefix sharing and swaps stay exact); the layer
# subtracts it (`models.layer.attention_inputs`, the `k_center` entry of a layer's parameters).

CENTER_TOKENS = 1024  # calibration tokens
CENTER_SKIP = 4  # the first tokens (attention sinks, often outliers) are left out of the mean


def key_centers(params, cfg, ids) -> list[jax.Array]:
    """Per layer, the mean post-RoPE key of each KV head (float32 [Hkv, D]) over the token ids
    `ids` (1-D, at least CENTER_SKIP + 1 of them), through the model's own forward: one jitted
    layer run once per layer."""
    from .models.layer import causal_attention, decoder_layer

    ids = jnp.asarray(ids, jnp.int32)[None]
    if ids.shape[1] <= CENTER_SKIP:
        raise ValueError(f"key centres need more than {CENTER_SKIP} calibration tokens, got {ids.shape[1]}")
    positions = jnp.arange(ids.shape[1], dtype=jnp.int32)[None]

    @jax.jit
    def layer(lp, x):
        def attend(q, k, v):
            return causal_attention(q, k, v), jnp.mean(k[0, CENTER_SKIP:].astype(jnp.float32), axis=0)
        return decoder_layer(lp, x, positions, cfg, attend)

    x, centers = params.embed[ids], []
    for lp in params.layers:
        lp = Arrays({n: w for n, w in lp.items() if n != "k_center"})  # the raw keys
        x, c = layer(lp, x)
        centers.append(c)
    return centers


def with_key_centers(params, centers):
    """`params` whose layers subtract these key centres (float32 [Hkv, D] each)."""
    if len(centers) != len(params.layers):
        raise ValueError(f"{len(centers)} key centres for {len(params.layers)} layers")
    layers = tuple(Arrays({**dict(lp.items()), "k_center": jnp.asarray(c, jnp.float32)})
                   for lp, c in zip(params.layers, centers))
    return params.replace(layers=layers)


def calibration_ids(tokenizer, vocab_size: int, n: int = CENTER_TOKENS) -> list[int]:
    """Token ids to take key centres from: the package's calibration text (`evals.corpus`, the
    half perplexity is never scored on) through the tokenizer; without one, seeded random ids."""
    if tokenizer is not None:
        from .evals.corpus import read_text, split_text

        text = split_text(read_text())[1][: 8 * n]  # ~2n tokens at ~4 characters a token
        ids = tokenizer.encode(text, add_special_tokens=False)[:n]
        if len(ids) > CENTER_SKIP:
            return list(ids)
    return np.random.default_rng(0).integers(1, vocab_size, n).tolist()
