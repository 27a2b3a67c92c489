"""Decode attention: the API. Shapes are validated here; the backends run it.

`decode_attention` splits the query heads of one layer:

* retrieval query heads [0, R*G) attend to the pages their selection names (token-exact: the
  newest page is masked by length);
* streaming query heads [R*G, Hq) attend to their KV head's valid ring slots
  [0, min(length, W)); the ring is viewed as W / pb contiguous pages of pb tokens per sequence
  (pb = the largest power of 2 dividing W, at most 128).

Implementations: "triton" (both halves in one `pallas.decode.sparse_decode` launch; options are
its tuning kwargs), "cpu" (`ops/cpu.py`: only the slots in use, the group's pages read once when
the selection is every page; first on CPU) and "reference" (each half through
`paged_decode_reference`, every slot of the selection).
"cudnn" (`ops/cudnn.py`, first on GPU) runs only the dense layout's decode (`dense=True`: every
page, no streaming heads, bf16/f16 pages) through cuDNN's paged flash attention.
`dense_decode_attention` is the dense baseline over a contiguous cache (cuDNN or XLA).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from ..pallas.decode import ring_page
from .registry import REGISTRY, OpChoice

__all__ = ["MODES", "decode_attention", "dense_decode_attention", "retrieval_slots", "ring_slots",
           "two_launches", "validate_decode_args"]

# Who owns a page selection: each query head (LServe) or each KV head (shared by its GQA group).
MODES = ("query_head", "kv_head")


def validate_decode_args(q, k_pages, v_pages, ring_k, ring_v, page_table, lengths, sel_pages, sel_count,
                         mode):
    """ValueError naming the offending shape; returns (b, hq, d, r, s, g)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if q.ndim != 3:
        raise ValueError(f"q must be [B, Hq, D], got {q.shape=}")
    b, hq, d = q.shape
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape or k_pages.shape[-1] != d:
        raise ValueError(f"k/v pages must be [R, P, page, D] with q's D: {k_pages.shape=} {v_pages.shape=} {q.shape=}")
    if ring_k.ndim != 4 or ring_k.shape != ring_v.shape or ring_k.shape[1] != b or ring_k.shape[-1] != d:
        raise ValueError(f"ring k/v must be [S, B, W, D]: {ring_k.shape=} {ring_v.shape=} {q.shape=}")
    r, s = k_pages.shape[0], ring_k.shape[0]
    if r + s == 0 or hq % (r + s):
        raise ValueError(f"q heads must be a multiple of R + S kv heads: {q.shape=} {k_pages.shape=} {ring_k.shape=}")
    g = hq // (r + s)
    if page_table.ndim != 2 or page_table.shape[0] != b:
        raise ValueError(f"page_table must be [B, N]: {page_table.shape=} {q.shape=}")
    if lengths.shape != (b,):
        raise ValueError(f"lengths must be [B]: {lengths.shape=} {q.shape=}")
    hsel = r * g if mode == "query_head" else r
    if sel_pages.ndim != 3 or sel_pages.shape[:2] != (b, hsel):
        raise ValueError(f"sel_pages must be [B, {hsel}, K] in {mode} mode: {sel_pages.shape=}")
    if sel_count.shape != (b, hsel):
        raise ValueError(f"sel_count must be [B, {hsel}]: {sel_count.shape=}")
    return b, hq, d, r, s, g


def retrieval_slots(q, page_table, sel_pages, *, mode: str, g: int):
    """q viewed per program head (no copy) and the physical / logical page of each slot.

    Returns qh [B, Hsel, M, D] (M = 1 query row per program in query_head mode, the G rows of
    the group in kv_head mode), phys and lg int32[B, Hsel, K].
    """
    b, hq, d = q.shape
    n = page_table.shape[1]
    lg = jnp.clip(sel_pages, 0, n - 1)
    phys = jnp.take_along_axis(page_table, lg.reshape(b, -1), axis=1).reshape(lg.shape)
    if mode == "query_head":
        qh = q.reshape(b, hq, 1, d)  # one program head per query head: its own pages
    else:
        qh = q.reshape(b, hq // g, g, d)  # one program head per GQA group: pages read once
    return qh, phys, lg


def ring_slots(ring_k, ring_v, lengths):
    """The ring as a pool of pages: (k [S, B*W/pb, pb, D], v, page ids int32[B, S, W/pb],
    logical ids, counts int32[B, S], ring lengths int32[B])."""
    s, b, w, d = ring_k.shape
    pb = ring_page(w)
    nw = w // pb
    kp = ring_k.reshape(s, b * nw, pb, d)
    vp = ring_v.reshape(s, b * nw, pb, d)
    j = jnp.arange(nw, dtype=jnp.int32)
    ids = jnp.broadcast_to((jnp.arange(b, dtype=jnp.int32)[:, None] * nw + j)[:, None, :], (b, s, nw))
    lg = jnp.broadcast_to(j, (b, s, nw))
    ring_len = jnp.minimum(lengths, w).astype(jnp.int32)
    counts = jnp.broadcast_to(((ring_len + pb - 1) // pb)[:, None], (b, s))
    return kp, vp, ids, lg, counts, ring_len


def two_launches(run: Callable, q, k_pages, v_pages, ring_k, ring_v, page_table, lengths, sel_pages, sel_count,
                 *, mode: str, scale: float):
    """Retrieval heads, then streaming heads, each through `run` (paged_decode or its reference,
    same signature); program heads take their rows straight from q (head_offset), no copies."""
    b, hq, d = q.shape
    r, s = k_pages.shape[0], ring_k.shape[0]
    g = hq // (r + s)
    outs = []
    if r:
        qh, phys, lg = retrieval_slots(q, page_table, sel_pages, mode=mode, g=g)
        o = run(qh, k_pages, v_pages, phys, lg, sel_count.astype(jnp.int32), lengths, scale=scale, head_offset=0)
        outs.append(o.reshape(b, r * g, d))
    if s:
        kp, vp, ids, lg, counts, ring_len = ring_slots(ring_k, ring_v, lengths)
        o = run(q.reshape(b, r + s, g, d), kp, vp, ids, lg, counts, ring_len, scale=scale, head_offset=r)
        outs.append(o.reshape(b, s * g, d))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def decode_attention(q, k_pages, v_pages, ring_k, ring_v, page_table, lengths, sel_pages, sel_count,
                     *, mode: str, scale: float | None = None, dense: bool = False, choice: OpChoice = OpChoice()):
    """One layer's sparse decode attention. Returns [B, Hq, D] in q's dtype.

    q: [B, Hq, D] (post-RoPE); k_pages, v_pages: [R, P, page, D]; ring_k, ring_v: [S, B, W, D];
    page_table: int32[B, N]; lengths: int32[B] (including the current token); sel_pages:
    int32[B, Hsel, K] logical page ids, sel_count: int32[B, Hsel], Hsel = R*G (query_head) or
    R (kv_head). dense: the selection is every page of each sequence in table order (the dense
    layout: sel_pages = arange, sel_count = the pages in use, kv_head mode), so an implementation
    that walks the page table itself (cuDNN's paged attention) may ignore sel_pages / sel_count.
    choice: implementations to try and their options (for "triton": the tuning kwargs of
    `sparse_decode`; the cuDNN implementation takes none and ignores them).
    """
    validate_decode_args(q, k_pages, v_pages, ring_k, ring_v, page_table, lengths, sel_pages, sel_count, mode)
    if not isinstance(choice, OpChoice):
        raise ValueError(f"choice must be an OpChoice, got {choice!r}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return REGISTRY.dispatch("decode", choice, q, k_pages, v_pages, ring_k, ring_v, page_table,
                             lengths.astype(jnp.int32), sel_pages, sel_count, mode=mode, scale=scale, dense=dense)


def dense_decode_attention(q, k, v, lengths, *, implementation: str = "cudnn", scale=None):
    """Dense decode baseline over a contiguous cache.

    q: [B, Hq, D]; k, v: [B, T, Hkv, D]; lengths: int32[B] valid tokens. implementation:
    "cudnn" (GPU) or "xla" (anywhere), through jax.nn.dot_product_attention. Returns [B, Hq, D].
    """
    if q.ndim != 3 or k.ndim != 4 or k.shape != v.shape or k.shape[0] != q.shape[0]:
        raise ValueError(f"dense decode wants q [B, Hq, D], k/v [B, T, Hkv, D]: {q.shape=} {k.shape=}")
    out = jax.nn.dot_product_attention(
        q[:, None], k, v, scale=scale, key_value_seq_lengths=lengths.astype(jnp.int32),
        implementation=implementation)
    return out[:, 0]
