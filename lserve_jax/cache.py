"""The KV cache as a pytree of plain arrays, and the pure functions that write into it.

Per layer (R retrieval KV heads, S streaming KV heads, after the load-time permutation):

* retrieval heads keep a paged pool: `k_pages, v_pages [R, P, page, D]` with the channel-wise
  min/max of the keys of every logical page `k_min, k_max [R, P, page // lp, D]` (used by the
  decode-time page selector);
* streaming heads keep a constant-size ring `ring_k, ring_v [S, B, W, D]`, W = sink + local:
  token t < sink sits in slot t, token t >= sink in slot sink + (t - sink) % local;
* the page selection `sel_pages [B, Hsel, K]`, `sel_count [B, Hsel]` (logical page indices) is
  reused between refreshes.

Shared by all layers: `page_table [B, max_pages_per_seq]` (logical page -> physical page; physical
page 0 is a scratch page that unused entries point at), `lengths [B]` and the decode `step`.
Keys are stored after RoPE. The engine allocates pages (host side); nothing here allocates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from .config import ModelConfig, SparseConfig
from .heads import HeadLayout

NULL_PAGE = 0  # scratch page: never handed out, absorbs writes of padding rows


@struct.dataclass
class LayerCache:
    k_pages: jax.Array  # [R, P, page, D]
    v_pages: jax.Array  # [R, P, page, D]
    k_min: jax.Array  # [R, P, page // lp, D]
    k_max: jax.Array  # [R, P, page // lp, D]
    ring_k: jax.Array  # [S, B, W, D]
    ring_v: jax.Array  # [S, B, W, D]
    sel_pages: jax.Array  # int32 [B, Hsel, K] logical page ids chosen by the selector
    sel_count: jax.Array  # int32 [B, Hsel]


@struct.dataclass
class KVCache:
    layers: tuple[LayerCache, ...]
    page_table: jax.Array  # int32 [B, max_pages_per_seq]
    lengths: jax.Array  # int32 [B] tokens in the cache per sequence
    step: jax.Array  # int32 [] decode steps since the last prefill (selection refresh clock)

    @property
    def batch(self) -> int:
        return self.page_table.shape[0]

    @property
    def max_pages_per_seq(self) -> int:
        return self.page_table.shape[1]

    @property
    def num_pages(self) -> int:
        return self.layers[0].k_pages.shape[1] if self.layers else 0


def selection_heads(cfg: ModelConfig, sparse: SparseConfig, num_retrieval: int) -> int:
    return num_retrieval * cfg.group_size if sparse.selection_mode == "query_head" else num_retrieval


def selection_width(sparse: SparseConfig, max_pages_per_seq: int) -> int:
    """Pages a retrieval head reads per decode step (K): the budget, or every page if dense."""
    if not sparse.sparse_decode:
        return max_pages_per_seq
    return min(sparse.max_selected_pages, max_pages_per_seq)


def init_cache(cfg: ModelConfig, layout: HeadLayout, sparse: SparseConfig, *, batch: int,
               num_pages: int, max_pages_per_seq: int, dtype=jnp.bfloat16) -> KVCache:
    """An empty cache; `num_pages` physical pages per layer pool (page 0 is the scratch page)."""
    if num_pages < 2:
        raise ValueError(f"the page pool needs at least 2 pages (one is scratch), got {num_pages=}")
    d, page, lp = cfg.head_dim, sparse.page_size, sparse.logical_page_size
    k_sel = selection_width(sparse, max_pages_per_seq)
    layers = []
    for r in layout.num_retrieval:
        s = cfg.num_kv_heads - r
        hsel = selection_heads(cfg, sparse, r)
        layers.append(LayerCache(
            k_pages=jnp.zeros((r, num_pages, page, d), dtype),
            v_pages=jnp.zeros((r, num_pages, page, d), dtype),
            k_min=jnp.zeros((r, num_pages, page // lp, d), dtype),
            k_max=jnp.zeros((r, num_pages, page // lp, d), dtype),
            ring_k=jnp.zeros((s, batch, sparse.ring_size, d), dtype),
            ring_v=jnp.zeros((s, batch, sparse.ring_size, d), dtype),
            sel_pages=jnp.zeros((batch, hsel, k_sel), jnp.int32),
            sel_count=jnp.zeros((batch, hsel), jnp.int32),
        ))
    return KVCache(
        layers=tuple(layers),
        page_table=jnp.full((batch, max_pages_per_seq), NULL_PAGE, jnp.int32),
        lengths=jnp.zeros((batch,), jnp.int32),
        step=jnp.zeros((), jnp.int32),
    )


def ring_slot(t: jax.Array, sink: int, local: int) -> jax.Array:
    """Ring slot of token position t."""
    return jnp.where(t < sink, t, sink + (t - sink) % local)


def _page_stats(k: jax.Array, valid: jax.Array, lp: int) -> tuple[jax.Array, jax.Array]:
    """Min/max over valid tokens of each logical page. k [..., page, D], valid [..., page]."""
    *lead, page, d = k.shape
    k = k.reshape(*lead, page // lp, lp, d).astype(jnp.float32)
    valid = valid.reshape(*lead, page // lp, lp, 1)
    kmin = jnp.min(jnp.where(valid, k, jnp.inf), axis=-2)
    kmax = jnp.max(jnp.where(valid, k, -jnp.inf), axis=-2)
    any_valid = jnp.any(valid, axis=-2)
    # empty logical pages score 0 rather than +-inf (0 * inf would be NaN in the selector)
    return jnp.where(any_valid, kmin, 0.0), jnp.where(any_valid, kmax, 0.0)


def write_prefill(lc: LayerCache, k: jax.Array, v: jax.Array, page_table: jax.Array,
                  lengths: jax.Array, sparse: SparseConfig) -> LayerCache:
    """Writes a prompt's K/V (post-RoPE) into one layer's cache.

    k, v: [B, T, Hkv, D] with T a multiple of the page size; lengths [B] (<= T).
    Retrieval heads [:R] go to pages (with key statistics), streaming heads [R:] to the ring.
    """
    b, t, hkv, d = k.shape
    page, lp = sparse.page_size, sparse.logical_page_size
    r = lc.k_pages.shape[0]
    if t % page:
        raise ValueError(f"prompt length must be padded to a multiple of the page size {page}: {k.shape=}")
    n = t // page
    if n > page_table.shape[1]:
        raise ValueError(f"prompt needs {n} pages, the page table has {page_table.shape[1]}")
    ids = page_table[:, :n].reshape(-1)  # [B * n]
    if r:
        def paged(x):  # [B, T, R, D] -> [R, B * n, page, D]
            return x[:, :, :r].reshape(b, n, page, r, d).transpose(3, 0, 1, 2, 4).reshape(r, b * n, page, d)

        kp, vp = paged(k), paged(v)
        pos = jnp.arange(t).reshape(n, page)
        valid = (pos[None] < lengths[:, None, None]).reshape(1, b * n, page)
        kmin, kmax = _page_stats(kp, jnp.broadcast_to(valid, kp.shape[:-1]), lp)
        lc = lc.replace(
            k_pages=lc.k_pages.at[:, ids].set(kp.astype(lc.k_pages.dtype)),
            v_pages=lc.v_pages.at[:, ids].set(vp.astype(lc.v_pages.dtype)),
            k_min=lc.k_min.at[:, ids].set(kmin.astype(lc.k_min.dtype)),
            k_max=lc.k_max.at[:, ids].set(kmax.astype(lc.k_max.dtype)),
        )
    if hkv - r:
        sink, local = sparse.decode_sink, sparse.decode_local
        slots = jnp.arange(sparse.ring_size)
        # which token each slot holds after `length` tokens: the newest t < length with that slot
        last = lengths[:, None] - 1 - sink  # [B, 1] offset of the newest token past the sink
        off = last - jnp.mod(last - (slots[None] - sink), local)
        tok = jnp.where(slots[None] < sink, slots[None], sink + off)  # [B, W]
        tok = jnp.clip(tok, 0, t - 1)
        take = lambda x: jnp.take_along_axis(x[:, :, r:], tok[:, :, None, None], axis=1)  # [B, W, S, D]
        lc = lc.replace(
            ring_k=take(k).transpose(2, 0, 1, 3).astype(lc.ring_k.dtype),
            ring_v=take(v).transpose(2, 0, 1, 3).astype(lc.ring_v.dtype),
        )
    return lc


def append(lc: LayerCache, k: jax.Array, v: jax.Array, page_table: jax.Array,
           positions: jax.Array, sparse: SparseConfig, impl: str = "reference") -> LayerCache:
    """Appends one token per sequence. k, v: [B, Hkv, D] (post-RoPE); positions [B] where it goes.

    impl: "reference" (jnp scatters, below), "pallas" (`pallas.append.fused_append`: one launch
    for pages, statistics and ring) or "auto" (pallas on a GPU when the shapes suit it).
    """
    if impl not in ("auto", "pallas", "reference"):
        raise ValueError(f"append impl must be 'auto', 'pallas' or 'reference', got {impl!r}")
    if impl != "reference":
        from .pallas.append import fused_append, supported
        from .pallas.compat import on_gpu

        if impl == "pallas" or (on_gpu() and supported(lc.k_pages, lc.ring_k)):
            kp, vp, kmin, kmax, rk, rv = fused_append(
                k, v, positions, page_table, lc.k_pages, lc.v_pages, lc.k_min, lc.k_max, lc.ring_k, lc.ring_v,
                page=sparse.page_size, lp=sparse.logical_page_size, sink=sparse.decode_sink,
                local=sparse.decode_local)
            return lc.replace(k_pages=kp, v_pages=vp, k_min=kmin, k_max=kmax, ring_k=rk, ring_v=rv)
    b, hkv, d = k.shape
    page, lp = sparse.page_size, sparse.logical_page_size
    r = lc.k_pages.shape[0]
    rows = jnp.arange(b)
    if r:
        phys = page_table[rows, positions // page]  # [B]
        off = positions % page
        lpage = off // lp
        kr = jnp.swapaxes(k[:, :r], 0, 1)  # [R, B, D]
        vr = jnp.swapaxes(v[:, :r], 0, 1)
        # a token that opens a logical page resets its statistics; later ones widen them
        fresh = (off % lp == 0)[None, :, None]
        old_min = lc.k_min[:, phys, lpage]  # [R, B, D]
        old_max = lc.k_max[:, phys, lpage]
        kc = kr.astype(lc.k_min.dtype)
        lc = lc.replace(
            k_pages=lc.k_pages.at[:, phys, off].set(kr.astype(lc.k_pages.dtype)),
            v_pages=lc.v_pages.at[:, phys, off].set(vr.astype(lc.v_pages.dtype)),
            k_min=lc.k_min.at[:, phys, lpage].set(jnp.where(fresh, kc, jnp.minimum(old_min, kc))),
            k_max=lc.k_max.at[:, phys, lpage].set(jnp.where(fresh, kc, jnp.maximum(old_max, kc))),
        )
    if hkv - r:
        slot = ring_slot(positions, sparse.decode_sink, sparse.decode_local)  # [B]
        ks = jnp.swapaxes(k[:, r:], 0, 1)  # [S, B, D]
        vs = jnp.swapaxes(v[:, r:], 0, 1)
        lc = lc.replace(
            ring_k=lc.ring_k.at[:, rows, slot].set(ks.astype(lc.ring_k.dtype)),
            ring_v=lc.ring_v.at[:, rows, slot].set(vs.astype(lc.ring_v.dtype)),
        )
    return lc
