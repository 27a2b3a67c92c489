"""CPU backend: XLA-friendly implementations of prefill and decode attention.

First in the CPU default order (rank 10, above the reference's 0); each equals the reference
(`tests/test_cpu_path.py`, float32 to 1e-5) and refuses, with `Unsupported`, what it does not
handle, so the reference runs instead. They compile on any platform (plain jnp and lax), but
only the CPU ranks them: on a GPU they run only when a choice names "cpu". Measured against
Hugging Face transformers by bench/peer_hf.py.

prefill ("cpu"): block-sparse attention, flash style; the plain and the offset (`q_offset`,
chunked prefill) forms. Queries in blocks of `block_q` tokens x the G heads of a GQA group (one
[G * block_q, D] operand per KV head, so each key block serves the whole group), an online
softmax in float32 over key blocks. Per query block, `lax.fori_loop`s with traced bounds walk
only the keys the LServe mask can reach, in runs: keys every row of the block sees go in
unmasked blocks of `block_k`, the edges (the diagonal, a window's edges, the sink) in masked
blocks of `block_k_edge`. Retrieval heads: everything up to the diagonal; streaming heads: the
sink and the local window (the Λ), the keys between them skipped. Nothing [T, Tk] is
materialised. A window that covers every key makes streaming heads retrieval heads (dense), as
in the Triton kernel. Options: block_q (default 512 tokens, at most MAX_ROWS // G), block_k
(512), block_k_edge (default block_k; it must divide block_k). The defaults measured best for
SmolLM2's heads (D 64, G 3) over the 512-token chunks of a 2K prompt on 2 cores (fewer, larger
blocks beat smaller edge blocks that waste less of the masked diagonal).

decode ("cpu"): the reference reads every slot of the selection (in a dense layer every page of
the page table, however short the sequence). Here the retrieval heads read only the slots in
use, rounded up to a power of two (a `lax.switch` over the static sizes, picked by the largest
`sel_count` of the batch); in query_head mode, when every selection head's used slots are
exactly its sequence's valid pages (any sequence within the token budget), the pages are read
once per KV head through the page table for the G query heads of the group, not once per query
head. Streaming heads attend over the ring in place. Options: none. (Measured on 2 cores: at 2K
tokens decode attention is bound by memory traffic, the gathered copy of the pages included; a
loop over 8-page blocks with an online softmax, to keep each gathered block in cache, was no
faster.)

append ("cpu", unranked): the reference's scatters under this backend's name (a choice naming
"cpu" for decode names it for append too: `Kernels.from_names`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from ..pallas.append import append_reference
from ..kv8 import KV8
from .registry import Unsupported, register

CPU_FIRST = {"cpu": 10}  # above the reference (0); other platforms only when named

PREFILL_OPTIONS = frozenset({"block_q", "block_k", "block_k_edge"})
MAX_ROWS = 2048  # prefill query rows (tokens x GQA heads) per block: a [MAX_ROWS, 512] f32 tile is 4 MiB
DECODE_OPTIONS = frozenset()
_FLOATS = (jnp.float32, jnp.bfloat16, jnp.float16)
_HI = lax.Precision.HIGHEST  # the reference's precision: float32 dots stay IEEE on every platform
_LOG2E = math.log2(math.e)
_M_INIT = -1e30  # running max start: finite, so exp2(m - m_new) of an empty row stays finite


def _check_options(op: str, options: dict, allowed: frozenset) -> None:
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for the CPU {op}; it takes {sorted(allowed)}")


def _cdiv(a, b: int):
    return (a + (b - 1)) // b


# --------------------------------------------------------------------------------------------
# prefill
# --------------------------------------------------------------------------------------------


@register("prefill", "cpu", priority=CPU_FIRST)
def prefill(q, k, v, lengths, *, num_retrieval, sink, local, scale, q_offset=None, options):
    _check_options("prefill", options, PREFILL_OPTIONS)
    if q.dtype not in _FLOATS:
        raise Unsupported(f"the CPU prefill takes float32/bfloat16/float16, got {q.dtype=}")
    block_q = int(options.get("block_q", 512))
    block_k = int(options.get("block_k", 512))
    block_k_edge = int(options.get("block_k_edge", block_k))
    if block_q < 1 or block_k < 1 or block_k_edge < 1 or block_k % block_k_edge:
        raise ValueError(f"block_q, block_k, block_k_edge must be >= 1 and block_k_edge must divide block_k, "
                         f"got {block_q=} {block_k=} {block_k_edge=}")
    return blocked_prefill(q, k, v, lengths, num_retrieval=num_retrieval, sink=sink, local=local, scale=scale,
                           q_offset=q_offset, block_q=block_q, block_k=block_k, block_k_edge=block_k_edge)


def blocked_prefill(q, k, v, lengths, *, num_retrieval: int, sink: int, local: int, scale: float,
                    q_offset=None, block_q: int = 512, block_k: int = 512, block_k_edge: int = 512):
    """The LServe prefill mask (see `ops.prefill`) by blocks; shapes already validated."""
    b, t, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    if sink >= tk or local >= tk:  # the window covers every key: plain causal attention
        num_retrieval = hkv
    bq = min(block_q, t, max(1, MAX_ROWS // g))  # score tiles of at most MAX_ROWS x block_k
    bke = min(block_k_edge, tk)
    bk = min(block_k, _cdiv(tk, bke) * bke)  # a multiple of bke
    t_pad, tk_pad = _cdiv(t, bq) * bq, _cdiv(tk, bke) * bke  # every run ends by tk_pad
    off = jnp.zeros((b,), jnp.int32) if q_offset is None else q_offset.astype(jnp.int32)
    lengths = lengths.astype(jnp.int32)
    # float32 math as the reference's: [B, Hkv, T, G, D] queries with the softmax scale (log2
    # units) folded in; keys and values [B, Hkv, Tk, D]
    qs = q.astype(jnp.float32) * (scale * _LOG2E)
    qs = jnp.pad(qs, ((0, 0), (0, t_pad - t), (0, 0), (0, 0))).reshape(b, t_pad, hkv, g, d).transpose(0, 2, 1, 3, 4)
    ks = jnp.pad(k.astype(jnp.float32), ((0, 0), (0, tk_pad - tk), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    vs = jnp.pad(v.astype(jnp.float32), ((0, 0), (0, tk_pad - tk), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    outs = []
    r = num_retrieval
    for lo, hi, streaming in ((0, r, False), (r, hkv, True)):
        if hi > lo:
            outs.append(_prefill_group(qs[:, lo:hi], ks[:, lo:hi], vs[:, lo:hi], off, lengths, streaming=streaming,
                                       sink=sink, local=local, bq=bq, bk=bk, bke=bke, t=t, tk=tk))
    o = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)  # [B, Hkv, T_pad, G, D]
    o = o.transpose(0, 2, 1, 3, 4)[:, :t].reshape(b, t, hq, d)
    row_ok = jnp.arange(t)[None, :] < lengths[:, None]
    return jnp.where(row_ok[:, :, None, None], o, 0).astype(q.dtype)


def _prefill_group(qs, ks, vs, off, lengths, *, streaming: bool, sink: int, local: int, bq: int, bk: int,
                   bke: int, t: int, tk: int):
    """One kind of heads. qs [B, H, T_pad, G, D] float32 (scaled, log2 units), ks/vs float32
    [B, H, Tk_pad, D] (keys [tk, Tk_pad) padding); off, lengths int32 [B]. Returns float32
    [B, H, T_pad, G, D] (rows past a length: any value, the caller zeroes them).

    Per query block the visible keys are walked in runs (key offsets, multiples of bke): keys
    visible to every row of the block go in unmasked blocks of bk, the others (the diagonal, a
    window's edges, the sink) in masked blocks of bke, so the mask's waste is at most bke keys a
    row at each edge."""
    b, h, t_pad, g, d = qs.shape
    tk_pad = vs.shape[2]
    m_rows = bq * g
    # rows of a query block: token-major, the G heads of a token adjacent
    row_tok = jnp.arange(m_rows, dtype=jnp.int32) // g  # [M]

    def q_block(qi, out):
        q0 = qi * bq
        qb = lax.dynamic_slice_in_dim(qs, q0, bq, axis=2).reshape(b, h, m_rows, d)
        pos = off[:, None] + q0 + row_tok[None, :]  # [B, M] key position of each row
        # rows that matter: those < length (the others are zeroed by the caller)
        last = jnp.max(off + jnp.minimum(q0 + bq, lengths) - 1)  # the last valid row's position
        first = jnp.min(off + q0)  # the first row's position
        any_row = jnp.max(jnp.minimum(q0 + bq, lengths) - q0) > 0

        def body(i, carry, base, size: int, masked: bool):
            acc, m, l = carry
            k0 = base + i * size
            kblk = lax.dynamic_slice_in_dim(ks, k0, size, axis=2)
            vblk = lax.dynamic_slice_in_dim(vs, k0, size, axis=2)
            s = jnp.einsum("bhmd,bhkd->bhmk", qb, kblk, precision=_HI, preferred_element_type=jnp.float32)
            if masked:
                j = (k0 + jnp.arange(size, dtype=jnp.int32))[None, None, None, :]
                i_pos = pos[:, None, :, None]  # [B, 1, M, 1]
                ok = j <= i_pos
                if tk_pad != tk:  # padded keys (reachable only when off + length > Tk)
                    ok = ok & (j < tk)
                if streaming:
                    ok = ok & ((j < sink) | (i_pos - j < local))
                s = jnp.where(ok, s, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            p = jnp.exp2(s - m_new[..., None])
            alpha = jnp.exp2(m - m_new)
            l = l * alpha + jnp.sum(p, axis=-1)
            pv = jnp.einsum("bhmk,bhkd->bhmd", p, vblk, precision=_HI, preferred_element_type=jnp.float32)
            return acc * alpha[..., None] + pv, m_new, l

        def run(carry, start, stop, size, masked):
            """Keys [start, stop) (multiples of `size` apart) in blocks of `size`."""
            n = jnp.maximum(stop - start, 0) // size
            return lax.fori_loop(0, n, lambda i, c: body(i, c, start, size, masked), carry)

        carry = (jnp.zeros((b, h, m_rows, d), jnp.float32), jnp.full((b, h, m_rows), _M_INIT, jnp.float32),
                 jnp.zeros((b, h, m_rows), jnp.float32))
        # keys [0, end) can be visible to some valid row (causal); [0, full) to every row
        end = jnp.where(any_row, jnp.minimum(_cdiv(last + 1, bke) * bke, tk_pad), 0)
        full = jnp.clip(jnp.minimum(first + 1, tk) // bke * bke, 0, end)
        if not streaming:
            f_big = full // bk * bk
            carry = run(carry, 0, f_big, bk, False)
            carry = run(carry, f_big, end, bke, True)
        else:
            # the sink [0, s_end); the window's leading edge [lead, a); keys inside every row's
            # window and below the diagonal [a, a_end) unmasked; the diagonal edge [a_end, end)
            s_end = jnp.minimum(_cdiv(sink, bke) * bke, end)
            lead = jnp.clip(jnp.floor_divide(first - local + 1, bke) * bke, s_end, end)
            a = jnp.clip(_cdiv(last - local + 1, bke) * bke, lead, end)
            a_end = a + jnp.maximum(jnp.clip(full, a, end) - a, 0) // bk * bk
            carry = run(carry, 0, s_end, bke, True)
            carry = run(carry, lead, a, bke, True)
            carry = run(carry, a, a_end, bk, False)
            carry = run(carry, a_end, end, bke, True)
        acc, _, l = carry
        o = acc / jnp.where(l == 0, 1.0, l)[..., None]
        return lax.dynamic_update_slice_in_dim(out, o.reshape(b, h, bq, g, d), q0, axis=2)

    out = jnp.zeros((b, h, t_pad, g, d), jnp.float32)
    return lax.fori_loop(0, _cdiv(t, bq), q_block, out)


# --------------------------------------------------------------------------------------------
# decode
# --------------------------------------------------------------------------------------------


def _sizes(k: int) -> tuple[int, ...]:
    """Slot counts of the decode branches: powers of two below k, then k."""
    out, n = [], 1
    while n < k:
        out.append(n)
        n *= 2
    return tuple(out) + (k,)


def _bucket(n, sizes: tuple[int, ...]):
    """The index of the first of `sizes` (increasing) that is >= n (the last if none is)."""
    return jnp.minimum(sum((n > m).astype(jnp.int32) for m in sizes[:-1]), len(sizes) - 1)


def _attend(q, keys, vals, ok, scale):
    """q [B, H, M, D]; keys, vals [B, H, T, D]; ok bool [B, H, T] -> [B, H, M, D] float32 (rows
    with no visible key: 0), the reference's math. The scores are computed as keys x q (a plain
    [T, D] x [D, M] product: with M a handful of rows, q x keys^T measured slower) and
    transposed (small)."""
    s = jnp.einsum("bhtd,bhmd->bhmt", keys, q, preferred_element_type=jnp.float32, precision=_HI) * scale
    s = jnp.where(ok[:, :, None, :], s, -jnp.inf)
    mx = jnp.max(s, axis=-1, keepdims=True)
    mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
    e = jnp.exp(s - mx)
    den = jnp.sum(e, axis=-1, keepdims=True)
    o = jnp.einsum("bhmt,bhtd->bhmd", e, vals.astype(jnp.float32), preferred_element_type=jnp.float32,
                   precision=_HI)
    return jnp.where(den > 0, o / jnp.where(den > 0, den, 1.0), 0.0)


def _gather(pages, kv, phys):
    """pages [Hk, P, page, D], kv int32 [H] (the KV head of each program head), phys int32
    [B, H, m] -> [B, H, m * page, D]."""
    b, h, m = phys.shape
    page, d = pages.shape[2:]
    return pages[kv[None, :, None], phys].reshape(b, h, m * page, d)


@register("decode", "cpu", priority=CPU_FIRST)
def decode(q, k_pages, v_pages, ring_k, ring_v, page_table, lengths, sel_pages, sel_count, *, mode, scale,
           dense=False, options):
    _check_options("decode", options, DECODE_OPTIONS)
    if q.dtype not in _FLOATS:
        raise Unsupported(f"the CPU decode takes float32/bfloat16/float16, got {q.dtype=}")
    if isinstance(k_pages, KV8) or isinstance(ring_k, KV8):
        raise Unsupported("the CPU decode reads no FP8 KV pages yet (the reference does)")
    b, hq, d = q.shape
    r, s = k_pages.shape[0], ring_k.shape[0]
    g = hq // (r + s)
    lengths = lengths.astype(jnp.int32)
    outs = []
    if r:
        outs.append(_retrieval_decode(q[:, : r * g], k_pages, v_pages, page_table, lengths, sel_pages,
                                      sel_count.astype(jnp.int32), mode=mode, scale=scale, g=g))
    if s:
        outs.append(_ring_decode(q[:, r * g:], ring_k, ring_v, lengths, scale=scale, g=g))
    o = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
    return o.astype(q.dtype)


def _ring_decode(q, ring_k, ring_v, lengths, *, scale, g):
    """Streaming heads over their ring: q [B, S*G, D]; ring [S, B, W, D]; slots [0, min(len, W)).

    Products and sums rather than dots, so the ring is read in its own layout: a dot over it
    makes XLA copy the ring (the decode step's in-place append into the ring is duplicated for
    the dot's layout), and the ring is small (W = sink + local slots)."""
    s, b, w, d = ring_k.shape
    qh = q.reshape(b, s, g, d).transpose(1, 0, 2, 3).astype(jnp.float32)  # [S, B, G, D]
    ok = jnp.arange(w)[None, :] < jnp.minimum(lengths, w)[:, None]  # [B, W]
    x = jnp.sum(qh[:, :, :, None, :] * ring_k[:, :, None, :, :].astype(jnp.float32), axis=-1) * scale
    x = jnp.where(ok[None, :, None, :], x, -jnp.inf)  # [S, B, G, W]
    mx = jnp.max(x, axis=-1, keepdims=True)
    mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
    e = jnp.exp(x - mx)
    den = jnp.sum(e, axis=-1, keepdims=True)
    o = jnp.sum(e[..., None] * ring_v[:, :, None, :, :].astype(jnp.float32), axis=-2)  # [S, B, G, D]
    o = jnp.where(den > 0, o / jnp.where(den > 0, den, 1.0), 0.0)
    return o.transpose(1, 0, 2, 3).reshape(b, s * g, d)


def _retrieval_decode(q, k_pages, v_pages, page_table, lengths, sel_pages, sel_count, *, mode, scale, g):
    """Retrieval heads: q [B, R*G, D]; the selection's used slots only (see the module doc)."""
    b, hr, d = q.shape
    r, p, page, _ = k_pages.shape
    n = page_table.shape[1]
    hsel, kslots = sel_pages.shape[1:]
    count = jnp.clip(sel_count, 0, kslots)  # [B, Hsel]
    lg_all = jnp.clip(sel_pages, 0, n - 1)  # the reference's clipping
    n_valid = (lengths + page - 1) // page  # [B] pages holding some position < length
    qm = q.reshape(b, r, g, d) if mode == "kv_head" else q.reshape(b, hr, 1, d)
    kv_sel = jnp.arange(hsel) // (hsel // r)  # kv head of each selection head

    def selected(m):
        def run(_):
            lg = lg_all[..., :m]
            phys = jnp.take_along_axis(page_table, lg.reshape(b, -1), axis=1).reshape(b, hsel, m)
            phys = jnp.clip(phys, 0, p - 1)
            pos = (lg[..., None] * page + jnp.arange(page)).reshape(b, hsel, m * page)
            used = jnp.repeat(jnp.arange(m)[None, None, :] < count[..., None], page, axis=-1)
            ok = used & (pos < lengths[:, None, None])
            o = _attend(qm, _gather(k_pages, kv_sel, phys), _gather(v_pages, kv_sel, phys), ok, scale)
            return o.reshape(b, hr, d)
        return run

    def shared(m):
        # every selection head reads exactly its sequence's valid pages: read them once per KV
        # head, in table order, for the G query heads of the group
        def run(_):
            phys = jnp.clip(jnp.broadcast_to(page_table[:, None, :m], (b, r, m)), 0, p - 1)
            pos = jnp.arange(m * page)[None, :]
            ok = jnp.broadcast_to((pos < lengths[:, None])[:, None], (b, r, m * page))
            kv = jnp.arange(r)
            o = _attend(q.reshape(b, r, g, d), _gather(k_pages, kv, phys), _gather(v_pages, kv, phys), ok, scale)
            return o.reshape(b, hr, d)
        return run

    sel_sizes = _sizes(kslots)
    branches = [selected(m) for m in sel_sizes]
    index = _bucket(jnp.max(count), sel_sizes)  # slots in use, batch-wide
    if mode == "query_head":  # (in kv_head mode the selection is already read once per KV head)
        # whether every selection head's used slots name each valid page exactly once
        tab_sizes = _sizes(n)
        used = jnp.arange(kslots)[None, None, :] < count[..., None]  # [B, Hsel, K]
        hits = jnp.sum((lg_all[..., None] == jnp.arange(n)) & used[..., None], axis=2)  # [B, Hsel, N]
        valid_col = jnp.arange(n)[None, None, :] < n_valid[:, None, None]
        is_all = jnp.all(jnp.where(valid_col, hits == 1, True))
        index = jnp.where(is_all, len(branches) + _bucket(jnp.max(n_valid), tab_sizes), index)
        branches += [shared(m) for m in tab_sizes]
    return lax.switch(index, branches, None)


# --------------------------------------------------------------------------------------------
# append
# --------------------------------------------------------------------------------------------


@register("append", "cpu")  # no rank: the reference's scatters are what XLA runs best on CPU
def append(k, v, positions, page_table, k_pages, v_pages, k_min, k_max, ring_k, ring_v, *, page, lp, sink, local,
           options):
    """The reference's scatters under this backend's name, so that a model naming "cpu" for
    decode (whose append follows it: `Kernels.from_names`) runs. In-place per-row
    dynamic-update-slices measured no faster in the decode step."""
    _check_options("append", options, frozenset())
    return append_reference(k, v, positions, page_table, k_pages, v_pages, k_min, k_max, ring_k, ring_v,
                            page=page, lp=lp, sink=sink, local=local)
