"""Decode-time cache append of one token per sequence: the API. Shapes are validated here.

The token's K and V go into the retrieval heads' pages (with the min/max statistics of its
logical page) and into the streaming heads' ring; `pallas.append` documents the semantics.
Implementations: "triton" (`fused_append`, one launch for all six arrays, in place when they
are donated), "reference" (`append_reference`, jnp scatters) and "cpu" (the reference's
scatters, named only: it exists so that a model naming "cpu" for decode, which append follows,
runs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .registry import REGISTRY, OpChoice

__all__ = ["append_token", "validate_append_args"]


def validate_append_args(k, v, positions, page_table, k_pages, v_pages, k_min, k_max, ring_k, ring_v, *,
                         page: int, lp: int, sink: int, local: int) -> None:
    """ValueError naming the offending shape or knob."""
    if k.ndim != 3 or k.shape != v.shape:
        raise ValueError(f"k, v must be [B, Hkv, D] and equal: {k.shape=} {v.shape=}")
    b, hkv, d = k.shape
    if positions.shape != (b,):
        raise ValueError(f"positions must be [B]: {positions.shape=} {k.shape=}")
    if page_table.ndim != 2 or page_table.shape[0] != b:
        raise ValueError(f"page_table must be [B, N]: {page_table.shape=} {k.shape=}")
    if page < 1 or lp < 1 or page % lp:
        raise ValueError(f"the page size must be a multiple of the logical page size: {page=} {lp=}")
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape or k_pages.shape[2:] != (page, d):
        raise ValueError(f"k/v pages must be [R, P, {page}, {d}]: {k_pages.shape=} {v_pages.shape=}")
    r, p = k_pages.shape[:2]
    if k_min.shape != (r, p, page // lp, d) or k_max.shape != k_min.shape:
        raise ValueError(f"k_min/k_max must be [R, P, page // lp, D] = {(r, p, page // lp, d)}: "
                         f"{k_min.shape=} {k_max.shape=}")
    if ring_k.ndim != 4 or ring_k.shape != ring_v.shape or ring_k.shape[1] != b or ring_k.shape[3] != d:
        raise ValueError(f"ring k/v must be [S, {b}, W, {d}]: {ring_k.shape=} {ring_v.shape=}")
    s = ring_k.shape[0]
    if r + s != hkv:
        raise ValueError(f"R + S must be the KV heads of k: {k.shape=} {k_pages.shape=} {ring_k.shape=}")
    if sink < 0 or local < 0 or (s and (local < 1 or ring_k.shape[2] < sink + local)):
        raise ValueError(f"the ring must hold sink + local slots, local >= 1: {sink=} {local=} {ring_k.shape=}")


def append_token(k, v, positions, page_table, k_pages, v_pages, k_min, k_max, ring_k, ring_v, *,
                 page: int, lp: int, sink: int, local: int, choice: OpChoice = OpChoice()
                 ) -> tuple[jax.Array, ...]:
    """Writes one token per sequence into one layer's cache arrays.

    k, v: [B, Hkv, D] post-RoPE, the first R heads retrieval; positions: int32[B] where the
    token goes; page_table: int32[B, N]; k_pages, v_pages: [R, P, page, D]; k_min, k_max:
    [R, P, page // lp, D]; ring_k, ring_v: [S, B, W, D]. Returns the six arrays updated:
    (k_pages, v_pages, k_min, k_max, ring_k, ring_v).
    """
    validate_append_args(k, v, positions, page_table, k_pages, v_pages, k_min, k_max, ring_k, ring_v,
                         page=page, lp=lp, sink=sink, local=local)
    if not isinstance(choice, OpChoice):
        raise ValueError(f"choice must be an OpChoice, got {choice!r}")
    return REGISTRY.dispatch("append", choice, k, v, positions.astype(jnp.int32), page_table, k_pages, v_pages,
                             k_min, k_max, ring_k, ring_v, page=int(page), lp=int(lp), sink=int(sink),
                             local=int(local))
