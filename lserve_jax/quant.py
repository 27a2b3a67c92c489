"""8-bit linear weights: W8A8 in FP8 (FP8 weights and per-token FP8 activations, an FP8 x FP8
GEMM), W8A16 (FP8 weights, dequantised in the product, activations in the compute dtype) and
W8A8 in INT8 with SmoothQuant smoothing (int8 x int8 -> int32 GEMM; `lserve_jax.smoothquant`).

    params = quantize_params(params, "fp8")          # every layer's projections; the rest stays
    params = quantize_params(params, "int8", act_amax=smoothquant.activation_amax(params, cfg, ids))
    y = project(x, params.layers[0].wq)              # models.layer.project dispatches here

A quantised weight is an `FP8Linear`: the e4m3 values stored [out, in] (the contracting axis
last for both operands, the layout cuBLASLt's FP8 GEMM takes, so XLA inserts no transpose of
the weight each call) and one float32 scale per output channel (amax / 448: a channel's largest
weight maps to e4m3's largest finite value). W8A8 scales each activation row (token) by its own
amax on the fly, multiplies the two FP8 operands with float32 accumulation and applies both
scales to the [tokens, out] result, so the dot itself is a plain FP8 GEMM. Embeddings, norms,
biases and the LM head stay in the checkpoint's dtype (LServe and the usual W8A8 recipes keep
them so: they are small, or, for the LM head, sensitive).

INT8 W8A8 (`Int8Linear`, LServe's own W8A8: QServe/SmoothQuant) rounds each weight to one of 255
levels of its output channel (amax / 127), about 3x finer than e4m3's 3 mantissa bits for the
bulk of a channel's weights, but per-token int8 activations cannot absorb the few input channels
whose activations are 10-100x the others. SmoothQuant moves that range into the weights: each
input channel j is divided by s_j = amax|x_j|^alpha / amax|W_j|^(1-alpha) (activation maxima from
calibration text) and the weight's row j multiplied by it, the same product; the division is one
multiply fused into the activation quantiser. On SmolLM2-135M at 4K tokens: W8A8 FP8 1.027x the
float32 perplexity, INT8 without smoothing 1.033x, INT8 smoothed (alpha 0.5) 1.008x.

Every 8-bit product goes through the registry op "qmatmul" (`lserve_jax.ops.qmatmul`), whose
default everywhere is the functions below (`fp8_matmul`, `int8_matmul`: implementation "xla").
A weight-only Triton skinny GEMM for decode's few rows (`lserve_jax.pallas.qmatmul`: the 8-bit
weight read once and converted in registers, activations unquantised) is implementation
"triton", taken only when a choice names it: on the GPU it is correct and as fast per product as
XLA's int8 GEMM (24 vs 23 us for a 4096x14336 weight at 4 rows, H100), but in the sparse decode
step its launches made the step host-bound (10.2 vs 6.9 ms, 128K x 4, H100;
bench/results/profile_decode-2026-12-06{a,b}-h100.json).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from .arrays import Arrays

FP8 = jnp.float8_e4m3fn
FP8_MAX = float(jnp.finfo(FP8).max)  # 448
# "fp8" = W8A8 FP8, "fp8-weight-only" = W8A16 (FP8 weights), "int8" = W8A8 INT8, SmoothQuant-smoothed
MODES = ("fp8", "fp8-weight-only", "int8")
# what `lserve_jax.load(weights=...)` takes besides MODES: "checkpoint" (or None) the weights as
# stored; "bf16" stores the linear weights in bfloat16 and feeds the products bfloat16 activations
# (float32 accumulation, everything else in the compute dtype: `bf16_linear`); "bf16-prefill"
# keeps the float32 weights for products of few rows (decode) and adds a bfloat16 copy for those
# of many (prefill); "auto" is "bf16-prefill" where that is the fast path (`auto_weights`), else
# "checkpoint"
WEIGHT_CHOICES = ("auto", "checkpoint", "bf16", "bf16-prefill") + MODES
BF16_MIN_ROWS = 8  # "bf16-prefill": products of at least this many rows take the bfloat16 copy
SMOOTH_ALPHA = 0.5  # SmoothQuant's migration strength (its default; 0.8 measured worse on SmolLM2)
# every layer's linear weights, fused ones included (`lserve_jax.fuse`)
LINEAR_NAMES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "wqkv", "w_gate_up")
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


@struct.dataclass
class Int8Linear:
    """A linear weight [in, out] as INT8 W8A8: x @ W == (x * inv_smooth) @ (W / inv_smooth[:, None]),
    the smoothed weight stored as int8 [out, in] with per-output-channel scales."""

    w: jax.Array  # int8 [out, in]: the smoothed weight's values
    scale: jax.Array  # float32 [out]: smoothed weight ~= w.T * scale
    inv_smooth: jax.Array  # float32 [in]: 1 / s, applied to the activations before they are quantised

    @property
    def shape(self) -> tuple[int, int]:
        return self.w.shape[1], self.w.shape[0]


QUANTIZED = (FP8Linear, Int8Linear)  # the weight types `models.layer.project` dispatches on


@struct.dataclass
class Bf16Prefill:
    """A float32 linear weight [in, out] and its bfloat16 copy: `models.layer.project` multiplies
    `BF16_MIN_ROWS` or more rows (prefill chunks) with the copy, fewer (decode) with the float32
    weight. On a CPU, XLA's bf16 products of a few rows are slower than float32's (SmolLM2's
    576 x 1536 weight on 2 cores: one row 400 vs 110 us, two 120 vs 100, eight 91 vs 148):
    decode keeps float32's speed and numbers, prefill gets bf16's."""

    w: jax.Array  # float32 [in, out]
    w16: jax.Array  # bfloat16 [in, out]


def bf16_linear(params, keep_float32: bool = False):
    """`params` with every layer's float linear weights (LINEAR_NAMES) in bfloat16; the embedding,
    norms, biases and LM head unchanged. `models.layer.project` multiplies a bfloat16 weight with
    bfloat16 activations and float32 accumulation, the result back in the compute dtype: on CPUs
    with bf16 matrix units (AVX512-BF16, AMX) XLA's product runs ~1.8x faster than float32's
    at prefill sizes (SmolLM2's projections on the 2-core CI machine) and the weights take half
    the memory, but its products of one to a few rows are slower than float32's. The rounding is the GPU path's (bfloat16
    operands, float32 sums); the residual stream, norms, attention and logits stay float32.
    keep_float32: keep each weight beside its copy (`Bf16Prefill`: "bf16-prefill", 1.5x the
    linear weights' float32 memory) so that decode's few-row products stay float32."""
    if is_quantized(params):
        raise ValueError(f"the params are already quantised ({weights_mode(params)}); bf16 applies to float weights")

    def cast(w):
        if not jnp.issubdtype(w.dtype, jnp.floating):
            return w
        return Bf16Prefill(w, w.astype(jnp.bfloat16)) if keep_float32 else w.astype(jnp.bfloat16)
    layers = tuple(Arrays({n: cast(w) if n in LINEAR_NAMES else w for n, w in layer.items()})
                   for layer in params.layers)
    return params.replace(layers=layers)


def auto_weights(params, dtype: str | None, backend: str) -> str | None:
    """What `weights="auto"` means: "bf16-prefill" on a CPU when the compute dtype was not chosen
    (`dtype` None) and the layers' linear weights are float32 (a float32 checkpoint: the default
    model's), else None (the weights as loaded). An explicit `dtype="float32"` keeps exact float32
    products (transformers' numbers to ~1e-6)."""
    if backend != "cpu" or dtype is not None or is_quantized(params):
        return None
    ws = [w for layer in params.layers for n, w in layer.items() if n in LINEAR_NAMES]
    return "bf16-prefill" if ws and all(getattr(w, "dtype", None) == jnp.float32 for w in ws) else None


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown weight quantisation {mode!r}; choose from {', '.join(MODES)}")
    return mode


INT8_MAX = 127.0


def round_half_even(y: jax.Array) -> jax.Array:
    """jnp.round (to the nearest integer, ties to even) through floor, for code that has no round
    (the Pallas Triton lowering: the fused append's in-kernel quantiser). Exact for |y| < 2**23."""
    f = jnp.floor(y)
    frac = y - f
    f_even = jnp.floor(f * 0.5) * 2.0 == f
    return jnp.where(frac > 0.5, f + 1.0, jnp.where(frac < 0.5, f, jnp.where(f_even, f, f + 1.0)))


def quantize_amax(x: jax.Array, axis: int, dtype=FP8, rounding=jnp.round) -> tuple[jax.Array, jax.Array]:
    """x -> (e4m3 or int8, float32 scales with `axis` kept at size 1): each slice along `axis`
    scaled so its largest magnitude maps to the format's largest value (e4m3: 448, the nearest
    e4m3 value; int8: 127, rounded to the nearest integer by `rounding`: `round_half_even` inside
    a Triton kernel). The one quantiser of weights, activations and KV pages (`lserve_jax.kv8`)."""
    int8 = jnp.dtype(dtype) == jnp.dtype(jnp.int8)
    if not int8 and jnp.dtype(dtype) != jnp.dtype(FP8):
        raise ValueError(f"8-bit quantisation is to float8_e4m3fn or int8, got {jnp.dtype(dtype)}")
    top = INT8_MAX if int8 else FP8_MAX
    xf = jnp.asarray(x, jnp.float32)
    scale = jnp.maximum(jnp.max(jnp.abs(xf), axis=axis, keepdims=True), _TINY) / top
    y = xf / scale
    return jnp.clip(rounding(y) if int8 else y, -top, top).astype(dtype), scale


def smoothing(act_amax: jax.Array, w: jax.Array, alpha: float = SMOOTH_ALPHA) -> jax.Array:
    """SmoothQuant's per-input-channel factors s [in] for activations whose channels reach
    `act_amax` [in] and the weight w [in, out]: amax_x^alpha / amax_w^(1 - alpha), clamped away from
    0 (a channel that is always zero keeps s = 1)."""
    ax = jnp.asarray(act_amax, jnp.float32)
    aw = jnp.max(jnp.abs(jnp.asarray(w, jnp.float32)), axis=1)
    s = jnp.maximum(ax, 1e-5) ** alpha / jnp.maximum(aw, 1e-5) ** (1 - alpha)
    return jnp.where((ax > 0) & (aw > 0), jnp.clip(s, 1e-4, 1e4), 1.0)


def quantize_weight_int8(w: jax.Array, act_amax: jax.Array | None, alpha: float = SMOOTH_ALPHA) -> Int8Linear:
    """w [in, out] -> Int8Linear, smoothed by the activations' per-channel maxima `act_amax` [in]
    (None: no smoothing)."""
    s = jnp.ones((w.shape[0],), jnp.float32) if act_amax is None else smoothing(act_amax, w, alpha)
    q, scale = quantize_amax(jnp.asarray(w, jnp.float32) * s[:, None], 0, jnp.int8)
    return Int8Linear(q.T, scale[0], 1.0 / s)


def int8_matmul(x: jax.Array, qw: Int8Linear) -> jax.Array:
    """x [..., in] @ the weight -> float32 [..., out]: smoothed activations quantised per row to
    int8, an int8 x int8 product accumulated in int32, both scales on the result."""
    xq, sx = quantize_amax(x.astype(jnp.float32) * qw.inv_smooth, -1, jnp.int8)
    dims = (((x.ndim - 1,), (1,)), ((), ()))
    y = jax.lax.dot_general(xq, qw.w, dims, preferred_element_type=jnp.int32)
    return y.astype(jnp.float32) * sx * qw.scale


def quantize_weight(w: jax.Array, *, quantize_activations: bool = True) -> FP8Linear:
    """w [in, out] (any float dtype) -> FP8Linear, scales from each output channel's amax."""
    q, scale = quantize_amax(w, 0)  # [in, out], [1, out]
    return FP8Linear(q.T, scale[0], quantize_activations)


def dequantize_weight(qw: FP8Linear | Int8Linear, dtype=jnp.float32) -> jax.Array:
    """The [in, out] weight the 8-bit values stand for (an INT8 one unsmoothed: x @ it == x @ W)."""
    w = qw.w.astype(jnp.float32).T * qw.scale
    if isinstance(qw, Int8Linear):
        w = w * qw.inv_smooth[:, None]
    return w.astype(dtype)


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


def quantize_params(params, mode: str = "fp8", act_amax=None, alpha: float = SMOOTH_ALPHA):
    """`params` with every layer's linear weights (LINEAR_NAMES) 8-bit (FP8Linear or Int8Linear);
    the embedding, the norms, the biases and the LM head unchanged. Quantising twice is an error.

    act_amax ("int8" only, required there): per layer, {linear name: float32 [in]} the largest
    magnitude of each input channel over calibration text (`smoothquant.activation_amax`)."""
    check_mode(mode)
    if is_quantized(params):
        raise ValueError(f"the params are already quantised ({weights_mode(params)})")
    if mode == "int8":
        if act_amax is None or len(act_amax) != len(params.layers):
            raise ValueError("int8 weights need the activations' channel maxima of every layer "
                             "(lserve_jax.smoothquant.activation_amax over calibration text)")
        quant = [lambda n, w, a=a: quantize_weight_int8(w, a[n], alpha) for a in act_amax]
    else:
        quant = [lambda n, w: quantize_weight(w, quantize_activations=mode == "fp8")] * len(params.layers)
    layers = tuple(Arrays({n: q(n, w) if n in LINEAR_NAMES else w for n, w in layer.items()})
                   for q, layer in zip(quant, params.layers))
    return params.replace(layers=layers)


def abstract_quantized(abstract, mode: str):
    """ShapeDtypeStructs of `quantize_params(params, mode)` for abstract [in, out] params (the
    restore target of a checkpoint converted with --quantize)."""
    check_mode(mode)

    def q(w):
        i, o = w.shape
        if mode == "int8":
            return Int8Linear(jax.ShapeDtypeStruct((o, i), jnp.int8), jax.ShapeDtypeStruct((o,), jnp.float32),
                              jax.ShapeDtypeStruct((i,), jnp.float32))
        return FP8Linear(jax.ShapeDtypeStruct((o, i), FP8), jax.ShapeDtypeStruct((o,), jnp.float32), mode == "fp8")

    layers = tuple(Arrays({n: q(w) if n in LINEAR_NAMES else w for n, w in layer.items()})
                   for layer in abstract.layers)
    return abstract.replace(layers=layers)


def cast_params(params, dtype):
    """Every float array to `dtype` except the 8-bit weights and their scales."""
    return jax.tree.map(lambda x: x if isinstance(x, QUANTIZED) else x.astype(dtype), params,
                        is_leaf=lambda x: isinstance(x, QUANTIZED))


def is_quantized(params) -> bool:
    return weights_mode(params) is not None


def weights_mode(params) -> str | None:
    """"fp8" / "fp8-weight-only" / "int8" for quantised params, else None."""
    for layer in params.layers:
        for _, w in layer.items():
            if isinstance(w, Int8Linear):
                return "int8"
            if isinstance(w, FP8Linear):
                return "fp8" if w.quantize_activations else "fp8-weight-only"
    return None
