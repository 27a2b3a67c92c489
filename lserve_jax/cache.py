"""The KV cache as a pytree of plain arrays, and the pure functions that write into it.

Per layer (R retrieval KV heads, S streaming KV heads, after the load-time permutation):

* retrieval heads keep a paged pool: `k_pages, v_pages [R, P, page, D]` with the channel-wise
  min/max of the keys of every logical page `k_min, k_max [R, P, page // lp, D]` (used by the
  decode-time page selector);
* streaming heads keep a constant-size ring `ring_k, ring_v [S, B, W, D]`, W = sink + local:
  token t < sink sits in slot t, token t >= sink in slot sink + (t - sink) % local;
* streaming heads also have a small paged pool `sk_pages, sv_pages [S, Ps, page, D]`, mapped by
  `stream_table`: chunked prefill writes each chunk there, and the next chunk reads the sink and
  the previous `prefill_local` tokens from it (the engine maps only those pages, and frees the
  rest as the prompt advances); the prefix cache keeps them so a continuation can start there;
* the page selection `sel_pages [B, Hsel, K]`, `sel_count [B, Hsel]` (logical page indices) is
  reused between refreshes.

Shared by all layers: `page_table [B, max_pages_per_seq]` (logical page -> physical page; physical
page 0 is a scratch page that unused entries point at), `stream_table` (the same for the streaming
pool), `lengths [B]` and the decode `step [B]`
(every row has its own selection-refresh clock, so admitting or finishing one row changes no
other row's results).
Keys are stored after RoPE. The engine allocates pages (host side); nothing here allocates.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import struct

from .arrays import Arrays
from .config import ModelConfig, SparseConfig
from .decl import ArrayDecl
from .heads import HeadLayout
from .kv8 import SCALES, is_kv8, load, store, unviews, views

NULL_PAGE = 0  # scratch page: never handed out, absorbs writes of padding rows


# Every per-layer cache array, declared once: name -> (logical axes, dtype; None = the cache dtype).
# Shapes come from `layer_cache_decls`, shardings from the axes (`sharding.RULES`: the head
# axes "retrieval", "streaming" and "sel_heads" split over the tensor-parallel devices).
LAYER_FIELDS: dict[str, tuple[tuple[str, ...], object]] = {
    "k_pages": (("retrieval", "pages", "page", "head_dim"), None),  # [R, P, page, D]
    "v_pages": (("retrieval", "pages", "page", "head_dim"), None),  # [R, P, page, D]
    "k_min": (("retrieval", "pages", "lpages", "head_dim"), None),  # [R, P, page // lp, D]
    "k_max": (("retrieval", "pages", "lpages", "head_dim"), None),  # [R, P, page // lp, D]
    "ring_k": (("streaming", "batch", "slots", "head_dim"), None),  # [S, B, W, D]
    "ring_v": (("streaming", "batch", "slots", "head_dim"), None),  # [S, B, W, D]
    "sk_pages": (("streaming", "spages", "page", "head_dim"), None),  # [S, Ps, page, D]
    "sv_pages": (("streaming", "spages", "page", "head_dim"), None),  # [S, Ps, page, D]
    "sel_pages": (("batch", "sel_heads", "sel"), jnp.int32),  # [B, Hsel, K] logical page ids chosen
    "sel_count": (("batch", "sel_heads"), jnp.int32),  # [B, Hsel]
}
# With 8-bit KV (`init_cache(kv_dtype=FP8 or jnp.int8)`, `lserve_jax.kv8`) each K/V array above
# is e4m3 or int8 and has one float32 scale per token and head in these fields (absent otherwise).
SCALE_FIELDS: dict[str, tuple[tuple[str, ...], object]] = {
    "k_scale": (("retrieval", "pages", "page"), jnp.float32),  # [R, P, page]
    "v_scale": (("retrieval", "pages", "page"), jnp.float32),
    "ring_ks": (("streaming", "batch", "slots"), jnp.float32),  # [S, B, W]
    "ring_vs": (("streaming", "batch", "slots"), jnp.float32),
    "sk_scale": (("streaming", "spages", "page"), jnp.float32),  # [S, Ps, page]
    "sv_scale": (("streaming", "spages", "page"), jnp.float32),
}
KV_FIELDS = tuple(SCALES)  # the K/V arrays stored in the KV dtype (8-bit or the compute dtype)
_ALL_LAYER_FIELDS = {**LAYER_FIELDS, **SCALE_FIELDS}
# The fields shared by all layers (the KVCache dataclass below holds them).
SHARED_FIELDS: dict[str, tuple[tuple[str, ...], object]] = {
    "page_table": (("batch", "table"), jnp.int32),  # [B, max_pages_per_seq]
    "stream_table": (("batch", "table"), jnp.int32),  # [B, max_pages_per_seq] into the streaming pool
    "lengths": (("batch",), jnp.int32),  # [B]
    "step": (("batch",), jnp.int32),  # [B] decode steps since each row's prefill
}

LayerCache = Arrays  # one layer's cache: the LAYER_FIELDS arrays


@struct.dataclass
class KVCache:
    layers: tuple[LayerCache, ...]
    page_table: jax.Array  # int32 [B, max_pages_per_seq]
    stream_table: jax.Array  # int32 [B, max_pages_per_seq] logical page -> streaming-pool page
    lengths: jax.Array  # int32 [B] tokens in the cache per sequence
    step: jax.Array  # int32 [B] decode steps since each row's prefill (its selection refresh clock)

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


def cache_sizes(cfg: ModelConfig, sparse: SparseConfig, *, num_retrieval: int, batch: int, num_pages: int,
                max_pages_per_seq: int, num_stream_pages: int = 1) -> dict[str, int]:
    """Sizes of the cache axes for one layer with `num_retrieval` retrieval heads."""
    return {
        "retrieval": num_retrieval, "streaming": cfg.num_kv_heads - num_retrieval, "pages": num_pages,
        "spages": num_stream_pages,
        "page": sparse.page_size, "lpages": sparse.page_size // sparse.logical_page_size, "head_dim": cfg.head_dim,
        "batch": batch, "slots": sparse.ring_size, "sel_heads": selection_heads(cfg, sparse, num_retrieval),
        "sel": selection_width(sparse, max_pages_per_seq), "table": max_pages_per_seq,
    }


def _decls(fields, sizes) -> dict[str, ArrayDecl]:
    return {n: ArrayDecl(axes, tuple(sizes[a] for a in axes), dtype, init="zeros") for n, (axes, dtype) in fields.items()}


def layer_cache_decls(cfg: ModelConfig, sparse: SparseConfig, *, quantized: bool = False, **sizes) -> dict[str, ArrayDecl]:
    """One layer's arrays (keyword arguments: those of `cache_sizes`); quantized: with the scale fields (8-bit KV)."""
    return _decls(_ALL_LAYER_FIELDS if quantized else LAYER_FIELDS, cache_sizes(cfg, sparse, **sizes))


def init_cache(cfg: ModelConfig, layout: HeadLayout, sparse: SparseConfig, *, batch: int,
               num_pages: int, max_pages_per_seq: int, dtype=jnp.bfloat16, num_stream_pages: int = 1,
               fill: Callable[[int, str, ArrayDecl, object], jax.Array] | None = None, kv_dtype=None) -> KVCache:
    """An empty cache; `num_pages` physical pages per layer pool (page 0 is the scratch page),
    `num_stream_pages` in the streaming heads' pool (its page 0 too: 1 = none besides it, enough
    for one-shot prefill). kv_dtype: the K/V arrays' dtype (default `dtype`, which the key
    statistics keep); float8_e4m3fn or int8 adds the per-token scales (`lserve_jax.kv8`).

    fill(layer, name, decl, dtype), if given, makes each layer array instead of zeros (the
    benchmarks' random caches); the page table maps nothing (every entry the scratch page)."""
    if num_pages < 2:
        raise ValueError(f"the page pool needs at least 2 pages (one is scratch), got {num_pages=}")
    if num_stream_pages < 1:
        raise ValueError(f"the streaming pool needs at least its scratch page, got {num_stream_pages=}")
    make = fill or (lambda i, name, d, dt: jnp.zeros(d.shape, dt))
    sizes = dict(batch=batch, num_pages=num_pages, max_pages_per_seq=max_pages_per_seq,
                 num_stream_pages=num_stream_pages)
    kv_dtype = dtype if kv_dtype is None else kv_dtype
    layers = []
    for i, r in enumerate(layout.num_retrieval):
        decls = layer_cache_decls(cfg, sparse, num_retrieval=r, quantized=is_kv8(kv_dtype), **sizes)
        layers.append(Arrays({n: make(i, n, d, d.dtype or (kv_dtype if n in KV_FIELDS else dtype))
                              for n, d in decls.items()}))
    shared = _decls(SHARED_FIELDS, cache_sizes(cfg, sparse, num_retrieval=0, **sizes))
    # every table entry the scratch page until the engine maps pages
    fills = {"page_table": NULL_PAGE, "stream_table": NULL_PAGE}
    return KVCache(layers=tuple(layers), **{n: jnp.full(d.shape, fills.get(n, 0), d.dtype) for n, d in shared.items()})


def _batch_axis(fields, name: str) -> int | None:
    axes = fields[name][0]
    return axes.index("batch") if "batch" in axes else None


def take_rows(cache: KVCache, rows: jax.Array) -> KVCache:
    """The cache of sequences `rows` (int32 [b]) alone: every array with a batch axis gathered
    (page tables, lengths, clocks, rings, selections), the page pools shared as they are."""
    def take(fields, name, x):
        ax = _batch_axis(fields, name)
        return x if ax is None else jnp.take(x, rows, axis=ax)

    layers = tuple(Arrays({n: take(_ALL_LAYER_FIELDS, n, x) for n, x in lc.items()}) for lc in cache.layers)
    return KVCache(layers=layers, **{n: take(SHARED_FIELDS, n, getattr(cache, n)) for n in SHARED_FIELDS})


def put_rows(cache: KVCache, sub: KVCache, rows: jax.Array) -> KVCache:
    """`cache` with rows `rows` replaced by `sub`'s (as `take_rows` made it and prefill filled it)
    and the page pools taken from `sub` (where prefill wrote those rows' pages)."""
    def put(fields, name, x, y):
        ax = _batch_axis(fields, name)
        if ax is None:
            return y
        idx = (slice(None),) * ax + (rows,)
        return x.at[idx].set(y)

    layers = tuple(Arrays({n: put(_ALL_LAYER_FIELDS, n, x, sl[n]) for n, x in lc.items()})
                   for lc, sl in zip(cache.layers, sub.layers))
    return KVCache(layers=layers, **{n: put(SHARED_FIELDS, n, getattr(cache, n), getattr(sub, n))
                                     for n in SHARED_FIELDS})


def save_sequence(cache: KVCache, row: jax.Array, pages: jax.Array) -> dict:
    """Everything sequence `row` has in the cache, for a swap to host memory: per layer its pages
    (`pages` int32 [n], the physical pages it owns, padded with the scratch page) of every array
    with a pages axis, its row of every array with a batch axis; its length and clock."""
    def take(x, axes, idx, ax_name):
        return jnp.take(x, idx, axis=axes.index(ax_name))

    layers = []
    for lc in cache.layers:
        saved = {}
        for n, x in lc.items():
            axes = _ALL_LAYER_FIELDS[n][0]
            if "pages" in axes:
                saved[n] = take(x, axes, pages, "pages")
            elif "batch" in axes:
                saved[n] = take(x, axes, row[None], "batch")
        layers.append(saved)
    return {"layers": layers, **{n: getattr(cache, n)[row] for n in ("lengths", "step")}}


def restore_sequence(cache: KVCache, row: jax.Array, pages: jax.Array, saved: dict) -> KVCache:
    """`cache` with `saved` (from `save_sequence`) written back into row `row` and the pages
    `pages` (new physical pages, as many as were saved; padding entries the scratch page)."""
    def put(x, axes, idx, ax_name, y):
        ax = axes.index(ax_name)
        return x.at[(slice(None),) * ax + (idx,)].set(y.astype(x.dtype))

    layers = []
    for lc, sv in zip(cache.layers, saved["layers"]):
        new = {}
        for n, x in lc.items():
            axes = _ALL_LAYER_FIELDS[n][0]
            if "pages" in axes:
                new[n] = put(x, axes, pages, "pages", sv[n])
            elif "batch" in axes:
                new[n] = put(x, axes, row[None], "batch", sv[n])
            else:
                new[n] = x
        layers.append(Arrays(new))
    return cache.replace(layers=tuple(layers), lengths=cache.lengths.at[row].set(saved["lengths"]),
                         step=cache.step.at[row].set(saved["step"]))


def page_stats(k_pages: jax.Array, lp: int) -> tuple[jax.Array, jax.Array]:
    """Key min/max of every logical page of full pages: k_pages [..., page, D] ->
    [..., page // lp, D] each (for caches filled without going through prefill)."""
    return _page_stats(k_pages, jnp.ones(k_pages.shape[:-1], bool), lp)


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


def _chunk_page_ids(table: jax.Array, starts: jax.Array, n: int) -> jax.Array:
    """Physical pages of logical pages [starts / page + i for i < n] per row: int32 [B, n]."""
    first = starts[:, None] + jnp.arange(n)[None]
    return jnp.take_along_axis(table, jnp.clip(first, 0, table.shape[1] - 1), axis=1)


def _paged(x: jax.Array, page: int) -> jax.Array:
    """[B, T, H, D] -> [H, B * T // page, page, D]: tokens as pages, one per row and page."""
    b, t, h, d = x.shape
    return x.reshape(b, t // page, page, h, d).transpose(3, 0, 1, 2, 4).reshape(h, b * (t // page), page, d)


def write_chunk(lc: LayerCache, k: jax.Array, v: jax.Array, page_table: jax.Array, stream_table: jax.Array,
                starts: jax.Array, counts: jax.Array, sparse: SparseConfig) -> LayerCache:
    """Writes a chunk of each row's prompt (K/V post-RoPE) into one layer's pools.

    k, v: [B, C, Hkv, D], C a multiple of the page size; row b's tokens sit at positions
    starts[b] + i (starts page-aligned), the first counts[b] of them real. Retrieval heads [:R]
    go to their pages (with key statistics over the real tokens), streaming heads [R:] to the
    streaming pool's pages (scratch where the engine mapped none). The decode ring is written by
    `ring_from_window`.
    """
    b, c, hkv, d = k.shape
    page, lp = sparse.page_size, sparse.logical_page_size
    r = lc.k_pages.shape[0]
    if c % page:
        raise ValueError(f"a prefill chunk must be a multiple of the page size {page}: {k.shape=}")
    n = c // page
    first = starts // page
    kpool, vpool, skpool, svpool = views(lc, "k_pages", "v_pages", "sk_pages", "sv_pages")
    if r:
        ids = _chunk_page_ids(page_table, first, n).reshape(-1)  # [B * n]
        kp, vp = _paged(k[:, :, :r], page), _paged(v[:, :, :r], page)
        pos = jnp.arange(c).reshape(n, page)
        valid = (pos[None] < counts[:, None, None]).reshape(1, b * n, page)
        kmin, kmax = _page_stats(kp, jnp.broadcast_to(valid, kp.shape[:-1]), lp)
        lc = unviews(lc, k_pages=store(kpool, (slice(None), ids), kp), v_pages=store(vpool, (slice(None), ids), vp),
                     k_min=lc.k_min.at[:, ids].set(kmin.astype(lc.k_min.dtype)),
                     k_max=lc.k_max.at[:, ids].set(kmax.astype(lc.k_max.dtype)))
    if hkv - r and lc.sk_pages.shape[1] > 1:  # a streaming pool beyond its scratch page
        ids = _chunk_page_ids(stream_table, first, n).reshape(-1)
        lc = unviews(lc, sk_pages=store(skpool, (slice(None), ids), _paged(k[:, :, r:], page)),
                     sv_pages=store(svpool, (slice(None), ids), _paged(v[:, :, r:], page)))
    return lc


def gather_pages(pool, ids: jax.Array, dtype) -> jax.Array:
    """pool [H, P, page, D] (an array or `kv8.KV8`), ids int32 [B, n] -> [B, n * page, H, D] in
    `dtype`: each row's pages in order."""
    h, _, page, d = pool.shape
    b, n = ids.shape
    x = load(pool[:, ids.reshape(-1)], dtype)  # [H, B * n, page, D]
    return x.reshape(h, b, n * page, d).transpose(1, 2, 0, 3)


def window_geometry(sparse: SparseConfig) -> tuple[int, int]:
    """(sink pages, window pages) a chunk's streaming heads read before it: every page holding a
    token of the prefill sink or the previous prefill_local tokens, and of the decode ring (which
    the chunk rewrites from them)."""
    page = sparse.page_size
    ns = -(-max(sparse.prefill_sink, sparse.decode_sink) // page)
    nw = -(-max(sparse.prefill_local, sparse.decode_local) // page)
    return ns, nw


def window_pages(starts: jax.Array, sparse: SparseConfig, chunk: int) -> tuple[jax.Array, jax.Array]:
    """The streaming-pool pages a chunk at `starts` (page-aligned, int32 [B]) reads, in order.

    Returns (logical pages int32 [B, ns + nw + chunk / page], delta int32 [B]): the sink pages
    [0, ns), then the run from w0 = max(ns, starts / page - nw) through the chunk. Read as one
    sequence it is the *virtual* sequence of the chunk: position u < ns * page is token u, u
    beyond it token u + delta (delta = (w0 - ns) * page, the tokens skipped between sink and
    window). The streaming mask is the same in virtual positions (every skipped token is out of
    every query's window), so the chunk attends with q_offset = starts - delta.
    """
    ns, nw = window_geometry(sparse)
    w0 = jnp.maximum(ns, starts // sparse.page_size - nw)  # [B]
    n_run = nw + chunk // sparse.page_size
    pages = jnp.concatenate([jnp.broadcast_to(jnp.arange(ns), (starts.shape[0], ns)),
                             w0[:, None] + jnp.arange(n_run)[None]], axis=1)
    return pages.astype(jnp.int32), ((w0 - ns) * sparse.page_size).astype(jnp.int32)


def ring_from_window(lc: LayerCache, wk: jax.Array, wv: jax.Array, delta: jax.Array, ends: jax.Array,
                     sparse: SparseConfig) -> LayerCache:
    """The decode ring after `ends` tokens (int32 [B]), taken from a virtual sequence (`window_pages`)
    wk, wv [B, U, S, D] that holds every token the ring keeps (delta: its skipped tokens)."""
    sink, local = sparse.decode_sink, sparse.decode_local
    slots = jnp.arange(sparse.ring_size)
    # which token each slot holds after `ends` tokens: the newest t < ends with that slot
    last = ends[:, None] - 1 - sink  # [B, 1] offset of the newest token past the sink
    off = last - jnp.mod(last - (slots[None] - sink), local)
    tok = jnp.where(slots[None] < sink, slots[None], sink + off)  # [B, W] token positions
    ns, _ = window_geometry(sparse)
    u = jnp.where(tok < ns * sparse.page_size, tok, tok - delta[:, None])  # virtual positions
    u = jnp.clip(u, 0, wk.shape[1] - 1)  # empty slots (tok < 0 or >= ends) hold any token: unread
    take = lambda x: jnp.take_along_axis(x, u[:, :, None, None], axis=1)  # [B, W, S, D]
    rk, rv = views(lc, "ring_k", "ring_v")
    return unviews(lc, ring_k=store(rk, Ellipsis, take(wk).transpose(2, 0, 1, 3)),
                   ring_v=store(rv, Ellipsis, take(wv).transpose(2, 0, 1, 3)))


def append(lc: LayerCache, k: jax.Array, v: jax.Array, page_table: jax.Array,
           positions: jax.Array, sparse: SparseConfig, choice=None) -> LayerCache:
    """Appends one token per sequence. k, v: [B, Hkv, D] (post-RoPE); positions [B] where it goes.

    choice: the `ops.OpChoice` of `ops.append.append_token` (default: the platform's order; the
    reference is jnp scatters, the Triton `fused_append` one launch for pages, statistics and
    ring).
    """
    from .ops.append import append_token
    from .ops.registry import REGISTRY, OpChoice

    choice = OpChoice() if choice is None else choice
    REGISTRY.resolve("append", choice)  # an unknown implementation name fails before any work
    k_pages, v_pages, ring_k, ring_v = views(lc, "k_pages", "v_pages", "ring_k", "ring_v")
    kp, vp, kmin, kmax, rk, rv = append_token(
        k, v, positions, page_table, k_pages, v_pages, lc.k_min, lc.k_max, ring_k, ring_v,
        page=sparse.page_size, lp=sparse.logical_page_size, sink=sparse.decode_sink, local=sparse.decode_local,
        choice=choice)
    return unviews(lc, k_pages=kp, v_pages=vp, k_min=kmin, k_max=kmax, ring_k=rk, ring_v=rv)
