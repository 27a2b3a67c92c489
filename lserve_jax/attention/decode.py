"""Decode attention dispatch: LServe's sparse decode over the paged pool and the streaming ring.

`decode_attention` splits the query heads of one layer:

* retrieval query heads [0, R*G) attend to the pages their selection names (token-exact: the
  newest page is masked by length);
* streaming query heads [R*G, Hq) attend to their KV head's valid ring slots
  [0, min(length, W)); the ring is viewed as W / pb contiguous pages of pb tokens per sequence
  (pb = the largest power of 2 dividing W, at most 128).

On the GPU both halves run in one kernel launch (`pallas.decode.sparse_decode`), unless the
ring width has no power-of-2 factor >= 16 (then two `paged_decode` launches); the reference runs
each half through `paged_decode_reference`.

`dense_decode_attention` is the dense baseline over a contiguous cache (cuDNN or XLA).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ..pallas.compat import on_gpu
from ..pallas.decode import paged_decode, paged_decode_reference, ring_page, sparse_decode

MODES = ("query_head", "kv_head")
# tuning kwargs of `sparse_decode` when the caller passes none (bench/decode.py --tune measures
# alternatives on the layer shapes of a run and may replace them for that run)
DEFAULT_KERNEL_OPTIONS: dict = {}
IMPLS = ("auto", "pallas", "reference")


def _check(q, k_pages, v_pages, ring_k, ring_v, page_table, lengths, sel_pages, sel_count, mode,
           impl):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
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


def _retrieval_args(q, page_table, sel_pages, *, mode, r, g):
    """q viewed per program head (no copy) and the physical pages of each selection slot."""
    b, hq, d = q.shape
    n = page_table.shape[1]
    lg = jnp.clip(sel_pages, 0, n - 1)
    phys = jnp.take_along_axis(page_table, lg.reshape(b, -1), axis=1).reshape(lg.shape)
    if mode == "query_head":
        qh = q.reshape(b, hq, 1, d)  # one program head per query head: its own pages
    else:
        qh = q.reshape(b, hq // g, g, d)  # one program head per GQA group: pages read once
    return qh, phys, lg


def _ring_args(q, ring_k, ring_v, lengths):
    """The ring as a pool of [S, B * W/pb, pb, D] pages with its slot lists and lengths."""
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


def decode_attention(q, k_pages, v_pages, ring_k, ring_v, page_table, lengths, sel_pages, sel_count,
                     *, mode: str, impl: str = "auto", scale=None, kernel_options=None):
    """One layer's sparse decode attention. Returns [B, Hq, D] in q's dtype.

    q: [B, Hq, D] (post-RoPE); k_pages, v_pages: [R, P, page, D]; ring_k, ring_v: [S, B, W, D];
    page_table: int32[B, N]; lengths: int32[B] (including the current token); sel_pages:
    int32[B, Hsel, K] logical page ids, sel_count: int32[B, Hsel], Hsel = R*G (query_head) or
    R (kv_head). impl: "reference" | "pallas" | "auto" (pallas on GPU, reference elsewhere).
    "pallas" runs retrieval and streaming heads in ONE launch (`pallas.decode.sparse_decode`);
    kernel_options: its tuning kwargs. "reference" runs the two halves through
    `paged_decode_reference`.
    """
    b, hq, d, r, s, g = _check(q, k_pages, v_pages, ring_k, ring_v, page_table, lengths,
                               sel_pages, sel_count, mode, impl)
    if impl == "auto":
        impl = "pallas" if on_gpu() else "reference"
    scale = d ** -0.5 if scale is None else float(scale)
    lengths = lengths.astype(jnp.int32)
    if impl == "pallas" and (not s or ring_page(ring_k.shape[2]) >= 16):
        m = 1 if mode == "query_head" else g  # query rows per program head
        _, phys, lg = _retrieval_args(q, page_table, sel_pages, mode=mode, r=r, g=g)
        o = sparse_decode(q.reshape(b, hq // m, m, d), k_pages, v_pages, ring_k, ring_v, phys, lg,
                          sel_count.astype(jnp.int32), lengths, scale=scale,
                          **(DEFAULT_KERNEL_OPTIONS if kernel_options is None else kernel_options))
        return o.reshape(b, hq, d)
    # two launches (reference, or a ring width whose blocks are too small for the fused kernel);
    # program heads take their rows straight from q (head_offset), no slicing copies
    if impl == "pallas":
        run = functools.partial(paged_decode, **(kernel_options or {}))
    else:
        run = paged_decode_reference
    outs = []
    if r:
        qh, phys, lg = _retrieval_args(q, page_table, sel_pages, mode=mode, r=r, g=g)
        o = run(qh, k_pages, v_pages, phys, lg, sel_count.astype(jnp.int32), lengths, scale=scale, head_offset=0)
        outs.append(o.reshape(b, r * g, d))
    if s:
        kp, vp, ids, lg, counts, ring_len = _ring_args(q, ring_k, ring_v, lengths)
        o = run(q.reshape(b, r + s, g, d), kp, vp, ids, lg, counts, ring_len, scale=scale, head_offset=r)
        outs.append(o.reshape(b, s * g, d))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


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
