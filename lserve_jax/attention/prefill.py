"""Prefill attention dispatch: pick an implementation, validate shapes at the boundary.

``prefill_attention(q, k, v, lengths, *, num_retrieval, sink, local, impl, scale)``

impl:
  "reference"     pure jnp (any backend); the semantics, materialises [T, T] scores.
  "pallas"        the unified block-sparse Pallas kernel (interpret mode off GPU).
  "xla", "cudnn"  dense causal baselines via ``jax.nn.dot_product_attention``; valid only
                  when every head attends densely (no streaming heads, or a window >= T).
  "cudnn+pallas", "xla+pallas"
                  retrieval heads through the dense engine, streaming heads through the
                  Pallas kernel, outputs concatenated along heads.
  "auto"          CPU: "reference". GPU: the fastest correct combination measured on the H200
                  (bench/prefill_attn.py): see ``_auto_impl``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lserve_jax.pallas import compat
from lserve_jax.pallas.prefill import (
    prefill_attention_pallas,
    prefill_attention_reference,
    validate_prefill_args,
)

__all__ = ["prefill_attention", "IMPLS"]

IMPLS = ("auto", "reference", "pallas", "xla", "cudnn", "cudnn+pallas", "xla+pallas")


def _dense_causal(q, k, v, lengths, scale, implementation: str) -> jax.Array:
  """Dense causal GQA attention through jax.nn.dot_product_attention; rows >= length zeroed."""
  if implementation == "cudnn":
    if not compat.on_gpu():
      raise ValueError(
          f"impl='cudnn' needs a GPU backend; default backend is {jax.default_backend()!r}")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
      raise ValueError(f"impl='cudnn' needs bfloat16/float16 inputs, got {q.dtype=}")
  t = q.shape[1]
  out = jax.nn.dot_product_attention(
      q, k, v, scale=scale, is_causal=True,
      query_seq_lengths=lengths, key_value_seq_lengths=lengths,
      implementation=implementation)
  row_ok = jnp.arange(t)[None, :] < lengths[:, None]
  return jnp.where(row_ok[:, :, None, None], out, jnp.zeros((), out.dtype)).astype(q.dtype)


def _auto_impl(q, num_retrieval: int, dense_all: bool) -> str:
  """The GPU choice, from bench/prefill_attn.py on the H200 (see bench/results/).

  Measured (llama3-8b heads, bf16, sink 128 / local 8192, 4 of 8 KV heads retrieval):
  retrieval heads through cuDNN + streaming heads through the Pallas kernel beat the single
  Pallas kernel at every T in 8K..256K (e.g. 153 vs 179 ms at 128K), and cuDNN beats the
  kernel on dense causal attention (~550 vs ~445 TFLOP/s).
  """
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    return "pallas"  # cuDNN flash attention takes half precision only
  if dense_all:
    return "cudnn"
  if num_retrieval == 0:
    return "pallas"
  return "cudnn+pallas"


def prefill_attention(q, k, v, lengths, *, num_retrieval: int, sink: int, local: int,
                      impl: str = "auto", scale: float | None = None) -> jax.Array:
  """LServe prefill attention.

  q: [B, T, Hq, D]; k, v: [B, T, Hkv, D]; lengths: int32[B]. KV heads [0, num_retrieval) are
  retrieval heads (causal), the rest streaming heads (causal and (j < sink or i - j < local)).
  Returns [B, T, Hq, D] in q.dtype, rows i >= lengths[b] zero.
  """
  validate_prefill_args(q, k, v, lengths, num_retrieval=num_retrieval, sink=sink, local=local)
  if impl not in IMPLS:
    raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  g = hq // hkv
  if scale is None:
    scale = 1.0 / math.sqrt(d)
  lengths = lengths.astype(jnp.int32)
  # Every head dense: no streaming heads, or the streaming window covers the sequence.
  dense_all = num_retrieval == hkv or sink >= t or local >= t

  if impl == "auto":
    if not compat.on_gpu():
      impl = "reference"
    else:
      choice = _auto_impl(q, num_retrieval, dense_all)
      if choice == "pallas":
        return prefill_attention(q, k, v, lengths, num_retrieval=num_retrieval, sink=sink,
                                 local=local, impl="pallas", scale=scale)
      try:  # cuDNN rejects some configurations at trace time: fall back to the kernel.
        return prefill_attention(q, k, v, lengths, num_retrieval=num_retrieval, sink=sink,
                                 local=local, impl=choice, scale=scale)
      except (ValueError, NotImplementedError, RuntimeError):
        impl = "pallas"

  kw = dict(num_retrieval=num_retrieval, sink=sink, local=local, scale=scale)
  if impl == "reference":
    return prefill_attention_reference(q, k, v, lengths, **kw)
  if impl == "pallas":
    return prefill_attention_pallas(q, k, v, lengths, **kw)
  if impl in ("xla", "cudnn"):
    if not dense_all:
      raise ValueError(
          f"impl={impl!r} is dense causal attention and cannot express streaming heads "
          f"(num_retrieval={num_retrieval} < Hkv={hkv}, sink={sink}, local={local}, T={t}); "
          f"use 'pallas', '{impl}+pallas' or 'auto'")
    return _dense_causal(q, k, v, lengths, scale, impl)

  # Hybrid: retrieval heads through the dense engine, streaming heads through the kernel.
  engine = impl.split("+")[0]
  if dense_all:
    return _dense_causal(q, k, v, lengths, scale, engine)
  r = num_retrieval
  if r == 0:
    return prefill_attention_pallas(q, k, v, lengths, **kw)
  out_r = _dense_causal(q[:, :, :r * g], k[:, :, :r], v[:, :, :r], lengths, scale, engine)
  out_s = prefill_attention_pallas(
      q[:, :, r * g:], k[:, :, r:], v[:, :, r:], lengths,
      num_retrieval=0, sink=sink, local=local, scale=scale)
  return jnp.concatenate([out_r, out_s], axis=2)
