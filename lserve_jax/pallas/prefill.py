"""Unified block-sparse prefill attention (LServe): Pallas kernel (Triton lowering) + jnp reference.

Semantics (shared by the kernel and the reference):

* ``q: [B, T, Hq, D]``, ``k, v: [B, T, Hkv, D]``, ``G = Hq // Hkv``; query head ``i`` reads
  KV head ``i // G``. ``lengths: int32[B]``, sequences right-padded.
* KV heads ``[0, num_retrieval)`` are *retrieval* heads: key ``j`` is visible from query ``i``
  iff ``j <= i`` and ``j < lengths[b]``.
* The other KV heads are *streaming* heads: additionally ``j < sink`` or ``i - j < local``.
* Output ``[B, T, Hq, D]`` in ``q.dtype``; rows ``i >= lengths[b]`` are zero; softmax scale
  defaults to ``1/sqrt(D)``; accumulation in float32.
* Offset form (a chunk of a longer prompt, ``q_offset: int32[B]``): ``k, v`` are ``[B, Tk, Hkv,
  D]`` with ``Tk >= T``; query row ``i`` sits at position ``q_offset[b] + i`` of the keys, so
  key ``j`` is visible iff ``j <= q_offset[b] + i`` and ``j < q_offset[b] + lengths[b]``
  (streaming heads: and ``j < sink`` or ``q_offset[b] + i - j < local``). Rows
  ``i >= lengths[b]`` are zero. ``q_offset = 0`` with ``Tk = T`` is the plain form.

Kernel layout: one program per (q block, KV-head slot, sequence). A program loads the
``block_q`` tokens x ``block_h`` query heads of one GQA group and folds them into the M
dimension of the dots (``M = block_q * block_h`` rows), so each K/V block it loads serves all
of those heads. It walks only the KV blocks it needs, computed in the kernel from
``(sink, local, row, length)``:

* retrieval heads: blocks ``[0, n_full)`` unmasked (every key visible to every row), then the
  blocks up to the diagonal / the length with a token-exact mask;
* streaming heads: the sink blocks, then the local window's blocks: masked at its two edges,
  unmasked in between.

No mask tensor is materialised; the trip counts are dynamic (``lax.fori_loop`` with traced
bounds lowers to ``scf.for`` on Triton).

Offset form in the kernel: ``q_offset`` is a traced int32[B] input like ``lengths``; every block
list above is computed in key positions (a q block's rows sit at ``q_offset[b] + row``, keys
``[0, q_offset[b] + lengths[b])`` exist), queries and keys are padded each to their own block.
Without ``q_offset`` the kernel is traced exactly as the plain form (no offset input).

Masking: masked logits are ``-inf`` and the running max starts at a finite ``-1e30``, so a row
with no visible key in a block (sink 0: the window's leading edge) contributes exactly nothing.
"""

from __future__ import annotations

import functools
import math

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
import numpy as np

from lserve_jax.pallas import compat

__all__ = [
    "prefill_attention_pallas",
    "prefill_attention_reference",
    "validate_prefill_args",
    "default_block_config",
]

_LOG2E = math.log2(math.e)


# --------------------------------------------------------------------------------------------
# Shape validation (shared with the dispatch layer).
# --------------------------------------------------------------------------------------------


def validate_prefill_args(q, k, v, lengths, *, num_retrieval: int, sink: int, local: int, q_offset=None):
    """Raise ValueError on inconsistent shapes / knobs. Called before any tracing."""
    if q.ndim != 4:
        raise ValueError(f"q must be [B, T, Hq, D], got {q.shape=}")
    if k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"k and v must be [B, T, Hkv, D], got {k.shape=} {v.shape=}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {k.shape=} {v.shape=}")
    b, t, hq, d = q.shape
    if q_offset is None:
        if k.shape[0] != b or k.shape[1] != t or k.shape[3] != d:
            raise ValueError(
                f"k/v must be [B, T, Hkv, D] with q's B, T, D; got {q.shape=} {k.shape=}")
    else:
        if k.shape[0] != b or k.shape[1] < t or k.shape[3] != d:
            raise ValueError(
                f"with q_offset, k/v must be [B, Tk >= T, Hkv, D] with q's B, D; got {q.shape=} {k.shape=}")
        if getattr(q_offset, "shape", None) != (b,) or not jnp.issubdtype(q_offset.dtype, jnp.integer):
            raise ValueError(f"q_offset must be an integer array [B]={b}, got {q_offset!r}")
    hkv = k.shape[2]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"q heads must be a multiple of kv heads, got {q.shape=} {k.shape=}")
    if lengths.shape != (b,):
        raise ValueError(f"lengths must be [B]={b}, got {lengths.shape=}")
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths must be integer, got {lengths.dtype=}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype=} {k.dtype=} {v.dtype=}")
    for name, val in (("num_retrieval", num_retrieval), ("sink", sink), ("local", local)):
        if not isinstance(val, (int, np.integer)) or isinstance(val, bool):
            raise ValueError(f"{name} must be a static Python int, got {val!r}")
    if not 0 <= num_retrieval <= hkv:
        raise ValueError(f"num_retrieval must be in [0, Hkv={hkv}], got {num_retrieval=}")
    if sink < 0 or local < 0:
        raise ValueError(f"sink and local must be >= 0, got {sink=} {local=}")
    if num_retrieval < hkv and sink == 0 and local == 0:
        raise ValueError("streaming heads need sink > 0 or local > 0 (else rows see no key)")


# --------------------------------------------------------------------------------------------
# Pure-jnp reference: exactly the semantics above, dense masks, float32 math.
# --------------------------------------------------------------------------------------------


def prefill_attention_reference(q, k, v, lengths, *, num_retrieval: int, sink: int,
                                local: int, scale: float | None = None, q_offset=None) -> jax.Array:
    validate_prefill_args(q, k, v, lengths, num_retrieval=num_retrieval, sink=sink, local=local,
                          q_offset=q_offset)
    b, t, hq, d = q.shape
    tk = k.shape[1]
    off = jnp.zeros((b,), jnp.int32) if q_offset is None else q_offset.astype(jnp.int32)
    hkv = k.shape[2]
    g = hq // hkv
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    hi = lax.Precision.HIGHEST
    qf = q.astype(jnp.float32).reshape(b, t, hkv, g, d)
    kf = k.astype(jnp.float32)
    vf = v.astype(jnp.float32)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qf, kf, precision=hi) * scale  # [B, Hkv, G, T, Tk]
    i = off[:, None, None] + jnp.arange(t)[None, :, None]               # [B, T, 1] positions
    j = jnp.arange(tk)[None, None, :]                                   # [1, 1, Tk]
    causal = j <= i                                                     # [B, T, Tk]
    in_len = j < (off + lengths.astype(jnp.int32))[:, None, None]       # [B, 1, Tk]
    window = (j < sink) | (i - j < local)                               # [B, T, Tk]
    is_ret = jnp.arange(hkv) < num_retrieval                            # [Hkv]
    head_ok = is_ret[None, :, None, None] | window[:, None]             # [B, Hkv, T, Tk]
    mask = (causal & in_len)[:, None] & head_ok                         # [B, Hkv, T, Tk]
    mask = mask[:, :, None]                                             # [B, Hkv, 1, T, Tk]
    s = jnp.where(mask, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("bhgqk,bkhd->bqhgd", p, vf, precision=hi)            # [B, T, Hkv, G, D]
    l = jnp.moveaxis(l[..., 0], 3, 1)[..., None]                        # [B, T, Hkv, G, 1]
    o = o / jnp.where(l == 0, 1.0, l)
    row_ok = jnp.arange(t)[None, :] < lengths.astype(jnp.int32)[:, None]  # [B, T]
    o = jnp.where(row_ok[:, :, None, None, None], o, 0.0)
    return o.reshape(b, t, hq, d).astype(q.dtype)


# --------------------------------------------------------------------------------------------
# Kernel.
# --------------------------------------------------------------------------------------------


def _cdiv(a, b: int):
    return lax.div(a + (b - 1), b)


# Running-max start, in the scaled (log2) domain: finite, far below any real scaled logit. Masked
# logits are -inf, so a row with no visible key in a block gets p = exp2(-inf) = 0 and alpha =
# exp2(0) = 1, never inf or NaN (a finite mask value is not safe: see `_prefill_kernel`).
_M_INIT = -1e30


def _prefill_kernel(
    lengths_ref,  # [B] int32 (whole array; one scalar read)
    *refs,        # (offsets_ref [B] int32 if has_offset), q_ref, k_ref, v_ref, o_ref
    sm_scale: float,
    block_k: int,
    num_q_blocks: int,
    head_splits: int,
    num_retrieval: int,
    num_kv_heads: int,
    sink: int,
    local: int,
    has_offset: bool,
    num_keys: int,
):
    # q_ref: [block_q, block_h, D] tokens x heads of one GQA group; k_ref, v_ref: [Tk_pad, D] one
    # sequence, one KV head; o_ref like q_ref.
    if has_offset:
        offsets_ref, q_ref, k_ref, v_ref, o_ref = refs
    else:
        q_ref, k_ref, v_ref, o_ref = refs
    block_q, block_h, head_dim = q_ref.shape
    rows = block_q * block_h
    qi = num_q_blocks - 1 - pl.program_id(0)  # heaviest q blocks are launched first
    kv_head = pl.program_id(1) // head_splits
    length = lengths_ref[pl.program_id(2)]

    q0 = qi * block_q  # first query row of the block
    q = q_ref[...].reshape(rows, head_dim)
    # Query row of every row of the folded [tokens x heads] M dimension.
    qrow = q0 + lax.div(lax.broadcasted_iota(jnp.int32, (rows,), 0), block_h)
    row_end = jnp.minimum(q0 + block_q, length)          # exclusive end of the valid rows
    if has_offset:
        # Key positions: query row i sits at offset + i; keys [0, key_end) exist.
        off = offsets_ref[pl.program_id(2)]
        key_end = jnp.minimum(off + length, num_keys)
        p0, qpos, pos_end = off + q0, off + qrow, off + row_end
    else:
        key_end, p0, qpos, pos_end = length, q0, qrow, row_end

    # keys [0, kv_end) may be visible (an offset past the keys reads none of them)
    kv_end = jnp.where(q0 < length, jnp.minimum(pos_end, key_end) if has_offset else pos_end, 0)
    n_end = _cdiv(kv_end, block_k)
    # Blocks whose every key is visible to every row (causal and length-wise).
    n_full = jnp.minimum(lax.div(jnp.minimum(p0 + 1, key_end), block_k), n_end)

    any_streaming = num_retrieval < num_kv_heads
    all_streaming = num_retrieval == 0
    if any_streaming:
        ns = _cdiv(jnp.minimum(kv_end, sink), block_k)     # sink blocks [0, ns)
        ls = lax.div(jnp.maximum(p0 - local + 1, 0), block_k)
        lo = jnp.minimum(jnp.maximum(ns, ls), n_end)       # local blocks [lo, n_end)
        r1 = pos_end - 1                                   # position of the last valid row
        a = _cdiv(jnp.maximum(r1 - local + 1, 0), block_k)  # first block inside every row's window
        a = jnp.minimum(jnp.maximum(a, lo), n_end)
        b = jnp.minimum(jnp.maximum(n_full, a), n_end)
        if all_streaming:
            is_ret = None
        else:
            is_ret = kv_head < num_retrieval
            zero = jnp.int32(0)
            ns = jnp.where(is_ret, zero, ns)
            lo = jnp.where(is_ret, zero, lo)
            a = jnp.where(is_ret, zero, a)
            b = jnp.where(is_ret, n_full, b)
    else:
        is_ret = None

    qk_scale = sm_scale * _LOG2E
    # f32 inputs: IEEE dots (the Triton lowering's DEFAULT precision is TF32).
    precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else None

    def body(kb, carry, *, masked: bool):
        acc, m_i, l_i = carry  # m_i is in the scaled (log2) domain
        start = pl.multiple_of(kb * block_k, block_k)
        k = k_ref[pl.ds(start, block_k), :]
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                            preferred_element_type=jnp.float32)  # [rows, block_k], unscaled
        if masked:
            kpos = start + lax.broadcasted_iota(jnp.int32, (block_k,), 0)
            mask = (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] < key_end)
            if any_streaming:
                window = (kpos[None, :] < sink) | (qpos[:, None] - kpos[None, :] < local)
                if is_ret is not None:
                    window = window | is_ret
                mask = mask & window
            # -inf, not a large finite value: with a finite mask value v, a row with no visible
            # key has m_new = round(v * qk_scale) and the fused s * qk_scale - m_new (one FMA on
            # the GPU, and on XLA:CPU) is the rounding error of that product, ~1e30 in magnitude;
            # when positive, exp2 gives inf and a later block's alpha = 0 turns it into NaN
            # (sink 0 at head dim 96 and 128, whose sign of that error happens to be positive).
            s = jnp.where(mask, s, -jnp.inf)
        m_new = jnp.maximum(m_i, jnp.max(s, axis=1) * qk_scale)
        alpha = jnp.exp2(m_i - m_new)
        p = jnp.exp2(s * qk_scale - m_new[:, None])  # one FMA per logit
        l_new = l_i * alpha + jnp.sum(p, axis=1)
        v = v_ref[pl.ds(start, block_k), :]
        pv = jnp.dot(p.astype(v.dtype), v, precision=precision,
                     preferred_element_type=jnp.float32)
        acc = acc * alpha[:, None] + pv
        return acc, m_new, l_new

    masked_body = functools.partial(body, masked=True)
    plain_body = functools.partial(body, masked=False)

    carry = (
        jnp.zeros((rows, head_dim), jnp.float32),
        jnp.full((rows,), _M_INIT, jnp.float32),  # finite: m_i - m_new is never -inf - -inf
        jnp.zeros((rows,), jnp.float32),
    )
    if any_streaming:
        carry = lax.fori_loop(0, ns, masked_body, carry)    # sink blocks
        carry = lax.fori_loop(lo, a, masked_body, carry)    # window's leading edge
        carry = lax.fori_loop(a, b, plain_body, carry)      # interior (retrieval: [0, n_full))
        carry = lax.fori_loop(b, n_end, masked_body, carry)  # diagonal / length edge
    else:
        carry = lax.fori_loop(0, n_full, plain_body, carry)
        carry = lax.fori_loop(n_full, n_end, masked_body, carry)
    acc, _, l_i = carry

    l_safe = jnp.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    out = jnp.where((qrow < length)[:, None], out, 0.0)
    o_ref[...] = out.astype(o_ref.dtype).reshape(block_q, block_h, head_dim)


# --------------------------------------------------------------------------------------------
# Wrapper.
# --------------------------------------------------------------------------------------------


def _pow2_divisor(n: int) -> int:
    return n & (-n)


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def default_block_config(head_dim: int, group: int, streaming_only: bool = False, itemsize: int = 2
                         ) -> dict[str, int]:
    """Block sizes / warps / stages; defaults tuned on the H200 (bench/prefill_attn.py).

    A caller that tunes passes its own values (through `OpChoice.options` in the ops API).
    itemsize: bytes per element of q/k/v. float32 heads wider than 64 (padded to 128) get smaller
    tiles and 2 stages: 128x128 tiles in 3 stages asked the H100 for 384 KiB of shared memory
    (it has 227 KiB), failing every float32 model with head dim 80, 96 or 128.
    """
    del group, streaming_only  # the same tiles won both sweeps (below)
    if itemsize >= 4 and _next_pow2(head_dim) > 64:
        # q 64x128x4 (32 KiB) + 2 stages x k, v 64x128x4 (64 KiB) = 160 KiB
        return dict(block_m=64, block_k=64, num_warps=4, num_stages=2)
    # H200, jax 0.11.2, bf16, llama3-8b heads (D=128, G=4): 128x128 tiles, 8 warps, 3 stages
    # won both the dense (T=16K) and the streaming-only (T=32K) sweeps
    # (bench/results/prefill_attn-2026-12-01{a,b}.json); 4 stages or 256-row / 256-key tiles
    # exceed shared memory at D=128. D <= 64 is not tuned.
    if head_dim <= 64:
        return dict(block_m=128, block_k=64, num_warps=4, num_stages=3)
    return dict(block_m=128, block_k=128, num_warps=8, num_stages=3)


def prefill_attention_pallas(
    q: jax.Array,        # [B, T, Hq, D]
    k: jax.Array,        # [B, T, Hkv, D] ([B, Tk >= T, Hkv, D] with q_offset)
    v: jax.Array,        # like k
    lengths: jax.Array,  # int32[B]
    *,
    num_retrieval: int,
    sink: int,
    local: int,
    scale: float | None = None,
    q_offset: jax.Array | None = None,  # int32[B]
    block_m: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool | None = None,
    debug: bool = False,
) -> jax.Array:
    """Block-sparse LServe prefill attention, Pallas Triton kernel.

    ``block_m`` is the M dimension of the dots: ``block_q`` tokens x ``block_h`` query heads of
    one GQA group (``block_h`` = the largest power of two dividing G, at most ``block_m``).
    ``q_offset``: the offset form (module docstring); the keys are padded to their own length.
    ``interpret=None`` interprets on CPU and compiles on GPU.
    """
    validate_prefill_args(q, k, v, lengths, num_retrieval=num_retrieval, sink=sink, local=local,
                          q_offset=q_offset)
    _, _, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    if d < 16:
        raise ValueError(f"head_dim must be >= 16 for the Triton dots, got {q.shape=}")
    streaming_only = num_retrieval == 0 and sink < tk and local < tk
    cfg = default_block_config(d, hq // hkv, streaming_only, jnp.dtype(q.dtype).itemsize)
    block_m = cfg["block_m"] if block_m is None else block_m
    block_k = cfg["block_k"] if block_k is None else block_k
    num_warps = cfg["num_warps"] if num_warps is None else num_warps
    num_stages = cfg["num_stages"] if num_stages is None else num_stages
    for name, val in (("block_m", block_m), ("block_k", block_k)):
        if val < 16 or val & (val - 1):
            raise ValueError(f"{name} must be a power of 2 >= 16, got {val}")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale=}")
    return _prefill_pallas_jit(
        q, k, v, lengths.astype(jnp.int32),
        None if q_offset is None else q_offset.astype(jnp.int32),
        num_retrieval=int(num_retrieval), sink=int(sink), local=int(local),
        scale=float(scale), block_m=int(block_m), block_k=int(block_k),
        num_warps=int(num_warps), num_stages=int(num_stages),
        interpret=compat.resolve_interpret(interpret), debug=bool(debug))


@functools.partial(
    jax.jit,
    static_argnames=("num_retrieval", "sink", "local", "scale", "block_m", "block_k",
                     "num_warps", "num_stages", "interpret", "debug"))
def _prefill_pallas_jit(q, k, v, lengths, q_offset, *, num_retrieval, sink, local, scale, block_m,
                        block_k, num_warps, num_stages, interpret, debug):
    # q_offset None (a static pytree leaf-free argument): the plain form, traced exactly as
    # before the offset form existed (no offset input, positions = rows, one shared padding).
    has_offset = q_offset is not None
    bsz, t, hq, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    g = hq // hkv

    # A token window that covers every key is plain causal attention.
    if sink >= tk or local >= tk:
        num_retrieval = hkv

    block_h = min(_pow2_divisor(g), block_m)
    head_splits = g // block_h
    block_q = block_m // block_h
    # Small T: shrink the blocks, keeping every dot dimension >= 16.
    block_q = max(min(block_q, _next_pow2(t)), max(1, 16 // block_h))
    block_k = max(16, min(block_k, _next_pow2(tk)))
    if has_offset:  # queries and keys padded each to their own block
        t_pad = -(-t // block_q) * block_q
        tk_pad = -(-tk // block_k) * block_k
    else:
        t_pad = tk_pad = -(-t // max(block_q, block_k)) * max(block_q, block_k)
    d_pad = _next_pow2(d)
    if t_pad != t or d_pad != d:
        q = jnp.pad(q, ((0, 0), (0, t_pad - t), (0, 0), (0, d_pad - d)))
    if tk_pad != tk or d_pad != d:
        pad = ((0, 0), (0, tk_pad - tk), (0, 0), (0, d_pad - d))
        k, v = (jnp.pad(x, pad) for x in (k, v))
    num_q_blocks = t_pad // block_q

    kernel = functools.partial(
        _prefill_kernel, sm_scale=scale, block_k=block_k, num_q_blocks=num_q_blocks,
        head_splits=head_splits, num_retrieval=num_retrieval, num_kv_heads=hkv,
        sink=sink, local=local, has_offset=has_offset, num_keys=tk)
    grid = (num_q_blocks, hkv * head_splits, bsz)

    def q_map(i, h, b):
        return (b, num_q_blocks - 1 - i, h, 0)

    def kv_map(i, h, b):
        del i
        return (b, 0, h // head_splits, 0)

    scalars = pl.BlockSpec((bsz,), lambda i, h, b: (0,))
    in_specs = [scalars] * (2 if has_offset else 1) + [
        pl.BlockSpec((None, block_q, block_h, d_pad), q_map),
        pl.BlockSpec((None, tk_pad, None, d_pad), kv_map),
        pl.BlockSpec((None, tk_pad, None, d_pad), kv_map),
    ]
    args = (lengths, q_offset, q, k, v) if has_offset else (lengths, q, k, v)
    out = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, block_q, block_h, d_pad), q_map),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=compat.triton_params(num_warps, num_stages),
        interpret=interpret,
        debug=debug,
        name="lserve_prefill",
    )(*args)
    if t_pad != t or d_pad != d:
        out = out[:, :t, :, :d]
    return out
