"""cuDNN / XLA backend of prefill: dense causal attention through jax.nn.dot_product_attention.

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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

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


def _dense_causal(q, k, v, lengths, scale: float, engine: str):
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
        return _dense_causal(q, k, v, lengths, scale, engine)

    return run


def _hybrid(engine: str):
    def run(q, k, v, lengths, *, num_retrieval, sink, local, scale, q_offset=None, options):
        if q_offset is not None:
            raise Unsupported(f"{engine!r}+triton has no offset (chunked) form")
        if every_head_dense(q, k, num_retrieval=num_retrieval, sink=sink, local=local):
            return _dense_causal(q, k, v, lengths, scale, engine)
        kw = dict(sink=sink, local=local, scale=scale, options=options)
        r = num_retrieval
        if r == 0:
            return triton.prefill(q, k, v, lengths, num_retrieval=0, **kw)
        triton.check_prefill(q, options)  # both halves' checks before the first trace
        _check_engine(engine, q)
        g = q.shape[2] // k.shape[2]
        out_r = _dense_causal(q[:, :, :r * g], k[:, :, :r], v[:, :, :r], lengths, scale, engine)
        out_s = triton.prefill(q[:, :, r * g:], k[:, :, r:], v[:, :, r:], lengths, num_retrieval=0, **kw)
        return jnp.concatenate([out_r, out_s], axis=2)

    return run


# explicit choices only (no platform rank): they refuse streaming heads
register("prefill", "cudnn")(_dense("cudnn"))
register("prefill", "xla")(_dense("xla"))
register("prefill", "cudnn+triton", priority={"gpu": 30})(_hybrid("cudnn"))
register("prefill", "xla+triton")(_hybrid("xla"))
