"""Page scores of LServe's query-aware page selector: the API. Shapes are validated here.

For query q and logical page j with channel-wise key bounds kmin_j <= kmax_j the score is
S_j = sum_i max(q_i kmax_ji, q_i kmin_ji), an upper bound of q.k over the page; a physical page
scores the max of its logical pages. Implementations: "triton" (`pallas.page_scores`, options
chunk, num_warps, num_stages; pages past a sequence's length are left unwritten, the selector
masks them) and "reference" (`page_scores_reference`, every table entry scored).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .registry import REGISTRY, OpChoice

__all__ = ["page_scores", "validate_page_score_args"]


def validate_page_score_args(q, k_min, k_max, page_table, lengths) -> None:
    """ValueError naming the offending shape (R = 0 is allowed when q has no heads)."""
    if q.ndim != 3:
        raise ValueError(f"q must be [B, R*G, D], got {q.shape=}")
    if k_min.ndim != 4 or k_min.shape != k_max.shape:
        raise ValueError(f"k_min/k_max must be [R, P, L, D] and equal, got {k_min.shape=} {k_max.shape=}")
    b, hq, d = q.shape
    r = k_min.shape[0]
    if k_min.shape[-1] != d:
        raise ValueError(f"head_dim mismatch: {q.shape=} {k_min.shape=}")
    if (r == 0 and hq != 0) or (r and hq % r):
        raise ValueError(f"q heads must be a multiple of the retrieval heads: {q.shape=} {k_min.shape=}")
    if page_table.ndim != 2 or page_table.shape[0] != b:
        raise ValueError(f"page_table must be [B, N]: {page_table.shape=} {q.shape=}")
    if lengths.shape != (b,):
        raise ValueError(f"lengths must be [B]: {lengths.shape=} {q.shape=}")


def page_scores(q, k_min, k_max, page_table, lengths, *, page_size: int,
                choice: OpChoice = OpChoice()) -> jax.Array:
    """Scores of the pages in each sequence's table. Returns float32[B, R, G, N].

    q: [B, R*G, D] retrieval heads' queries (post-RoPE); k_min, k_max: [R, P, L, D] logical-page
    key bounds; page_table: int32[B, N]; lengths: int32[B]; page_size: tokens per physical page.
    Entries past ceil(length / page_size) may hold any value (the caller masks them).
    """
    validate_page_score_args(q, k_min, k_max, page_table, lengths)
    if k_min.shape[0] == 0:
        raise ValueError(f"page scores need at least one retrieval head: {k_min.shape=}")
    if page_size < 1 or page_size % k_min.shape[2]:
        raise ValueError(f"page_size must be a multiple of the logical pages per page: {page_size=} {k_min.shape=}")
    if not isinstance(choice, OpChoice):
        raise ValueError(f"choice must be an OpChoice, got {choice!r}")
    return REGISTRY.dispatch("page_scores", choice, q, k_min, k_max, page_table.astype(jnp.int32),
                             lengths.astype(jnp.int32), page_size=int(page_size))
