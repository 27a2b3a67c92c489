"""The 8-bit weight product: the API. Shapes are validated here.

    y = qmatmul(x, qw)          # x [..., in] @ the FP8Linear / Int8Linear weight -> float32 [..., out]

Implementations: "triton" (`pallas.qmatmul`, the GPU default for at most `MAX_ROWS` rows after
flattening the leading axes: decode; options block_n, block_k, split_k, num_warps, num_stages)
and "xla" (everywhere, last: exactly `quant.fp8_matmul` / `quant.int8_matmul`, the W8A8 GEMMs
or the W8A16 product). The Triton kernel is weight-only (W8A16) for both weight types: the
activations are not quantised (an Int8Linear's are multiplied by its `inv_smooth` first), so on
a GPU decode's products are at least as accurate as prefill's W8A8 ones (`lserve_jax.quant`).
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
