"""Query-aware page selection for sparse decode (LServe's hierarchical paging).

For a retrieval head with query q (post-RoPE) the score of logical page j is

    S_j = sum_i max(q_i * kmax_ji, q_i * kmin_ji)

an upper bound of q.k over the keys of the page. It equals `q+ . kmax_j + q- . kmin_j` with
q+ = max(q, 0), q- = min(q, 0) (whenever kmin <= kmax channel-wise), which is how the Pallas
scoring kernel computes it with two small matmuls. A physical page scores the max of its
logical pages. The top `max_pages` physical pages of a sequence are selected, the newest page
(the one holding the current token) always among them; when the sequence has no more pages
than the budget every page is selected.

Selection heads: in "query_head" mode (LServe) every query head of the retrieval heads has its
own selection; in "kv_head" mode the scores of the G query heads of a GQA group are reduced
(`group_reduce`, default "max": a page that matters to any head of the group survives; "sum"
favours pages that matter to the group on average) and one selection is shared by the group, so
each selected page is read once per KV head.

Selections hold LOGICAL page indices (into a row of the page table). Slots past `sel_count` are
filled with the newest page so that every slot is a valid index. Decode recomputes them every
`selector_interval` steps; in between, `insert_newest` keeps a reused selection valid by adding
each page a sequence opens (over its lowest-scoring slots when the budget is full).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .ops.decode import MODES
from .ops.page_scores import page_scores, validate_page_score_args
from .ops.registry import OpChoice

GROUP_REDUCES = ("max", "sum")


def _check(q, k_min, k_max, page_table, lengths, max_pages, mode, group_reduce):
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if group_reduce not in GROUP_REDUCES:
        raise ValueError(f"group_reduce must be one of {GROUP_REDUCES}, got {group_reduce!r}")
    if max_pages < 1:
        raise ValueError(f"max_pages must be >= 1, got {max_pages}")
    validate_page_score_args(q, k_min, k_max, page_table, lengths)


def topk_pages(scores, lengths, *, page_size: int, max_pages: int):
    """Top pages per selection head within the budget.

    scores: float32[B, H, N] (any values for pages past the sequence); lengths: int32[B].
    Returns (sel int32[B, H, max_pages], count int32[B, H]).
    """
    b, h, n = scores.shape
    n_valid = (lengths + page_size - 1) // page_size  # [B]
    newest = jnp.clip(n_valid - 1, 0, n - 1)
    col = jnp.arange(n)
    scores = jnp.where(col[None, None, :] < n_valid[:, None, None], scores, -jnp.inf)
    scores = jnp.where(col[None, None, :] == newest[:, None, None], jnp.inf, scores)
    k = min(max_pages, n)
    _, idx = jax.lax.top_k(scores, k)  # [B, H, k]
    count = jnp.minimum(n_valid, k).astype(jnp.int32)  # [B]
    slot = jnp.arange(max_pages)
    if k < max_pages:
        idx = jnp.pad(idx, ((0, 0), (0, 0), (0, max_pages - k)))
    sel = jnp.where(slot[None, None, :] < count[:, None, None], idx, newest[:, None, None])
    return sel.astype(jnp.int32), jnp.broadcast_to(count[:, None], (b, h))


def insert_newest(sel_pages, sel_count, lengths, *, page_size: int):
    """Keeps a reused selection valid after appends: the newest page is always read.

    sel_pages int32[B, H, K], sel_count int32[B, H] as `topk_pages` made them (slot 0 the page
    that was newest then, slots 1.. by falling score); lengths int32[B] including the current
    token. When a sequence has opened a page since the selection was made, that page is added:
    into a free slot if there is one (every page was selected), else over the lowest-scoring
    slots, the m-th page opened since taking slot K-1-m (never slot 0, the previous newest).
    Pure and cheap, so a selection can be reused for `selector_interval` steps without a
    refresh whenever some sequence crosses a page boundary.
    """
    b, h, k = sel_pages.shape
    newest = jnp.maximum((lengths - 1) // page_size, 0).astype(jnp.int32)[:, None]  # [B, 1]
    slot = jnp.arange(k, dtype=jnp.int32)
    present = jnp.any((sel_pages == newest[..., None]) & (slot < sel_count[..., None]), axis=-1)  # [B, H]
    opened = newest - sel_pages[..., 0] - 1  # pages opened since the selection, minus one
    target = jnp.where(sel_count < k, sel_count, jnp.clip(k - 1 - opened, min(1, k - 1), k - 1))
    write = (~present)[..., None] & (slot == target[..., None])
    sel = jnp.where(write, newest[..., None], sel_pages)
    count = jnp.where(present, sel_count, jnp.minimum(sel_count + 1, k))
    return sel.astype(jnp.int32), count.astype(jnp.int32)


def select_pages(q, k_min, k_max, page_table, lengths, *, max_pages: int, mode: str,
                 group_reduce: str = "max", page_size: int | None = None, choice: OpChoice = OpChoice()):
    """Chooses the pages each retrieval selection head reads at decode.

    q: [B, R*G, D] retrieval heads' queries (post-RoPE); k_min, k_max: [R, P, page // lp, D];
    page_table: int32[B, N]; lengths: int32[B] tokens including the current one.
    page_size: the physical page size in tokens. The stats only give page // lp, so the default
    assumes 16-token logical pages (SparseConfig's default); pass it whenever lp != 16.
    choice: the page-score implementations to try and their options (`ops.page_scores`;
    default: the platform's order, the Triton kernel on a GPU when the shapes suit it).
    Returns sel_pages int32[B, Hsel, max_pages] (logical page indices) and sel_count
    int32[B, Hsel]; Hsel = R*G ("query_head") or R ("kv_head").
    """
    _check(q, k_min, k_max, page_table, lengths, max_pages, mode, group_reduce)
    b, hq, _ = q.shape
    r = k_min.shape[0]
    if page_size is None:
        page_size = 16 * k_min.shape[2]
    if r == 0:
        return jnp.zeros((b, 0, max_pages), jnp.int32), jnp.zeros((b, 0), jnp.int32)
    g = hq // r
    s = page_scores(q, k_min, k_max, page_table, lengths, page_size=page_size, choice=choice)  # [B, R, G, N]
    if mode == "kv_head":
        s = jnp.max(s, axis=2) if group_reduce == "max" else jnp.sum(s, axis=2)
    else:
        s = s.reshape(b, r * g, -1)
    return topk_pages(s, lengths, page_size=page_size, max_pages=max_pages)
