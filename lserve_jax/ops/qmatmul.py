"""The 8-bit weight product: the API. Shapes are validated here.

    y = qmatmul(x, qw)          # x [..., in] @ the FP8Linear / Int8Linear weight -> float32 [..., out]

Implementations: "xla" (the default everywhere: exactly `quant.fp8_matmul` / `quant.int8_matmul`,
the W8A8 GEMMs or the W8A16 product) and "triton" (`pallas.qmatmul`, only when a choice names it:
at most `MAX_ROWS` rows after flattening the leading axes; options block_n, block_k, split_k,
num_warps, num_stages; measured slower in the decode step, see `lserve_jax.quant`). The Triton
kernel is weight-only (W8A16) for both weight types: the activations are not quantised (an
Int8Linear's are multiplied by its `inv_smooth` first).
`models.layer.project` dispatches every 8-bit weight here with the default order.
"""

from __future__ import annotations

import jax

from ..quant import QUANTIZED
from .registry import REGISTRY, OpChoice

__all__ = ["qmatmul"]


def qmatmul(x: jax.Array, qw, *, choice: OpChoice = OpChoice()) -> jax.Array:
    """x [..., in] @ qw (an `FP8Linear` or `Int8Linear` standing for an [in, out] weight) ->
    float32 [..., out] (the caller casts)."""
    if not isinstance(qw, QUANTIZED):
        raise ValueError(f"qmatmul takes an FP8Linear or Int8Linear weight, got {type(qw).__name__}")
    if x.ndim < 1 or x.shape[-1] != qw.shape[0]:
        raise ValueError(f"qmatmul: x [..., in] does not match the weight: {x.shape=} weight [in, out]={qw.shape}")
    if not isinstance(choice, OpChoice):
        raise ValueError(f"choice must be an OpChoice, got {choice!r}")
    return REGISTRY.dispatch("qmatmul", choice, x, qw)
