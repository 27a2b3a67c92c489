"""Decode-time cache append in one kernel launch (Pallas, Triton lowering).

Per decode step and layer the cache takes one token per sequence: its K and V into the
retrieval heads' pages, the channel-wise min/max of its logical page, and its K and V into the
streaming heads' ring. In XLA these are six scatters (plus gathers for the old statistics), six
kernel launches per layer; here one launch writes all of them in place, one program per
sequence and KV head (the cache arrays are aliased to the outputs, so nothing else is read or
copied).

Semantics (`append_reference` below is the spec, jnp scatters): for sequence b at position t,
page row `page_table[b, t // page]`, offset `t % page`, logical page `offset // lp` (a token
that opens a logical page resets its statistics, later ones widen them), ring slot `t` if
t < sink else `sink + (t - sink) % local`. The first R KV heads of k, v are retrieval heads
(into the pages), the other S streaming heads (into the ring).

8-bit pages and rings (`kv8.KV8`: int8 or e4m3 values, one float32 scale per token and head):
the kernel quantises each head's K and V row itself (`quant.quantize_amax`, the writers'
quantiser, rounding through `quant.round_half_even`: the Triton lowering has no round; equal to
`kv8.quantize_tokens` in interpret mode, within one rounding step compiled) and stores the values and the scales beside them in the same program, and the
statistics from the unquantised keys, as the reference. (Quantising before the launch, as
earlier, cost the decode step six XLA kernels a layer: two row maxima, two scales, two casts.)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ..kv8 import KV8, store
from ..quant import quantize_amax, round_half_even
from .compat import resolve_interpret, triton_params


def append_reference(k, v, positions, page_table, k_pages, v_pages, k_min, k_max, ring_k, ring_v, *,
                     page: int, lp: int, sink: int, local: int):
    """Pure-jnp spec of `fused_append` (same arguments, same six arrays returned)."""
    b, hkv, d = k.shape
    r = k_pages.shape[0]
    rows = jnp.arange(b)
    if r:
        phys = page_table[rows, positions // page]  # [B]
        off = positions % page
        lpage = off // lp
        kr = jnp.swapaxes(k[:, :r], 0, 1)  # [R, B, D]
        vr = jnp.swapaxes(v[:, :r], 0, 1)
        # a token that opens a logical page resets its statistics; later ones widen them
        fresh = (off % lp == 0)[None, :, None]
        old_min = k_min[:, phys, lpage]  # [R, B, D]
        old_max = k_max[:, phys, lpage]
        kc = kr.astype(k_min.dtype)  # statistics from the unquantised keys
        k_pages = store(k_pages, (slice(None), phys, off), kr)  # FP8 pages (kv8.KV8): quantised here
        v_pages = store(v_pages, (slice(None), phys, off), vr)
        k_min = k_min.at[:, phys, lpage].set(jnp.where(fresh, kc, jnp.minimum(old_min, kc)))
        k_max = k_max.at[:, phys, lpage].set(jnp.where(fresh, kc, jnp.maximum(old_max, kc)))
    if hkv - r:
        slot = jnp.where(positions < sink, positions, sink + (positions - sink) % local)  # [B]
        ks = jnp.swapaxes(k[:, r:], 0, 1)  # [S, B, D]
        vs = jnp.swapaxes(v[:, r:], 0, 1)
        ring_k = store(ring_k, (slice(None), rows, slot), ks)
        ring_v = store(ring_v, (slice(None), rows, slot), vs)
    return k_pages, v_pages, k_min, k_max, ring_k, ring_v


def _kernel(pos_ref, pt_ref, k_ref, v_ref, *refs, r, s, q8, page, lp, sink, local, n_cols):
    # Program (b, h): KV head h of sequence b. k_ref, v_ref: that head's unquantised K and V row
    # [1, D] (the statistics come from k_ref). refs: the cache inputs, then the same arrays as
    # (aliased) outputs: k/v pages and k_min/max when r > 0 (and the pages' scales when q8), ring
    # k/v when s > 0 (and their scales). Inputs are read only for the old statistics. q8: the
    # values are quantised here. One head per program: each program's few dependent loads and
    # stores overlap with the others' (one program walking every head of its sequence waited
    # for each in turn: ~9.5 us a layer at 128K x 4 on an H100).
    n = len(refs) // 2
    ins, outs = refs[:n], refs[n:]
    b, h = pl.program_id(0), pl.program_id(1)
    t = pos_ref[b]
    d = k_ref.shape[-1]
    n_page_out = (6 if q8 else 4) if r else 0  # where the ring's outputs start

    def put(src, dst, scale_ref, head, where):
        row = src[...].reshape(1, 1, 1, d)
        if q8:
            row, sc = quantize_amax(row, -1, dst.dtype, rounding=round_half_even)
            scale_ref[pl.ds(head, 1), where[0], where[1]] = sc.reshape(1, 1, 1)
        dst[pl.ds(head, 1), where[0], where[1], :] = row.astype(dst.dtype)

    if r:
        @pl.when(h < r)
        def _pages():
            kp_ref, vp_ref, kmin_ref, kmax_ref = outs[:4]
            kmin_in, kmax_in = ins[2], ins[3]
            col = t // page  # past the table (a dropped look-ahead step): the scratch page 0
            phys = jnp.where(col < n_cols, pt_ref[b, jnp.minimum(col, n_cols - 1)], 0)
            off = t % page
            lpage = off // lp
            fresh = off % lp == 0
            where = (pl.ds(phys, 1), pl.ds(off, 1))
            put(k_ref, kp_ref, outs[4] if q8 else None, h, where)
            put(v_ref, vp_ref, outs[5] if q8 else None, h, where)
            kc = k_ref[...].reshape(1, 1, 1, d).astype(kmin_ref.dtype)
            at = (pl.ds(h, 1), pl.ds(phys, 1), pl.ds(lpage, 1), slice(None))
            old_min, old_max = kmin_in[at], kmax_in[at]
            kmin_ref[at] = jnp.where(fresh, kc, jnp.minimum(old_min, kc))
            kmax_ref[at] = jnp.where(fresh, kc, jnp.maximum(old_max, kc))

    if s:
        @pl.when(h >= r)
        def _ring():
            rk_ref, rv_ref = outs[n_page_out:n_page_out + 2]
            slot = jnp.where(t < sink, t, sink + (t - sink) % local)
            where = (pl.ds(b, 1), pl.ds(slot, 1))
            put(k_ref, rk_ref, outs[n_page_out + 2] if q8 else None, h - r, where)
            put(v_ref, rv_ref, outs[n_page_out + 3] if q8 else None, h - r, where)


def supported(k_pages, ring_k) -> bool:
    """The kernel needs a power-of-2 head_dim (one row per store) and at least one head."""
    d = k_pages.shape[-1]
    return d > 0 and d & (d - 1) == 0 and (k_pages.shape[0] + ring_k.shape[0]) > 0


@functools.partial(jax.jit, static_argnames=("page", "lp", "sink", "local", "interpret"))
def fused_append(k, v, positions, page_table, k_pages, v_pages, k_min, k_max, ring_k, ring_v, *,
                 page: int, lp: int, sink: int, local: int, interpret: bool | None = None):
    """k, v: [B, Hkv, D] (post-RoPE; the first R heads retrieval); positions int32[B];
    page_table int32[B, N]; k/v_pages [R, P, page, D]; k_min/k_max [R, P, page // lp, D];
    ring_k/v [S, B, W, D] (pages and rings both arrays or both `kv8.KV8`). Returns the six cache
    arrays updated (in place when the caller's arrays can be donated, as in a jitted decode step)."""
    b, hkv, d = k.shape
    r, s = k_pages.shape[0], ring_k.shape[0]
    if r + s != hkv or (s and ring_k.shape[1] != b) or k_pages.shape[-1] != d or ring_k.shape[-1] != d:
        raise ValueError(f"fused_append: {k.shape=} does not match {k_pages.shape=} {ring_k.shape=}")
    q8 = isinstance(k_pages, KV8)
    if q8 != isinstance(ring_k, KV8) or (q8 and k_pages.dtype != ring_k.dtype):
        raise ValueError("fused_append: pages and rings must both be 8-bit of one dtype or both not")
    # the cache arrays in the kernel's order: values (and statistics), then the scales when 8-bit
    vals = (lambda x: x.values) if q8 else (lambda x: x)
    pages = ((vals(k_pages), vals(v_pages), k_min, k_max) + ((k_pages.scale, v_pages.scale) if q8 else ())) if r else ()
    ring = ((vals(ring_k), vals(ring_v)) + ((ring_k.scale, ring_v.scale) if q8 else ())) if s else ()
    caches = pages + ring
    whole = lambda x: pl.BlockSpec(x.shape, lambda i, j: (0,) * x.ndim)
    row = pl.BlockSpec((None, 1, d), lambda i, j: (i, j, 0))  # one head's row per program
    kernel = functools.partial(_kernel, r=r, s=s, q8=q8, page=page, lp=lp, sink=sink, local=max(local, 1),
                               n_cols=page_table.shape[1])
    n_in = 4
    out = pl.pallas_call(
        kernel,
        grid=(b, hkv),
        in_specs=[whole(positions), whole(page_table), row, row] + [whole(x) for x in caches],
        out_specs=[whole(x) for x in caches],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in caches],
        input_output_aliases={n_in + i: i for i in range(len(caches))},
        compiler_params=triton_params(1, 1),
        interpret=resolve_interpret(interpret),
        name="lserve_fused_append",
    )(positions.astype(jnp.int32), page_table.astype(jnp.int32), k, v, *caches)
    out = list(out)
    new_pages, new_ring = out[:len(pages)], out[len(pages):]
    if q8:  # values and scales back into KV8s
        new_pages = [KV8(new_pages[0], new_pages[4]), KV8(new_pages[1], new_pages[5]), *new_pages[2:4]] if r else []
        new_ring = [KV8(new_ring[0], new_ring[2]), KV8(new_ring[1], new_ring[3])] if s else []
    return (tuple(new_pages) if r else (k_pages, v_pages, k_min, k_max)) + (tuple(new_ring) if s else (ring_k, ring_v))
