"""FP8 linear weights: W8A8 (FP8 weights and per-token FP8 activations, an FP8 x FP8 GEMM) and
W8A16 (FP8 weights, dequantised in the product, activations in the compute dtype).

    params = quantize_params(params, "fp8")          # every layer's projections; the rest stays
    y = project(x, params.layers[0].wq)              # models.layer.project dispatches here

A quantised weight is an `FP8Linear`: the e4m3 values stored [out, in] (the contracting axis
last for both operands, the layout cuBLASLt's FP8 GEMM takes, so XLA inserts no transpose of
the weight each call) and one float32 scale per output channel (amax / 448: a channel's largest
weight maps to e4m3's largest finite value). W8A8 scales each activation row (token) by its own
amax on the fly, multiplies the two FP8 operands with float32 accumulation and applies both
scales to the [tokens, out] result, so the dot itself is a plain FP8 GEMM. Embeddings, norms,
biases and the LM head stay in the checkpoint's dtype (LServe and the usual W8A8 recipes keep
them so: they are small, or, for the LM head, sensitive).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from .arrays import Arrays

FP8 = jnp.float8_e4m3fn
FP8_MAX = float(jnp.finfo(FP8).max)  # 448
# What each name quantises: "fp8" = W8A8, "fp8-weight-only" = W8A16.
MODES = {"fp8": True, "fp8-weight-only": False}
LINEAR_NAMES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
_TINY = 1e-12  # an all-zero channel or row gets a finite scale


@struct.dataclass
class FP8Linear:
    """A linear weight [in, out] stored as e4m3 [out, in] with per-output-channel scales."""

    w: jax.Array  # float8_e4m3fn [out, in]
    scale: jax.Array  # float32 [out]: weight ~= w.T * scale
    quantize_activations: bool = struct.field(pytree_node=False, default=True)  # W8A8 (else W8A16)

    @property
    def shape(self) -> tuple[int, int]:
        """The [in, out] shape of the weight it replaces."""
        return self.w.shape[1], self.w.shape[0]


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown weight quantisation {mode!r}; choose from {', '.join(MODES)}")
    return mode


INT8_MAX = 127.0


def quantize_amax(x: jax.Array, axis: int, dtype=FP8) -> tuple[jax.Array, jax.Array]:
    """x -> (e4m3 or int8, float32 scales with `axis` kept at size 1): each slice along `axis`
    scaled so its largest magnitude maps to the format's largest value (e4m3: 448, the nearest
    e4m3 value; int8: 127, rounded to the nearest integer). The one quantiser of weights,
    activations and KV pages (`lserve_jax.kv8`)."""
    int8 = jnp.dtype(dtype) == jnp.dtype(jnp.int8)
    if not int8 and jnp.dtype(dtype) != jnp.dtype(FP8):
        raise ValueError(f"8-bit quantisation is to float8_e4m3fn or int8, got {jnp.dtype(dtype)}")
    top = INT8_MAX if int8 else FP8_MAX
    xf = jnp.asarray(x, jnp.float32)
    scale = jnp.maximum(jnp.max(jnp.abs(xf), axis=axis, keepdims=True), _TINY) / top
    y = xf / scale
    return jnp.clip(jnp.round(y) if int8 else y, -top, top).astype(dtype), scale


def quantize_weight(w: jax.Array, *, quantize_activations: bool = True) -> FP8Linear:
    """w [in, out] (any float dtype) -> FP8Linear, scales from each output channel's amax."""
    q, scale = quantize_amax(w, 0)  # [in, out], [1, out]
    return FP8Linear(q.T, scale[0], quantize_activations)


def dequantize_weight(qw: FP8Linear, dtype=jnp.float32) -> jax.Array:
    """The [in, out] weight the FP8 values stand for."""
    return (qw.w.astype(jnp.float32).T * qw.scale).astype(dtype)


def quantize_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [..., in] -> (e4m3 [..., in], float32 [..., 1]): each row scaled by its own amax."""
    return quantize_amax(x, -1)


def fp8_matmul(x: jax.Array, qw: FP8Linear) -> jax.Array:
    """x [..., in] @ the weight -> float32 [..., out]."""
    dims = (((x.ndim - 1,), (1,)), ((), ()))
    if qw.quantize_activations:
        xq, sx = quantize_rows(x)
        y = jax.lax.dot_general(xq, qw.w, dims, preferred_element_type=jnp.float32)
        return y * sx * qw.scale
    # W8A16: the FP8 weight converted in the product (activations keep their precision)
    y = jax.lax.dot_general(x, qw.w.astype(x.dtype), dims, preferred_element_type=jnp.float32)
    return y * qw.scale


def quantize_params(params, mode: str = "fp8"):
    """`params` with every layer's linear weights (LINEAR_NAMES) as FP8Linear; the embedding,
    the norms, the biases and the LM head unchanged. Quantising twice is an error."""
    act = MODES[check_mode(mode)]
    if is_quantized(params):
        raise ValueError("the params are already FP8-quantised")
    layers = tuple(Arrays({n: quantize_weight(w, quantize_activations=act) if n in LINEAR_NAMES else w
                           for n, w in layer.items()})
                   for layer in params.layers)
    return params.replace(layers=layers)


def abstract_quantized(abstract, mode: str):
    """ShapeDtypeStructs of `quantize_params(params, mode)` for abstract [in, out] params (the
    restore target of a checkpoint converted with --quantize)."""
    act = MODES[check_mode(mode)]

    def q(w):
        i, o = w.shape
        return FP8Linear(jax.ShapeDtypeStruct((o, i), FP8), jax.ShapeDtypeStruct((o,), jnp.float32), act)

    layers = tuple(Arrays({n: q(w) if n in LINEAR_NAMES else w for n, w in layer.items()})
                   for layer in abstract.layers)
    return abstract.replace(layers=layers)


def cast_params(params, dtype):
    """Every float array to `dtype` except the FP8 weights and their scales."""
    return jax.tree.map(lambda x: x if isinstance(x, FP8Linear) else x.astype(dtype), params,
                        is_leaf=lambda x: isinstance(x, FP8Linear))


def is_quantized(params) -> bool:
    return weights_mode(params) is not None


def weights_mode(params) -> str | None:
    """"fp8" / "fp8-weight-only" for quantised params, else None."""
    for layer in params.layers:
        for _, w in layer.items():
            if isinstance(w, FP8Linear):
                return "fp8" if w.quantize_activations else "fp8-weight-only"
    return None
