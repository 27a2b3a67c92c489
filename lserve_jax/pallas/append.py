"""Decode-time cache append in one kernel launch (Pallas, Triton lowering).

Per decode step and layer the cache takes one token per sequence: its K and V into the
retrieval heads' pages, the channel-wise min/max of its logical page, and its K and V into the
streaming heads' ring. In XLA these are six scatters (plus gathers for the old statistics), six
kernel launches per layer; here one program per sequence writes all of them in place (the
cache arrays are aliased to the outputs, so nothing else is read or copied).

Semantics (`append_reference` below is the spec, jnp scatters): for sequence b at position t,
page row `page_table[b, t // page]`, offset `t % page`, logical page `offset // lp` (a token
that opens a logical page resets its statistics, later ones widen them), ring slot `t` if
t < sink else `sink + (t - sink) % local`. The first R KV heads of k, v are retrieval heads
(into the pages), the other S streaming heads (into the ring).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ..kv8 import store
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


def _kernel(pos_ref, pt_ref, k_ref, v_ref, *refs, r, s, page, lp, sink, local, n_cols):
    # refs: the cache inputs, then the same arrays as (aliased) outputs: k/v pages and k_min/max
    # when r > 0, ring k/v when s > 0. Inputs are read only for the old statistics.
    n = len(refs) // 2
    ins, outs = refs[:n], refs[n:]
    b = pl.program_id(0)
    t = pos_ref[b]
    d = k_ref.shape[-1]
    if r:
        kp_ref, vp_ref, kmin_ref, kmax_ref = outs[:4]
        kmin_in, kmax_in = ins[2], ins[3]
        col = t // page  # past the table (a dropped look-ahead step): the scratch page 0
        phys = jnp.where(col < n_cols, pt_ref[b, jnp.minimum(col, n_cols - 1)], 0)
        off = t % page
        lpage = off // lp
        fresh = off % lp == 0
        for h in range(r):
            kk = k_ref[pl.ds(h, 1), :].reshape(1, 1, d)
            vv = v_ref[pl.ds(h, 1), :].reshape(1, 1, d)
            kp_ref[h, pl.ds(phys, 1), pl.ds(off, 1), :] = kk.astype(kp_ref.dtype)
            vp_ref[h, pl.ds(phys, 1), pl.ds(off, 1), :] = vv.astype(vp_ref.dtype)
            kc = kk.astype(kmin_ref.dtype)
            old_min = kmin_in[h, pl.ds(phys, 1), pl.ds(lpage, 1), :]
            old_max = kmax_in[h, pl.ds(phys, 1), pl.ds(lpage, 1), :]
            kmin_ref[h, pl.ds(phys, 1), pl.ds(lpage, 1), :] = jnp.where(fresh, kc, jnp.minimum(old_min, kc))
            kmax_ref[h, pl.ds(phys, 1), pl.ds(lpage, 1), :] = jnp.where(fresh, kc, jnp.maximum(old_max, kc))
    if s:
        rk_ref, rv_ref = outs[-2:]
        slot = jnp.where(t < sink, t, sink + (t - sink) % local)
        for h in range(s):
            kk = k_ref[pl.ds(r + h, 1), :].reshape(1, 1, d)
            vv = v_ref[pl.ds(r + h, 1), :].reshape(1, 1, d)
            rk_ref[h, pl.ds(b, 1), pl.ds(slot, 1), :] = kk.astype(rk_ref.dtype)
            rv_ref[h, pl.ds(b, 1), pl.ds(slot, 1), :] = vv.astype(rv_ref.dtype)


def supported(k_pages, ring_k) -> bool:
    """The kernel needs a power-of-2 head_dim (one row per store) and at least one head."""
    d = k_pages.shape[-1]
    return d > 0 and d & (d - 1) == 0 and (k_pages.shape[0] + ring_k.shape[0]) > 0


@functools.partial(jax.jit, static_argnames=("page", "lp", "sink", "local", "interpret"))
def fused_append(k, v, positions, page_table, k_pages, v_pages, k_min, k_max, ring_k, ring_v, *,
                 page: int, lp: int, sink: int, local: int, interpret: bool | None = None):
    """k, v: [B, Hkv, D] (post-RoPE; the first R heads retrieval); positions int32[B];
    page_table int32[B, N]; k/v_pages [R, P, page, D]; k_min/k_max [R, P, page // lp, D];
    ring_k/v [S, B, W, D]. Returns the six cache arrays updated (in place when the caller's
    arrays can be donated, as in a jitted decode step)."""
    b, hkv, d = k.shape
    r, s = k_pages.shape[0], ring_k.shape[0]
    if r + s != hkv or (s and ring_k.shape[1] != b) or k_pages.shape[-1] != d or ring_k.shape[-1] != d:
        raise ValueError(f"fused_append: {k.shape=} does not match {k_pages.shape=} {ring_k.shape=}")
    caches = ((k_pages, v_pages, k_min, k_max) if r else ()) + ((ring_k, ring_v) if s else ())
    whole = lambda x: pl.BlockSpec(x.shape, lambda i: (0,) * x.ndim)
    row = pl.BlockSpec((None, hkv, d), lambda i: (i, 0, 0))
    kernel = functools.partial(_kernel, r=r, s=s, page=page, lp=lp, sink=sink, local=max(local, 1),
                               n_cols=page_table.shape[1])
    out = pl.pallas_call(
        kernel,
        grid=(b,),
        in_specs=[whole(positions), whole(page_table), row, row] + [whole(x) for x in caches],
        out_specs=[whole(x) for x in caches],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in caches],
        input_output_aliases={4 + i: i for i in range(len(caches))},
        compiler_params=triton_params(1, 1),
        interpret=resolve_interpret(interpret),
        name="lserve_fused_append",
    )(positions.astype(jnp.int32), page_table.astype(jnp.int32), k, v, *caches)
    out = list(out)
    pages = tuple(out[:4]) if r else (k_pages, v_pages, k_min, k_max)
    ring = tuple(out[-2:]) if s else (ring_k, ring_v)
    return pages + ring
