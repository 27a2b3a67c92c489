"""The Llama-family transformer as pure functions: `prefill` and `decode_step` over a KV cache.

Both take the params pytree and the cache and return new logits and a new cache; the engine jits
them separately with the cache donated. Everything static (shapes, head split, knobs, kernel
choice) lives in the hashable `ModelSpec`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from . import cache as kvc
from . import kv8
from .ops import Kernels, decode_attention, prefill_attention
from .config import ModelConfig, SparseConfig
from .heads import HeadLayout
from .models.layer import causal_attention, decoder_layer, logits
from .params import Params
from .selection import insert_newest, select_pages
from .sharding import DECODE_SPECS, PREFILL_SPECS, check_tp, tensor_parallel


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything about a run that fixes the compiled program."""

    model: ModelConfig
    layout: HeadLayout
    sparse: SparseConfig = SparseConfig()
    kernels: Kernels = Kernels()  # implementations and tuning of every op (lserve_jax.ops)
    tp: int = 1  # tensor-parallel degree: KV heads split over the first `tp` local devices

    def __post_init__(self):
        if len(self.layout.num_retrieval) != self.model.num_layers or self.layout.num_kv_heads != self.model.num_kv_heads:
            raise ValueError(
                f"head layout {len(self.layout.num_retrieval)} layers x {self.layout.num_kv_heads} KV heads "
                f"does not match the model ({self.model.num_layers} x {self.model.num_kv_heads})")
        if self.tp > 1:
            check_tp(self.model, self.layout, self.tp)
        if self.layout.tp != self.tp and not self.layout.is_dense:
            # each device treats the first heads of its own slice as retrieval heads: a layout
            # ordered for another device count would silently swap head kinds
            raise ValueError(f"head layout was ordered for tp={self.layout.tp}, the model runs with tp={self.tp}; "
                             f"build it with sharding.tp_permutation(..., {self.tp}) (lserve_jax.load does)")

    def local_retrieval(self, layer: int) -> int:
        """Retrieval KV heads of `layer` on one device (all of them when tp == 1)."""
        return self.layout.num_retrieval[layer] // self.tp


# Decode projections run on at least this many rows (the batch padded with zero rows, sliced off
# before attention and logits): on the H200, XLA's kernels for a [1, hidden] x [hidden, out]
# product stream the weights slower than its [4, hidden] ones (bench/results/profile_decode-*).
# Not on CPU: there a product costs in proportion to its rows (SmolLM2-135M's 30 layers, 2 cores:
# 20 ms at 1 row, 34 ms at 4), so the batch is not padded (`min_rows`).
DECODE_MIN_ROWS = 4


def min_rows() -> int:
    """The decode projections' row floor on the platform being traced for."""
    return 1 if jax.default_backend() == "cpu" else DECODE_MIN_ROWS


def pad_rows(x: jax.Array) -> tuple[jax.Array, int]:
    """x [B, ...] padded with zero rows to `min_rows()`; returns it and the real B."""
    b, rows = x.shape[0], min_rows()
    if b >= rows:
        return x, b
    return jnp.pad(x, ((0, rows - b),) + ((0, 0),) * (x.ndim - 1)), b


def prefill(params: Params, cache: kvc.KVCache, tokens: jax.Array, lengths: jax.Array, spec: ModelSpec,
            on_layer: Callable[[int], None] | None = None) -> tuple[jax.Array, kvc.KVCache]:
    """Runs a right-padded batch of whole prompts and fills the cache (`prefill_chunk` from 0).

    tokens: int32 [B, T] (T a multiple of the page size); lengths: int32 [B].
    The cache's page_table must already map the pages these prompts need.
    Returns the logits of each prompt's last token, float32 [B, vocab].
    `on_layer(l)`, if given, is called from the device once layer l has run (a progress bar).
    """
    return prefill_chunk(params, cache, tokens, jnp.zeros_like(lengths), lengths, spec, on_layer=on_layer)


def prefill_chunk(params: Params, cache: kvc.KVCache, tokens: jax.Array, starts: jax.Array, counts: jax.Array,
                  spec: ModelSpec, *, context_pages: int | None = None,
                  on_layer: Callable[[int], None] | None = None) -> tuple[jax.Array, kvc.KVCache]:
    """Runs one chunk of each row's prompt over what the cache already holds of it.

    tokens: int32 [B, C] (C a multiple of the page size): row b's tokens at positions
    starts[b] + i (starts page-aligned), the first counts[b] real. Retrieval heads attend to every
    earlier token (read from their pages) and the chunk; streaming heads to the prefill sink and
    the previous prefill_local tokens (read from the streaming pool, `cache.window_pages`) and the
    chunk. context_pages (static): None when every row starts at 0 (the chunk is the whole
    context: one attention call over all heads, no reads); else the page-table entries the
    retrieval heads read (at least ceil((starts + C) / page) for every row).
    The page table (and, with context, the stream table) must map the chunk's pages and the
    context's. Returns the logits of each row's last real token, float32 [B, vocab], and the
    cache with lengths = starts + counts and a fresh selection clock.
    """
    b, c = tokens.shape
    positions = starts[:, None] + jnp.arange(c, dtype=jnp.int32)[None]
    x = params.embed[tokens]  # [B, C, hidden]
    layers = []
    for i, (lp, lc) in enumerate(zip(params.layers, cache.layers)):
        with jax.named_scope(f"layer{i}"):
            attn = functools.partial(_chunk_attention, r=spec.local_retrieval(i), spec=spec,
                                     context_pages=context_pages)

            def attend(q, k, v, attn=attn, lc=lc):
                return tensor_parallel(attn, spec.tp, PREFILL_SPECS)(
                    q, k, v, lc, cache.page_table, cache.stream_table, starts, counts)

            x, lc = decoder_layer(lp, x, positions, spec.model, attend)
            layers.append(lc)
            if on_layer is not None:  # after the layer: its argument depends on the layer's output
                jax.debug.callback(lambda done, i=i: on_layer(i), x[0, 0, 0])
    last = x[jnp.arange(b), jnp.maximum(counts - 1, 0)]  # [B, hidden]: logits only where needed
    new_cache = cache.replace(layers=tuple(layers), lengths=(starts + counts).astype(jnp.int32),
                              step=jnp.zeros((b,), jnp.int32))
    return logits(params, last, spec.model), new_cache


def _chunk_attention(q, k, v, lc: kvc.LayerCache, page_table, stream_table, starts, counts, *, r: int,
                     spec: ModelSpec, context_pages: int | None):
    """One layer's chunk: cache writes and attention over the KV heads this device holds."""
    sp, g = spec.sparse, spec.model.group_size
    hkv = k.shape[2]
    lc = kvc.write_chunk(lc, k, v, page_table, stream_table, starts, counts, sp)
    attn = functools.partial(prefill_attention, sink=sp.prefill_sink, local=sp.prefill_local,
                             choice=spec.kernels.prefill)
    if context_pages is None:  # the chunk is the whole context
        o = attn(q, k, v, counts, num_retrieval=r)
        if hkv - r:
            lc = kvc.ring_from_window(lc, k[:, :, r:], v[:, :, r:], jnp.zeros_like(starts), counts, sp)
        return o, lc
    outs = []
    if r:
        ids = page_table[:, :context_pages]
        kpool, vpool = kv8.views(lc, "k_pages", "v_pages")
        kc, vc = kvc.gather_pages(kpool, ids, q.dtype), kvc.gather_pages(vpool, ids, q.dtype)  # [B, Tk, R, D]
        outs.append(attn(q[:, :, : r * g], kc, vc, counts, num_retrieval=r, q_offset=starts))
    if hkv - r:
        pages, delta = kvc.window_pages(starts, sp, k.shape[1])
        ids = jnp.take_along_axis(stream_table, jnp.clip(pages, 0, stream_table.shape[1] - 1), axis=1)
        # the chunk's own pages were just written: the virtual sequence ends with them
        skpool, svpool = kv8.views(lc, "sk_pages", "sv_pages")
        wk, wv = kvc.gather_pages(skpool, ids, q.dtype), kvc.gather_pages(svpool, ids, q.dtype)
        outs.append(attn(q[:, :, r * g:], wk, wv, counts, num_retrieval=0, q_offset=starts - delta))
        lc = kvc.ring_from_window(lc, wk, wv, delta, starts + counts, sp)
    return jnp.concatenate(outs, axis=2) if len(outs) > 1 else outs[0], lc


def _selects(sp: SparseConfig, r: int, k_sel: int, max_pages_per_seq: int) -> bool:
    """Whether a layer with r retrieval heads and k_sel selection slots selects pages (with
    sparse decode off, no retrieval head, or slots for every page, it reads them all)."""
    return bool(sp.sparse_decode and r and k_sel < max_pages_per_seq)


def selection_active(spec: ModelSpec, max_pages_per_seq: int) -> bool:
    """Whether decode selects pages in any layer for a cache whose page table has this width."""
    k_sel = kvc.selection_width(spec.sparse, max_pages_per_seq)
    return any(_selects(spec.sparse, spec.local_retrieval(i), k_sel, max_pages_per_seq)
               for i in range(spec.model.num_layers))


def refresh_due(spec: ModelSpec, step: int) -> bool:
    """Host-side: whether decode step `step` after prefill refreshes the page selection."""
    return step % spec.sparse.selector_interval == 0


def _selection(lc: kvc.LayerCache, q_r: jax.Array, page_table: jax.Array, step: jax.Array,
               new_len: jax.Array, sp: SparseConfig, refresh: bool | None, kernels: Kernels
               ) -> tuple[jax.Array, jax.Array]:
    """The pages each retrieval head reads this step: recomputed every `selector_interval`
    steps of each row's own clock (step int32 [B]); in between the selection is reused, with
    each sequence's newest page added when it opens one. refresh: True / False decided by the
    caller for every row (one program each, no device-side branch), None: decided on device per
    row from `step` (one lax.cond: the fresh selection is computed when any row is due, and kept
    for the rows that are)."""
    k_sel = lc.sel_pages.shape[-1]

    def fresh():
        return select_pages(q_r, lc.k_min, lc.k_max, page_table, new_len, max_pages=k_sel,
                            mode=sp.selection_mode, page_size=sp.page_size, choice=kernels.page_scores)

    def reuse():
        return insert_newest(lc.sel_pages, lc.sel_count, new_len, page_size=sp.page_size)

    if refresh is None:
        due = step % sp.selector_interval == 0  # [B]

        def per_row():
            (sel, count), (old, old_count) = fresh(), reuse()
            return jnp.where(due[:, None, None], sel, old), jnp.where(due[:, None], count, old_count)

        return lax.cond(jnp.any(due), per_row, reuse)
    return fresh() if refresh else reuse()


def _decode_attention(q, k, v, lc: kvc.LayerCache, page_table, positions, step, *, r: int, spec: ModelSpec,
                      refresh: bool | None = None, full_width: int | None = None):
    """One layer's cache append, page selection and attention, over this device's KV heads."""
    sp, g = spec.sparse, spec.model.group_size
    b = q.shape[0]
    new_len = positions + 1
    lc = kvc.append(lc, k, v, page_table, positions, sp, choice=spec.kernels.append)
    dense = not _selects(sp, r, lc.sel_pages.shape[-1], full_width or page_table.shape[1])
    if dense:  # every page of the sequence, shared by the GQA group
        n_pages = page_table.shape[1]
        sel = jnp.broadcast_to(jnp.arange(n_pages, dtype=jnp.int32), (b, r, n_pages))
        count = jnp.broadcast_to(((new_len + sp.page_size - 1) // sp.page_size)[:, None], (b, r))
        mode = "kv_head"
    else:
        sel, count = _selection(lc, q[:, : r * g], page_table, step, new_len, sp, refresh, spec.kernels)
        lc = lc.replace(sel_pages=sel, sel_count=count)
        mode = sp.selection_mode
    o = decode_attention(q, *kv8.views(lc, "k_pages", "v_pages", "ring_k", "ring_v"), page_table, new_len,
                         sel, count, mode=mode, dense=dense, choice=spec.kernels.decode)
    return o, lc


def decode_step(params: Params, cache: kvc.KVCache, tokens: jax.Array, spec: ModelSpec,
                refresh: bool | None = None, table_pages: int | None = None) -> tuple[jax.Array, kvc.KVCache]:
    """One token per sequence: tokens int32 [B] -> logits float32 [B, vocab] and the new cache.

    refresh (static): whether this step recomputes the page selection. None (the engine's
    choice) decides on the device, `cache.step % selector_interval == 0`, with a lax.cond per
    layer that XLA runs as a CUDA-graph conditional; True / False fix it when tracing, so a
    caller that counts steps (`refresh_due`) can alternate two programs instead. Both give the
    same results; one program measured faster on the H200 (bench/results/profile_decode-*).
    table_pages (static): read only the first entries of the page table (every row's pages must
    be among them): the work of dense reads and page scoring then follows the longest sequence,
    not the cache's capacity. Whether a layer selects pages still follows the whole table, so
    the results are the same for every table_pages that covers the rows.
    """
    full = cache.max_pages_per_seq
    table = cache.page_table if table_pages is None else cache.page_table[:, :table_pages]

    def attend(i, q, k, v):
        attn = functools.partial(_decode_attention, r=spec.local_retrieval(i), spec=spec, refresh=refresh,
                                 full_width=full)
        return tensor_parallel(attn, spec.tp, DECODE_SPECS)(q, k, v, cache.layers[i], table,
                                                             cache.lengths, cache.step)

    out, layers = decode_forward(params, tokens, cache.lengths, spec.model, attend)
    return out, cache.replace(layers=layers, lengths=cache.lengths + 1, step=cache.step + 1)


def decode_forward(params: Params, tokens: jax.Array, positions: jax.Array, cfg: ModelConfig,
                   attend: Callable[[int, jax.Array, jax.Array, jax.Array], tuple[jax.Array, Any]]
                   ) -> tuple[jax.Array, tuple[Any, ...]]:
    """The decode skeleton shared by `decode_step` and the benchmarks' baselines: one token per
    sequence through every layer, attention by `attend(layer, q [B, Hq, D], k, v [B, Hkv, D])
    -> (o [B, Hq, D], aux)`. tokens, positions int32 [B]. Returns (logits float32 [B, vocab],
    every layer's aux). Projections run on >= min_rows() rows (zero rows appended),
    attention on the real B only."""
    b = tokens.shape[0]
    x, _ = pad_rows(params.embed[tokens][:, None])  # [max(B, min_rows()), 1, hidden]
    pos_rows, _ = pad_rows(positions[:, None])
    auxes = []
    for i, lp in enumerate(params.layers):
        with jax.named_scope(f"layer{i}"):
            def layer_attend(q, k, v, i=i):
                o, aux = attend(i, q[:b, 0], k[:b, 0], v[:b, 0])
                return pad_rows(o)[0][:, None], aux

            x, aux = decoder_layer(lp, x, pos_rows, cfg, layer_attend)
            auxes.append(aux)
    return logits(params, x[:b, 0], cfg), tuple(auxes)


def forward_reference(params: Params, tokens: jax.Array, cfg: ModelConfig) -> jax.Array:
    """Plain dense causal forward without a cache: logits float32 [B, T, vocab] (tests only)."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    x = params.embed[tokens]
    for lp in params.layers:
        x, _ = decoder_layer(lp, x, positions, cfg, lambda q, k, v: (causal_attention(q, k, v), None))
    return logits(params, x, cfg)
