"""Paged sparse decode attention: Pallas kernel (Triton lowering), wrapper and jnp reference.

One generic primitive serves both halves of LServe's decode:

* retrieval heads: the selected pages of a paged pool;
* streaming heads: the ring, seen as a pool of `W / pb` contiguous pages per sequence.

Semantics (kernel and reference alike). A *program head* h of sequence b has M query rows
`q[b, head_offset + h]` (a GQA group, or one query head) and reads KV head `h // (H // Hk)` of
the pools. Its slots i < counts[b, h] name physical page `page_ids[b, h, i]` holding the tokens at
positions `logical_ids[b, h, i] * page + o`, o in [0, page); a key is visible iff its slot is in
use and its position is < lengths[b]. Softmax in float32 over the visible keys; rows with no
visible key give zeros. Slots must name distinct pages (a page listed twice counts twice).

Kernel: grid (program head, sequence, split). A split walks `pages_per_split` slots in blocks
of `pages_per_block` pages: it loads the block's page ids (a vector load of an int array), then
gathers those pages of K and V (one `ref[ids]` load each, [ppb, page, D] -> [ppb*page, D]),
masks by slot and position, and runs an online softmax with exp2. With one split the kernel
writes the normalised output; with several it writes (o, m, l) per split and a second small
kernel merges them (split-K, as LServe above 2048 tokens): `combine_splits`, one launch where
XLA made three of the jnp reference `_combine` (a head_dim or row count that is not a power of 2
keeps the jnp combine).

Head dims: Triton loads and dots need power-of-2 tensors, so a head_dim D that is not a power of
2 (96, 80, ...) is split into its binary pieces (96 = 64 + 32), each >= 16: q, K and V are read
piece by piece straight from the pools (static, in-bounds slices of the last axis; nothing is
padded or copied), the logits are the sum of the pieces' dots and the output accumulates per
piece. A power-of-2 D is one piece and traces exactly as a plain [.., D] load. Any D that is a
multiple of 16 works (`head_dim_supported`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ..kv8 import KV8, load
from .compat import resolve_interpret, triton_params
from .sizes import is_pow2, next_pow2

# f32 inputs: IEEE dots (the Triton lowering's DEFAULT is TF32); no effect on bf16 inputs
_IEEE = jax.lax.Precision.HIGHEST

_LOG2E = math.log2(math.e)
_M_INIT = -1e30  # finite running-max start: a fully masked block leaves exp2(m - m_new) finite
NUM_SMS = 132  # H200; only steers the split heuristic




def _d_pieces(d: int) -> tuple[tuple[int, int], ...]:
    """(start, width) of the power-of-2 pieces of the head dim, widest first: 96 -> (0, 64), (64, 32)."""
    pieces, start = [], 0
    for bit in reversed(range(d.bit_length())):
        if d >> bit & 1:
            pieces.append((start, 1 << bit))
            start += 1 << bit
    return tuple(pieces)


def head_dim_supported(d: int) -> bool:
    """The kernels take any head_dim whose power-of-2 pieces are all >= 16 (the dots' minimum):
    a multiple of 16 (16, 32, 48, 64, 80, 96, 128, ...)."""
    return d >= 16 and d % 16 == 0


def _load(ref, lead: tuple, pieces):
    """ref[*lead, piece] for each head-dim piece (ref's last axis is the head dim); one piece:
    the plain whole-row load."""
    if len(pieces) == 1:
        return (ref[lead] if lead else ref[...],)
    mid = (slice(None),) * (ref.ndim - len(lead) - 1)
    return tuple(ref[(*lead, *mid, pl.ds(s, w))] for s, w in pieces)


def validate(q, k_pages, v_pages, page_ids, logical_ids, counts, lengths, head_offset=0):
    """Raises ValueError on inconsistent shapes; called before tracing the kernel."""
    if q.ndim != 4:
        raise ValueError(f"q must be [B, Hq, M, D], got {q.shape=}")
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(f"k/v pages must be [Hk, P, page, D] and equal: {k_pages.shape=} {v_pages.shape=}")
    b, hq, _, d = q.shape
    if page_ids.ndim != 3 or page_ids.shape[0] != b or logical_ids.shape != page_ids.shape:
        raise ValueError(f"page/logical ids must be [B, H, N]: {page_ids.shape=} {logical_ids.shape=} {q.shape=}")
    h = page_ids.shape[1]
    hk = k_pages.shape[0]
    if k_pages.shape[-1] != d:
        raise ValueError(f"head_dim mismatch: {q.shape=} {k_pages.shape=}")
    if hk == 0 or h % hk:
        raise ValueError(f"program heads must be a multiple of kv heads: {page_ids.shape=} {k_pages.shape=}")
    if head_offset < 0 or head_offset + h > hq:
        raise ValueError(f"q has too few heads for {head_offset=} and {page_ids.shape=}: {q.shape=}")
    if counts.shape != (b, h):
        raise ValueError(f"counts must be [B, H]: {counts.shape=} {page_ids.shape=}")
    if lengths.shape != (b,):
        raise ValueError(f"lengths must be [B]: {lengths.shape=} {q.shape=}")


def paged_decode_reference(q, k_pages, v_pages, page_ids, logical_ids, counts, lengths, *,
                           scale: float | None = None, head_offset: int = 0):
    """Pure-jnp spec. q: [B, Hq, M, D]; k/v_pages: [Hk, P, page, D]; ids: int32[B, H, N];
    counts: int32[B, H]; lengths: int32[B]; program head h uses q[:, head_offset + h].
    Returns [B, H, M, D] in q.dtype."""
    validate(q, k_pages, v_pages, page_ids, logical_ids, counts, lengths, head_offset)
    h = page_ids.shape[1]
    q = q[:, head_offset:head_offset + h]
    b, _, m, d = q.shape
    hk, p, page, _ = k_pages.shape
    n = page_ids.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    kv = jnp.arange(h) // (h // hk)  # [H] kv head of each program head
    ids = jnp.clip(page_ids, 0, p - 1)
    # (FP8 pages, kv8.KV8: the gathered slots dequantised)
    k = load(k_pages[kv[None, :, None], ids].reshape(b, h, n * page, d), q.dtype)  # [B, H, N*page, D]
    v = load(v_pages[kv[None, :, None], ids].reshape(b, h, n * page, d), jnp.float32)
    pos = (logical_ids[..., None] * page + jnp.arange(page)).reshape(b, h, n * page)
    used = (jnp.arange(n)[None, None, :] < counts[..., None])
    ok = jnp.repeat(used, page, axis=-1) & (pos < lengths[:, None, None])  # [B, H, N*page]
    s = jnp.einsum("bhmd,bhtd->bhmt", q, k, preferred_element_type=jnp.float32, precision=_IEEE) * scale
    s = jnp.where(ok[:, :, None, :], s, -jnp.inf)
    mx = jnp.max(s, axis=-1, keepdims=True)
    mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
    e = jnp.exp(s - mx)
    den = jnp.sum(e, axis=-1, keepdims=True)
    o = jnp.einsum("bhmt,bhtd->bhmd", e, v, preferred_element_type=jnp.float32, precision=_IEEE)
    return jnp.where(den > 0, o / jnp.where(den > 0, den, 1.0), 0.0).astype(q.dtype)


def _repeat_rows(qs):
    """Dots need >= 16 rows: M < 16 query rows are repeated (identical results), not padded.
    qs: the head-dim pieces of q, each [M, w]."""
    m_rows = qs[0].shape[0]
    rep = max(1, 16 // m_rows)
    if rep > 1:
        qs = tuple(jnp.broadcast_to(q[None], (rep, *q.shape)).reshape(rep * m_rows, q.shape[1]) for q in qs)
    return qs, rep


def _init_carry(qs):
    rows = qs[0].shape[0]
    return (tuple(jnp.zeros(q.shape, jnp.float32) for q in qs), jnp.full((rows,), _M_INIT, jnp.float32),
            jnp.zeros((rows,), jnp.float32))


def _online_step(qs, carry, ks, vs, visible, qk_scale, kscale=None, vscale=None):
    """One block of online softmax over head-dim pieces: qs [rows, w], ks/vs [bk, w] per piece,
    visible bool broadcastable to [rows, bk]; carry (o pieces f32[rows, w], m f32[rows] in log2
    units, l f32[rows]). FP8 pages: ks/vs are e4m3, converted to q's dtype (exact), and
    kscale/vscale f32[1, bk] their per-token scales, applied to the logits' columns (K) and to
    the probabilities' columns before the PV dot (V; the denominator takes the unscaled ones)."""
    os_, m, l = carry
    if kscale is not None:
        ks = tuple(k.astype(qs[0].dtype) for k in ks)
        vs = tuple(v.astype(qs[0].dtype) for v in vs)
    x = None
    for q, k in zip(qs, ks):  # logits: the sum of the pieces' dots
        dot = jnp.dot(q, k.T, preferred_element_type=jnp.float32, precision=_IEEE)
        x = dot if x is None else x + dot
    x = x * qk_scale  # log2 units
    if kscale is not None:
        x = x * kscale
    x = jnp.where(visible, x, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(x, axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(x - m_new[:, None])
    l = alpha * l + jnp.sum(p, axis=1)
    pv = p if vscale is None else p * vscale
    os_ = tuple(alpha[:, None] * o + jnp.dot(pv.astype(v.dtype), v, preferred_element_type=jnp.float32,
                                             precision=_IEEE) for o, v in zip(os_, vs))
    return os_, m_new, l


def _page_block(ids_ref, lg_ref, k_ref, v_ref, start, *, ppb, page, n, length, pieces, ks_ref=None, vs_ref=None):
    """K/V pieces of slots [start, start + ppb) gathered from the pool, and which keys are
    visible: the slot is in use (< n) and its token position (logical page * page + offset) <
    length. With FP8 pages (ks_ref/vs_ref: the pool's per-token scales [P, page]) also the
    block's scales f32[1, ppb * page], else None."""
    ids = jnp.clip(ids_ref[pl.ds(start, ppb)], 0, k_ref.shape[0] - 1)  # an unused slot may hold anything
    lg = lg_ref[pl.ds(start, ppb)]
    k = tuple(x.reshape(ppb * page, x.shape[-1]) for x in _load(k_ref, (ids,), pieces))  # gather of ppb pages
    v = tuple(x.reshape(ppb * page, x.shape[-1]) for x in _load(v_ref, (ids,), pieces))
    slot = start + jax.lax.broadcasted_iota(jnp.int32, (ppb, page), 0)
    pos = lg[:, None] * page + jax.lax.broadcasted_iota(jnp.int32, (ppb, page), 1)
    pos = jnp.where(slot < n, pos, length).reshape(1, ppb * page)  # unused slot -> invisible
    scales = (None, None) if ks_ref is None else (ks_ref[ids].reshape(1, ppb * page), vs_ref[ids].reshape(1, ppb * page))
    return k, v, pos < length, *scales


def _store(ref, pieces, values):
    """ref[:, piece] = value for each head-dim piece (ref [M, D]); one piece: a whole store."""
    if len(pieces) == 1:
        ref[...] = values[0]
    else:
        for (s, w), x in zip(pieces, values):
            ref[:, pl.ds(s, w)] = x


def _write_out(carry, rep, out_refs, split, pieces):
    """Normalised output (one split) or the (o, m, l) partials (split-K) of M = rows / rep."""
    os_, m, l = carry
    rows = m.shape[0]
    m_rows = rows // rep
    if rep > 1:  # the replicas are bitwise equal: any reduction recovers the M rows
        os_ = tuple(jnp.max(o.reshape(rep, m_rows, o.shape[1]), axis=0) for o in os_)
        m = jnp.max(m.reshape(rep, m_rows), axis=0)
        l = jnp.max(l.reshape(rep, m_rows), axis=0)
    if not split:
        (o_ref,) = out_refs
        safe = jnp.where(l > 0, l, 1.0)
        _store(o_ref, pieces, [jnp.where(l[:, None] > 0, o / safe[:, None], 0.0).astype(o_ref.dtype) for o in os_])
    else:
        o_ref, m_ref, l_ref = out_refs
        _store(o_ref, pieces, os_)
        m_ref[...] = m
        l_ref[...] = l


def _kernel(cnt_ref, len_ref, ids_ref, lg_ref, q_ref, k_ref, v_ref, *out_refs,
            page, ppb, pps, qk_scale, split, pieces):
    # cnt_ref: int32[B, H] (whole); len_ref: int32[B] (whole)
    # ids_ref, lg_ref: int32[pps] this split's slots; q_ref: [M, D] (M a power of 2)
    # k_ref, v_ref: [P, page, D] this program's kv head
    # out_refs: o [M, D] (normalised, q dtype) if not split, else o f32[M, D], m f32[M], l f32[M]
    h, b, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    length = len_ref[b]
    n = jnp.clip(cnt_ref[b, h] - s * pps, 0, pps)  # slots of this split in use
    q, rep = _repeat_rows(_load(q_ref, (), pieces))

    def body(i, carry):
        start = pl.multiple_of(i * ppb, ppb)
        k, v, visible, _, _ = _page_block(ids_ref, lg_ref, k_ref, v_ref, start, ppb=ppb, page=page, n=n,
                                          length=length, pieces=pieces)
        return _online_step(q, carry, k, v, visible, qk_scale)

    carry = jax.lax.fori_loop(0, pl.cdiv(n, ppb), body, _init_carry(q))
    _write_out(carry, rep, out_refs, split, pieces)


def _plan(n: int, programs: int, page: int, *, block_tokens: int, pages_per_block, pages_per_split,
          min_split_tokens: int, target_programs: int) -> tuple[int, int, int]:
    """(pages per block, pages per split, splits) for programs of n slots of `page` tokens."""
    ppb = pages_per_block or max(1, block_tokens // page)
    if not is_pow2(ppb):
        raise ValueError(f"pages_per_block must be a power of 2, got {ppb}")
    ppb = max(min(ppb, next_pow2(n)), 16 // page)  # blocks of >= 16 keys for the dots
    if pages_per_split is None:
        pps = choose_split(n, programs, ppb, min_split_pages=max(1, min_split_tokens // page),
                           target_programs=target_programs)
    else:
        pps = pl.cdiv(pages_per_split, ppb) * ppb
    return ppb, pps, pl.cdiv(n, pps)


def _pad_slots(page_ids, logical_ids, n_pad: int):
    """The slot arrays int32, padded to n_pad slots (page ids are clipped to the pool in the
    kernel, where it costs no launch of its own)."""
    ids, lg = page_ids.astype(jnp.int32), logical_ids.astype(jnp.int32)
    n = ids.shape[-1]
    if n_pad != n:
        pad = ((0, 0), (0, 0), (0, n_pad - n))
        ids, lg = jnp.pad(ids, pad), jnp.pad(lg, pad)
    return ids, lg


def _outputs(b: int, h: int, splits: int, mrows: int, d: int, dtype):
    """out_specs and out_shape over the (program head, sequence, split) grid."""
    if splits == 1:
        return (pl.BlockSpec((None, None, mrows, d), lambda i, j, s: (j, i, 0, 0)),
                jax.ShapeDtypeStruct((b, h, mrows, d), dtype))
    return ([pl.BlockSpec((None, None, None, mrows, d), lambda i, j, s: (j, i, s, 0, 0)),
             pl.BlockSpec((None, None, None, mrows), lambda i, j, s: (j, i, s, 0)),
             pl.BlockSpec((None, None, None, mrows), lambda i, j, s: (j, i, s, 0))],
            [jax.ShapeDtypeStruct((b, h, splits, mrows, d), jnp.float32),
             jax.ShapeDtypeStruct((b, h, splits, mrows), jnp.float32),
             jax.ShapeDtypeStruct((b, h, splits, mrows), jnp.float32)])


def _launch(kernel, name, in_specs, args, *, h, b, splits, mrows, m_in, d, dtype, num_warps, num_stages,
            interpret):
    """The (program head, sequence, split) pallas_call, the split-K combine and the row unpadding."""
    out_specs, out_shape = _outputs(b, h, splits, mrows, d, dtype)
    out = pl.pallas_call(
        kernel,
        grid=(h, b, splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=triton_params(num_warps, num_stages),
        interpret=resolve_interpret(interpret),
        name=name,
    )(*args)
    if splits > 1:
        out = combine_splits(*out, dtype=dtype, interpret=interpret)
    return out if mrows == m_in else out[:, :, :m_in]


def choose_split(n_slots: int, programs: int, ppb: int, *, min_split_pages: int,
                 target_programs: int = 2 * NUM_SMS) -> int:
    """Pages per split: enough splits to fill the GPU, none shorter than min_split_pages."""
    max_splits = max(1, pl.cdiv(n_slots, max(ppb, min_split_pages)))
    splits = max(1, min(max_splits, pl.cdiv(target_programs, programs)))
    pps = pl.cdiv(pl.cdiv(n_slots, splits), ppb) * ppb
    return max(pps, ppb)


# float32 K and V blocks, times the pipeline's stages, at most this many bytes of shared memory.
# 128-token float32 blocks at D 128 in 2 stages asked the H100 and H200 for 270368 bytes
# (2 x (K + V) 256 KiB + q 8 KiB; the card has 227 KiB): the D128 float32 dense engine test.
F32_STAGED_KV_BYTES = 192 << 10


def block_tokens(default: int, d: int, itemsize: int, num_stages: int) -> int:
    """Tokens per block: the tuned `default` for 16-bit pages; float32 pages halve it until
    num_stages blocks of K and V fit F32_STAGED_KV_BYTES (at least 16 tokens)."""
    t = default
    if itemsize >= 4:
        while t > 16 and num_stages * 2 * t * next_pow2(d) * itemsize > F32_STAGED_KV_BYTES:
            t //= 2
    return t


@functools.partial(jax.jit, static_argnames=(
    "scale", "head_offset", "pages_per_block", "pages_per_split", "min_split_tokens", "target_programs",
    "num_warps", "num_stages", "interpret"))
def paged_decode(q, k_pages, v_pages, page_ids, logical_ids, counts, lengths, *,
                 scale: float | None = None, head_offset: int = 0,
                 pages_per_block: int | None = None, pages_per_split: int | None = None,
                 min_split_tokens: int = 512, target_programs: int = 2 * NUM_SMS,
                 num_warps: int = 4, num_stages: int = 2, interpret: bool | None = None):
    """Paged decode attention (see the module docstring for the semantics).

    q: [B, Hq, M, D]; k_pages, v_pages: [Hk, P, page, D]; page_ids, logical_ids: int32[B, H, N];
    counts: int32[B, H]; lengths: int32[B]. Program head h takes its rows from
    q[:, head_offset + h] (so a caller can hand over all of a layer's heads without a copy).
    Returns [B, H, M, D] in q.dtype. M below 16 is repeated in the kernel up to 16 rows (no pad).
    Tuning: pages_per_block (default: 256-token blocks), pages_per_split (default:
    split-K only when a program has more than min_split_tokens and the grid is short of
    target_programs), num_warps, num_stages. interpret=None: interpret unless on a GPU.
    """
    validate(q, k_pages, v_pages, page_ids, logical_ids, counts, lengths, head_offset)
    b, _, m_in, d = q.shape
    h = page_ids.shape[1]
    hk, p, page, _ = k_pages.shape
    n = page_ids.shape[-1]
    if not (head_dim_supported(d) and is_pow2(page)):
        raise ValueError(f"paged_decode needs a head_dim multiple of 16 and a power-of-2 page size: "
                         f"{k_pages.shape=}")
    scale = d ** -0.5 if scale is None else scale
    ppb, pps, splits = _plan(n, b * h, page, pages_per_block=pages_per_block,
                             block_tokens=block_tokens(256, d, jnp.dtype(k_pages.dtype).itemsize, num_stages),
                             pages_per_split=pages_per_split, min_split_tokens=min_split_tokens,
                             target_programs=target_programs)
    mrows = next_pow2(m_in)  # power-of-2 blocks; rare (G not a power of 2): pad the rows
    if mrows != m_in:
        q = jnp.pad(q[:, head_offset:head_offset + h], ((0, 0), (0, 0), (0, mrows - m_in), (0, 0)))
        head_offset = 0
    ids, lg = _pad_slots(page_ids, logical_ids, splits * pps)
    group = h // hk
    off = head_offset
    kernel = functools.partial(_kernel, page=page, ppb=ppb, pps=pps, qk_scale=scale * _LOG2E,
                               split=splits > 1, pieces=_d_pieces(d))
    whole = lambda shape: pl.BlockSpec(shape, lambda *_: (0,) * len(shape))
    in_specs = [
        whole((b, h)),  # counts
        whole((b,)),  # lengths
        pl.BlockSpec((None, None, pps), lambda i, j, s: (j, i, s)),  # page ids
        pl.BlockSpec((None, None, pps), lambda i, j, s: (j, i, s)),  # logical ids
        pl.BlockSpec((None, None, mrows, d), lambda i, j, s: (j, off + i, 0, 0)),  # q
        pl.BlockSpec((None, p, page, d), lambda i, j, s: (i // group, 0, 0, 0)),  # k pages
        pl.BlockSpec((None, p, page, d), lambda i, j, s: (i // group, 0, 0, 0)),  # v pages
    ]
    return _launch(kernel, f"lserve_paged_decode_ppb{ppb}_pps{pps}", in_specs,
                   (counts.astype(jnp.int32), lengths.astype(jnp.int32), ids, lg, q, k_pages, v_pages),
                   h=h, b=b, splits=splits, mrows=mrows, m_in=m_in, d=d, dtype=q.dtype, num_warps=num_warps,
                   num_stages=num_stages, interpret=interpret)


def _combine(o, m, l):
    """Merges split partials (the jnp reference of `combine_splits`). o f32[B, H, S, M, D],
    m/l f32[B, H, S, M] (m in log2 units) -> f32[B, H, M, D]."""
    m_all = jnp.max(m, axis=2, keepdims=True)
    w = jnp.exp2(m - m_all)  # [B, H, S, M]
    den = jnp.sum(w * l, axis=2)  # [B, H, M]
    num = jnp.sum(w[..., None] * o, axis=2)  # [B, H, M, D]
    return jnp.where(den[..., None] > 0, num / jnp.where(den > 0, den, 1.0)[..., None], 0.0)


UNROLL_SPLITS = 64  # combine_splits reads up to this many partials with every load issued at once


def _combine_kernel(o_ref, m_ref, l_ref, out_ref, *, splits: int):
    # one (head, sequence): o_ref [S, M, D], m_ref/l_ref [S, M]; two passes over the splits.
    # Up to UNROLL_SPLITS the passes are unrolled when traced: the loads of every split are
    # independent and issue together (a loop waited for each in turn, ~6 us a launch at 256K x 1
    # on an H100, bench/results/profile_decode-2026-12-06i-h100-ab.json).
    mrows, d = o_ref.shape[1:]
    if splits <= UNROLL_SPLITS:
        ms = [m_ref[i, :] for i in range(splits)]
        m_all = functools.reduce(jnp.maximum, ms)
        ws = [jnp.exp2(mi - m_all) for mi in ms]
        num = functools.reduce(jnp.add, [w[:, None] * o_ref[i, :, :] for i, w in enumerate(ws)])
        den = functools.reduce(jnp.add, [w * l_ref[i, :] for i, w in enumerate(ws)])
    else:
        m_all = jax.lax.fori_loop(1, splits, lambda i, acc: jnp.maximum(acc, m_ref[i, :]), m_ref[0, :])

        def add(i, carry):
            num, den = carry
            w = jnp.exp2(m_ref[i, :] - m_all)
            return num + w[:, None] * o_ref[i, :, :], den + w * l_ref[i, :]

        num, den = jax.lax.fori_loop(0, splits, add, (jnp.zeros((mrows, d), jnp.float32),
                                                       jnp.zeros((mrows,), jnp.float32)))
    out = jnp.where(den[:, None] > 0, num / jnp.where(den > 0, den, 1.0)[:, None], 0.0)
    out_ref[...] = out.astype(out_ref.dtype)


def combine_splits(o, m, l, *, dtype, interpret: bool | None = None):
    """`_combine(o, m, l).astype(dtype)` in one launch: grid (head, sequence), each program
    merging its S partials. Rows or a head_dim that are not a power of 2 (Triton tensors must
    be) take the jnp combine."""
    b, h, splits, mrows, d = o.shape
    if not (is_pow2(mrows) and is_pow2(d)):
        return _combine(o, m, l).astype(dtype)
    return pl.pallas_call(
        functools.partial(_combine_kernel, splits=splits),
        grid=(h, b),
        in_specs=[pl.BlockSpec((None, None, splits, mrows, d), lambda i, j: (j, i, 0, 0, 0)),
                  pl.BlockSpec((None, None, splits, mrows), lambda i, j: (j, i, 0, 0)),
                  pl.BlockSpec((None, None, splits, mrows), lambda i, j: (j, i, 0, 0))],
        out_specs=pl.BlockSpec((None, None, mrows, d), lambda i, j: (j, i, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((b, h, mrows, d), dtype),
        compiler_params=triton_params(4, 1),
        interpret=resolve_interpret(interpret),
        name="lserve_combine_splits",
    )(o, m, l)


# --- one launch for a whole layer: selected pages of the retrieval heads + the streaming ring ---


def _fp8_parts(x):
    """(values, per-token scales) of an FP8 pool (kv8.KV8); (x, None) for a plain array."""
    return (x.values, x.scale) if isinstance(x, KV8) else (x, None)


def ring_page(w: int) -> int:
    """Tokens per ring block: the largest power of 2 dividing the ring width, at most 128."""
    return min(w & -w, 128)


def sparse_decode_reference(q, k_pages, v_pages, ring_k, ring_v, page_ids, logical_ids, counts, lengths,
                            *, scale: float | None = None):
    """Spec of `sparse_decode`: the retrieval programs over their selected pages, then the ring
    programs over the valid ring slots [0, min(length, W)), concatenated along the heads."""
    b, hp, m, d = q.shape
    h_ret = page_ids.shape[1]
    outs = []
    if h_ret:
        outs.append(paged_decode_reference(q, k_pages, v_pages, page_ids, logical_ids, counts, lengths,
                                           scale=scale, head_offset=0))
    if hp - h_ret:
        s, _, w, _ = ring_k.shape
        pb = ring_page(w)
        nw = w // pb
        ids = jnp.broadcast_to((jnp.arange(b)[:, None] * nw + jnp.arange(nw))[:, None], (b, hp - h_ret, nw))
        lg = jnp.broadcast_to(jnp.arange(nw), ids.shape)
        ring_len = jnp.minimum(lengths, w).astype(jnp.int32)
        cnt = jnp.broadcast_to(((ring_len + pb - 1) // pb)[:, None], (b, hp - h_ret))
        outs.append(paged_decode_reference(q, ring_k.reshape(s, b * nw, pb, d), ring_v.reshape(s, b * nw, pb, d),
                                           ids.astype(jnp.int32), lg.astype(jnp.int32), cnt.astype(jnp.int32),
                                           ring_len, scale=scale, head_offset=h_ret))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def _sparse_kernel(cnt_ref, len_ref, ids_ref, lg_ref, q_ref, k_ref, v_ref, rk_ref, rv_ref, *refs,
                   page, ppb, pps, h_ret, nw, pb, width, ring_split, qk_scale, split, pieces, fp8):
    # program h < h_ret: retrieval (ids/lg this split's slots, k/v_ref its kv head's pool)
    # program h >= h_ret: ring (rk/rv_ref [B*nw, pb, D] its kv head's ring), `ring_split`
    # blocks of pb tokens per split
    # fp8: refs start with the scales of the pool [P, page] (k, v) and of the ring [B*nw, pb] (k, v)
    ks_ref, vs_ref, rks_ref, rvs_ref = refs[:4] if fp8 else (None,) * 4
    out_refs = refs[4:] if fp8 else refs
    h, b, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    length = len_ref[b]
    q, rep = _repeat_rows(_load(q_ref, (), pieces))
    carry = _init_carry(q)
    if h_ret:
        count = jnp.where(h < h_ret, cnt_ref[b, jnp.minimum(h, h_ret - 1)], 0)
        n = jnp.clip(count - s * pps, 0, pps)  # slots of this split in use

        def body(i, c):
            start = pl.multiple_of(i * ppb, ppb)
            k, v, visible, kscale, vscale = _page_block(ids_ref, lg_ref, k_ref, v_ref, start, ppb=ppb, page=page,
                                                        n=n, length=length, pieces=pieces, ks_ref=ks_ref,
                                                        vs_ref=vs_ref)
            return _online_step(q, c, k, v, visible, qk_scale, kscale, vscale)

        carry = jax.lax.fori_loop(0, pl.cdiv(n, ppb), body, carry)
    if nw:
        ring_len = jnp.minimum(length, width)
        first = s * ring_split  # this split's ring blocks: [first, first + ring_split)
        n_ring = jnp.where(h >= h_ret, jnp.clip(pl.cdiv(ring_len, pb) - first, 0, ring_split), 0)

        def ring_body(i, c):
            blk = (pl.ds(b * nw + first + i, 1),)  # contiguous: no gather
            k = tuple(x.reshape(pb, x.shape[-1]) for x in _load(rk_ref, blk, pieces))
            v = tuple(x.reshape(pb, x.shape[-1]) for x in _load(rv_ref, blk, pieces))
            slot = ((first + i) * pb + jax.lax.broadcasted_iota(jnp.int32, (1, pb), 1))
            scales = (None, None) if not fp8 else (rks_ref[blk].reshape(1, pb), rvs_ref[blk].reshape(1, pb))
            return _online_step(q, c, k, v, slot < ring_len, qk_scale, *scales)

        carry = jax.lax.fori_loop(0, n_ring, ring_body, carry)
    _write_out(carry, rep, out_refs, split, pieces)


@functools.partial(jax.jit, static_argnames=(
    "scale", "pages_per_block", "pages_per_split", "min_split_tokens", "target_programs", "num_warps",
    "num_stages", "interpret"))
def sparse_decode(q, k_pages, v_pages, ring_k, ring_v, page_ids, logical_ids, counts, lengths, *,
                  scale: float | None = None, pages_per_block: int | None = None,
                  pages_per_split: int | None = None, min_split_tokens: int = 256,
                  target_programs: int = 2 * NUM_SMS, num_warps: int = 4, num_stages: int = 2,
                  interpret: bool | None = None):
    """A layer's whole sparse decode attention in one kernel launch.

    q: [B, Hp, M, D] program heads: the first Hret = page_ids.shape[1] are retrieval programs
    (kv head h // (Hret / R) of k/v_pages [R, P, page, D], their slots page_ids / logical_ids
    int32[B, Hret, N], counts int32[B, Hret]), the other Hp - Hret are ring programs (kv head
    (h - Hret) // ((Hp - Hret) / S) of ring_k/v [S, B, W, D], valid slots [0, min(length, W))).
    lengths: int32[B]. Returns [B, Hp, M, D] in q.dtype, equal to `sparse_decode_reference`.
    Retrieval programs split their slots as `paged_decode`; ring programs spread their blocks of
    pb tokens over the same splits (so a short ring is not one long serial program).
    """
    (k_pages, ks), (v_pages, vs), (ring_k, rks), (ring_v, rvs) = map(_fp8_parts, (k_pages, v_pages, ring_k, ring_v))
    fp8 = any(x is not None for x in (ks, vs, rks, rvs))
    b, hp, m_in, d = q.shape
    h_ret = page_ids.shape[1]
    r, s = k_pages.shape[0], ring_k.shape[0]
    if fp8 and ((r and (ks is None or vs is None)) or (s and (rks is None or rvs is None))):
        raise ValueError("FP8 decode needs every pool it reads in FP8 (kv8.KV8): pages and ring alike")
    if (h_ret == 0) != (r == 0) or (hp - h_ret == 0) != (s == 0) or hp == 0:
        raise ValueError(f"program heads do not match the pools: {q.shape=} {page_ids.shape=} "
                         f"{k_pages.shape=} {ring_k.shape=}")
    if (r and h_ret % r) or (s and (hp - h_ret) % s):
        raise ValueError(f"program heads must be a multiple of kv heads: {q.shape=} {page_ids.shape=} "
                         f"{k_pages.shape=} {ring_k.shape=}")
    if r:
        validate(q, k_pages, v_pages, page_ids, logical_ids, counts, lengths)
    if s and (ring_k.shape != ring_v.shape or ring_k.shape[1] != b or ring_k.shape[-1] != d):
        raise ValueError(f"ring k/v must be [S, B, W, D]: {ring_k.shape=} {ring_v.shape=} {q.shape=}")
    if not head_dim_supported(d) or (r and not is_pow2(k_pages.shape[2])):
        raise ValueError(f"sparse_decode needs a head_dim multiple of 16 and a power-of-2 page size: "
                         f"{k_pages.shape=} {q.shape=}")
    scale = d ** -0.5 if scale is None else scale
    lengths = lengths.astype(jnp.int32)
    if r:
        _, p, page, _ = k_pages.shape
        n = page_ids.shape[-1]
        # 128-token blocks by default: measured best on the H200 (bench/decode.py --tune)
        ppb, pps, splits = _plan(n, b * h_ret, page, pages_per_block=pages_per_block,
                                 block_tokens=block_tokens(128, d, jnp.dtype(k_pages.dtype).itemsize, num_stages),
                                 pages_per_split=pages_per_split, min_split_tokens=min_split_tokens,
                                 target_programs=target_programs)
        ids, lg = _pad_slots(page_ids, logical_ids, splits * pps)
        cnt = counts.astype(jnp.int32)
    else:  # ring only: dummy one-page pool and slot lists, never read
        page, ppb, pps, splits, p = 16, 1, 1, 1, 1
        k_pages = v_pages = jnp.zeros((1, 1, page, d), q.dtype)
        ks = vs = jnp.ones((1, 1, page), jnp.float32)
        ids = lg = jnp.zeros((b, 1, 1), jnp.int32)
        cnt = jnp.zeros((b, 1), jnp.int32)
    if s:
        w = ring_k.shape[2]
        # (both powers of 2: pb still divides the ring; float32 rings get shorter blocks)
        pb = min(ring_page(w), block_tokens(128, d, jnp.dtype(ring_k.dtype).itemsize, num_stages))
        if pb < 16:
            raise ValueError(f"ring width {w} needs a power-of-2 factor >= 16 for the kernel")
        nw = w // pb
        rk = ring_k.reshape(s, b * nw, pb, d)
        rv = ring_v.reshape(s, b * nw, pb, d)
        if fp8:
            rks, rvs = rks.reshape(s, b * nw, pb), rvs.reshape(s, b * nw, pb)
    else:
        w, pb, nw = 0, 16, 0
        rk = rv = jnp.zeros((1, 1, 16, d), q.dtype)
        rks = rvs = jnp.ones((1, 1, 16), jnp.float32)
    mrows = next_pow2(m_in)
    if mrows != m_in:
        q = jnp.pad(q, ((0, 0), (0, 0), (0, mrows - m_in), (0, 0)))
    g_ret = h_ret // r if r else 1
    g_ring = (hp - h_ret) // s if s else 1
    hr, sr = max(h_ret, 1), max(s, 1)
    ret_head = lambda i: jnp.minimum(i, hr - 1)
    kernel = functools.partial(_sparse_kernel, page=page, ppb=ppb, pps=pps, h_ret=h_ret, nw=nw, pb=pb, width=w,
                               ring_split=pl.cdiv(nw, splits) if nw else 0, qk_scale=scale * _LOG2E,
                               split=splits > 1, pieces=_d_pieces(d), fp8=fp8)
    whole = lambda shape: pl.BlockSpec(shape, lambda *_: (0,) * len(shape))
    ring_head = lambda i: jnp.clip(i - h_ret, 0, g_ring * sr - 1) // g_ring
    in_specs = [
        whole(cnt.shape),  # counts
        whole((b,)),  # lengths
        pl.BlockSpec((None, None, pps), lambda i, j, t: (j, ret_head(i), t)),  # page ids
        pl.BlockSpec((None, None, pps), lambda i, j, t: (j, ret_head(i), t)),  # logical ids
        pl.BlockSpec((None, None, mrows, d), lambda i, j, t: (j, i, 0, 0)),  # q
        pl.BlockSpec((None, p, page, d), lambda i, j, t: (ret_head(i) // g_ret, 0, 0, 0)),  # k pages
        pl.BlockSpec((None, p, page, d), lambda i, j, t: (ret_head(i) // g_ret, 0, 0, 0)),  # v pages
        pl.BlockSpec((None, rk.shape[1], pb, d),
                     lambda i, j, t: (jnp.clip(i - h_ret, 0, g_ring * sr - 1) // g_ring, 0, 0, 0)),  # ring k
        pl.BlockSpec((None, rk.shape[1], pb, d),
                     lambda i, j, t: (jnp.clip(i - h_ret, 0, g_ring * sr - 1) // g_ring, 0, 0, 0)),  # ring v
    ]
    args = [cnt, lengths, ids, lg, q, k_pages, v_pages, rk, rv]
    if fp8:  # the per-token scales, blocked as the pools they scale
        in_specs += [pl.BlockSpec((None, p, page), lambda i, j, t: (ret_head(i) // g_ret, 0, 0))] * 2
        in_specs += [pl.BlockSpec((None, rks.shape[1], pb), lambda i, j, t: (ring_head(i), 0, 0))] * 2
        args += [ks, vs, rks, rvs]
    return _launch(kernel, f"lserve_sparse_decode{'_fp8' if fp8 else ''}_ppb{ppb}_pps{pps}", in_specs,
                   tuple(args), h=hp, b=b, splits=splits, mrows=mrows,
                   m_in=m_in, d=d, dtype=q.dtype, num_warps=num_warps, num_stages=num_stages,
                   interpret=interpret)
