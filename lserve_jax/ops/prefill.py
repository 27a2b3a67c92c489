"""Prefill attention: the API. Shapes are validated here; the backends run it.

Semantics (`pallas.prefill` has them in full): q [B, T, Hq, D], k, v [B, T, Hkv, D],
lengths int32[B]; KV heads [0, num_retrieval) are retrieval heads (causal), the others
streaming heads (causal and (j < sink or i - j < local)). Output [B, T, Hq, D] in q.dtype,
rows i >= lengths[b] zero. With `q_offset` int32[B] (a chunk of a longer sequence), k, v are
[B, Tk >= T, Hkv, D] and query row i sits at key position q_offset[b] + i: every position
above is shifted by it, and keys j < q_offset[b] + lengths[b] are valid.

Implementations (see `registry` for the default order):
  "reference"      pure jnp, any platform; materialises [T, T] scores.
  "triton"         the block-sparse Pallas kernel (interpret mode on CPU when named); options
                   block_m, block_k, num_warps, num_stages (default `default_block_config`).
  "cudnn", "xla"   dense causal attention through jax.nn.dot_product_attention: Unsupported
                   unless every head attends densely.
  "cudnn+triton", "xla+triton"
                   retrieval heads through the dense engine, streaming heads through the
                   Triton kernel, concatenated along heads.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ..pallas.prefill import validate_prefill_args
from .registry import REGISTRY, OpChoice

__all__ = ["every_head_dense", "prefill_attention"]


def every_head_dense(q, k, *, num_retrieval: int, sink: int, local: int) -> bool:
    """No streaming heads, or a streaming window that covers the whole sequence."""
    t, hkv = k.shape[1], k.shape[2]
    return num_retrieval == hkv or sink >= t or local >= t


def prefill_attention(q, k, v, lengths, *, num_retrieval: int, sink: int, local: int,
                      scale: float | None = None, q_offset: jax.Array | None = None,
                      choice: OpChoice = OpChoice()) -> jax.Array:
    """LServe prefill attention of one layer. Returns [B, T, Hq, D] in q.dtype.

    q: [B, T, Hq, D]; k, v: [B, T, Hkv, D] ([B, Tk, Hkv, D] with q_offset); lengths: int32[B];
    num_retrieval, sink, local: static ints; scale: softmax scale (default 1/sqrt(D));
    q_offset: int32[B] position of each row's first query among the keys (None: 0, Tk = T);
    choice: which implementations to try and their tuning options.
    """
    validate_prefill_args(q, k, v, lengths, num_retrieval=num_retrieval, sink=sink, local=local,
                          q_offset=q_offset)
    if not isinstance(choice, OpChoice):
        raise ValueError(f"choice must be an OpChoice, got {choice!r}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale=}")
    return REGISTRY.dispatch("prefill", choice, q, k, v, lengths.astype(jnp.int32),
                             num_retrieval=int(num_retrieval), sink=int(sink), local=int(local),
                             scale=scale, q_offset=None if q_offset is None else q_offset.astype(jnp.int32))
