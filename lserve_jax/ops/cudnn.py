"""cuDNN / XLA backend: dense causal prefill through jax.nn.dot_product_attention, and the dense
layout's decode through cuDNN's paged flash attention.

* "cudnn", "xla": dense causal GQA attention. Unsupported unless every head attends densely
  (no streaming heads, or a window covering the sequence): neither engine takes sinks.
* "cudnn+triton", "xla+triton": the retrieval heads (the first num_retrieval KV heads and
  their query heads) through the dense engine, the streaming heads through the Triton kernel,
  concatenated along heads. With every head dense, the dense engine alone; with no retrieval
  head, the kernel alone.

"cudnn+triton" is first in the GPU default order: measured on the H200 (bench/prefill_attn.py,
llama3-8b heads, bf16, sink 128 / local 8192, 4 of 8 KV heads retrieval) it beats the single
Triton kernel at every T in 8K..256K (e.g. 153 vs 179 ms at 128K), and cuDNN beats the kernel
on dense causal attention (~550 vs ~445 TFLOP/s). cuDNN needs a GPU and half precision; its
own trace-time rules (head dim, architecture, library present) are turned into Unsupported
around that one call, so the dispatcher falls through to the Triton kernel.

Neither engine has the offset (chunked) form: with `q_offset` every implementation here raises
Unsupported, and the dispatcher runs the chunk through the Triton kernel's offset form.

Decode "cudnn" (first in the GPU default order): the dense layout's decode (`dense=True`: every
page of each sequence, no streaming heads, bf16/f16 pages), the dense serving engine's baseline.
cuDNN's paged attention reads K/V blocks through a page table [B', 1, N, 1] from a pool
[blocks, heads, block, D]. Our pools are per KV head ([R, P, page, D]), so each (sequence, KV
head) becomes one cuDNN batch row with one KV head and its G query heads (GQA), over the pool
viewed as R*P one-head blocks (a reshape, no copy), its page-table row offset by h*P. The
primitive is private (`jax._src.cudnn.fused_attention_stablehlo`, the same in jax 0.10-0.11);
its public wrapper `paged_attention` insists that the pool hold exactly B' x N blocks, which a
serving pool (any size, shared by all rows) never does, so the primitive is called without that
wrapper check (cuDNN itself addresses blocks through the table). Anything it rejects, a missing
module included, is Unsupported and decode falls through to the Triton kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..kv8 import KV8
from ..pallas import compat
from . import triton
from .prefill import every_head_dense
from .registry import Unsupported, register

_HALF = (jnp.bfloat16, jnp.float16)


def _check_engine(engine: str, q) -> None:
    if engine != "cudnn":
        return
    if not compat.on_gpu():
        raise Unsupported(f"cuDNN needs a GPU; the default backend is {compat.platform()!r}")
    if q.dtype not in _HALF:
        raise Unsupported(f"cuDNN flash attention takes bfloat16/float16, got {q.dtype=}")


def dense_causal(q, k, v, lengths, scale: float, engine: str):
    """Dense causal GQA attention; rows >= length zeroed. q [B, T, Hq, D], k/v [B, T, Hkv, D]."""
    _check_engine(engine, q)
    kw = dict(scale=scale, is_causal=True, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
              implementation=engine)
    if engine == "cudnn":
        try:
            out = jax.nn.dot_product_attention(q, k, v, **kw)
        except (NotImplementedError, RuntimeError) as e:
            # NotImplementedError: cuDNN's head-dim / architecture rules; RuntimeError: no cuDNN
            # (or, called eagerly, a cuDNN graph XLA could not build)
            raise Unsupported(f"cuDNN rejected {q.shape=} {k.shape=} {q.dtype}: {type(e).__name__}: {e}") from e
    else:
        out = jax.nn.dot_product_attention(q, k, v, **kw)
    row_ok = jnp.arange(q.shape[1])[None, :] < lengths[:, None]  # [B, T]
    return jnp.where(row_ok[:, :, None, None], out, jnp.zeros((), out.dtype)).astype(q.dtype)


def _dense(engine: str):
    def run(q, k, v, lengths, *, num_retrieval, sink, local, scale, q_offset=None, options):
        del options  # the dense engines take no tuning
        if q_offset is not None:
            raise Unsupported(f"{engine!r} causal attention has no offset (chunked) form")
        if not every_head_dense(q, k, num_retrieval=num_retrieval, sink=sink, local=local):
            raise Unsupported(
                f"{engine!r} is dense causal attention and cannot express streaming heads "
                f"(num_retrieval={num_retrieval} < Hkv={k.shape[2]}, {sink=}, {local=}, T={q.shape[1]}); "
                f"use 'triton', '{engine}+triton' or the default order")
        return dense_causal(q, k, v, lengths, scale, engine)

    return run


def _hybrid(engine: str):
    def run(q, k, v, lengths, *, num_retrieval, sink, local, scale, q_offset=None, options):
        if q_offset is not None:
            raise Unsupported(f"{engine!r}+triton has no offset (chunked) form")
        if every_head_dense(q, k, num_retrieval=num_retrieval, sink=sink, local=local):
            return dense_causal(q, k, v, lengths, scale, engine)
        kw = dict(sink=sink, local=local, scale=scale, options=options)
        r = num_retrieval
        if r == 0:
            return triton.prefill(q, k, v, lengths, num_retrieval=0, **kw)
        triton.check_prefill(q, options)  # both halves' checks before the first trace
        _check_engine(engine, q)
        g = q.shape[2] // k.shape[2]
        out_r = dense_causal(q[:, :, :r * g], k[:, :, :r], v[:, :, :r], lengths, scale, engine)
        out_s = triton.prefill(q[:, :, r * g:], k[:, :, r:], v[:, :, r:], lengths, num_retrieval=0, **kw)
        return jnp.concatenate([out_r, out_s], axis=2)

    return run


# explicit choices only (no platform rank): they refuse streaming heads
register("prefill", "cudnn")(_dense("cudnn"))
register("prefill", "xla")(_dense("xla"))
register("prefill", "cudnn+triton", priority={"gpu": 30})(_hybrid("cudnn"))
register("prefill", "xla+triton")(_hybrid("xla"))


def _cudnn_attention_module():
    """jax's private cuDNN attention module, or Unsupported if this jax lacks what decode uses."""
    try:
        from jax._src.cudnn import fused_attention_stablehlo as fas
    except ImportError as e:  # a jax build without the cuDNN module
        raise Unsupported(f"no cuDNN attention module in this jax: {e}") from e
    needed = ("_dot_product_attention", "check_cudnn_version", "MaskType", "AttentionLayout")
    missing = [n for n in needed if not hasattr(fas, n)]
    if missing:
        raise Unsupported(f"this jax's cuDNN attention module lacks {missing}")
    return fas


def paged_operands(q, k_pages, v_pages, page_table, lengths):
    """The dense paged decode as cuDNN batch rows (sequence, KV head): query [B*R, G, 1, D],
    key/value [R*P, 1, page, D] (the pools, reshaped), page table int32[B*R, 1, N, 1] into them,
    q and kv lengths int32[B*R]."""
    b, hq, d = q.shape
    r, p, page, _ = k_pages.shape
    n = page_table.shape[1]
    table = jnp.clip(page_table.astype(jnp.int32), 0, p - 1)[:, None, :] + (jnp.arange(r, dtype=jnp.int32) * p)[:, None]
    kv_len = jnp.repeat(jnp.maximum(lengths.astype(jnp.int32), 1), r)  # row b*R + h
    return (q.reshape(b * r, hq // r, 1, d), k_pages.reshape(r * p, 1, page, d), v_pages.reshape(r * p, 1, page, d),
            table.reshape(b * r, 1, n, 1), jnp.ones((b * r,), jnp.int32), kv_len)


@register("decode", "cudnn", priority={"gpu": 30})
def decode(q, k_pages, v_pages, ring_k, ring_v, page_table, lengths, sel_pages, sel_count, *, mode, scale,
           dense=False, options):
    del sel_pages, sel_count, options  # every page through the table; cuDNN takes no tuning
    if not dense or mode != "kv_head":
        raise Unsupported("cuDNN's paged attention reads every page of a sequence; a page selection "
                          "(sparse decode) goes to the Triton kernel")
    if ring_k.shape[0]:
        raise Unsupported(f"cuDNN's paged attention has no streaming heads (a ring of {ring_k.shape[0]} KV heads)")
    if isinstance(k_pages, KV8) or isinstance(v_pages, KV8):
        raise Unsupported("cuDNN's paged attention reads no 8-bit KV pages")
    _check_engine("cudnn", q)
    if k_pages.dtype != q.dtype or v_pages.dtype != q.dtype:
        raise Unsupported(f"cuDNN takes q and pages of one dtype: {q.dtype=} {k_pages.dtype=}")
    fas = _cudnn_attention_module()
    query, key, value, table, q_len, kv_len = paged_operands(q, k_pages, v_pages, page_table, lengths)
    none = jnp.zeros((0,), q.dtype)
    try:
        version = fas.check_cudnn_version()
        out = fas._dot_product_attention(
            query, key, value, none, q_len, kv_len, none, none, table, table, float(scale), 42, 0.0,
            (False, False), fas.MaskType.PADDING, fas.AttentionLayout.BNTH.value, None, version, False)
    except (NotImplementedError, RuntimeError, TypeError, ValueError) as e:
        # cuDNN's head-dim / architecture rules, no cuDNN, or a jax whose private signature moved
        raise Unsupported(f"cuDNN paged attention rejected {q.shape=} {k_pages.shape=}: "
                          f"{type(e).__name__}: {e}") from e
    return out.reshape(q.shape)
