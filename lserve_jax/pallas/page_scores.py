"""Pallas (Triton lowering) kernel for the decode page scores of LServe's page selector.

S_j = sum_i max(q_i kmax_ji, q_i kmin_ji) = q+ . kmax_j + q- . kmin_j (q+ = max(q, 0),
q- = min(q, 0)), then the max over the logical pages of a physical page. One program per
(chunk of `chunk` table entries, retrieval KV head, sequence) reads the key statistics of those
pages once (through the page table) and scores them for the whole GQA group at once (the G
query rows padded to 16 for the dot). The pure-jnp spec is `page_scores_reference` below.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .compat import resolve_interpret, triton_params
from .sizes import is_pow2, next_pow2

# f32 inputs: IEEE dots (the Triton lowering's DEFAULT is TF32); no effect on bf16 inputs
_IEEE = jax.lax.Precision.HIGHEST




def page_scores_reference(q, k_min, k_max, page_table):
    """Scores of every physical page of every sequence (pure jnp, the spec).

    q: [B, R*G, D]; k_min, k_max: [R, P, L, D]; page_table: int32[B, N].
    Returns float32[B, R, G, N]: score of logical-table page n for query head (r, g).
    """
    b, hq, d = q.shape
    r = k_min.shape[0]
    g = hq // r
    qf = q.reshape(b, r, g, 1, 1, d).astype(jnp.float32)
    ids = jnp.clip(page_table, 0, k_min.shape[1] - 1)
    kmin = jnp.take(k_min, ids, axis=1).astype(jnp.float32)  # [R, B, N, L, D]
    kmax = jnp.take(k_max, ids, axis=1).astype(jnp.float32)
    kmin = jnp.swapaxes(kmin, 0, 1)[:, :, None]  # [B, R, 1, N, L, D]
    kmax = jnp.swapaxes(kmax, 0, 1)[:, :, None]
    s = jnp.sum(jnp.maximum(qf * kmax, qf * kmin), axis=-1)  # [B, R, G, N, L]
    return jnp.max(s, axis=-1)


def supported(q, k_min) -> bool:
    """Whether the kernel handles these shapes (power-of-2 head dim and logical pages per page)."""
    return is_pow2(q.shape[-1]) and is_pow2(k_min.shape[2]) and q.shape[-1] >= 16


def _kernel(len_ref, pt_ref, q_ref, kmin_ref, kmax_ref, o_ref, *, chunk, lpp, page_size):
    # len_ref: int32[B] (whole); pt_ref: int32[chunk] this chunk's physical page ids
    # q_ref: [M, D] the group's query rows (zero-padded); kmin_ref, kmax_ref: [P, L, D] this head
    # o_ref: f32[M, chunk]
    c, b = pl.program_id(0), pl.program_id(2)
    n_valid = (len_ref[b] + page_size - 1) // page_size

    @pl.when(c * chunk < n_valid)
    def _():
        d = q_ref.shape[-1]
        col = c * chunk + jax.lax.broadcasted_iota(jnp.int32, (chunk,), 0)
        # entries past the sequence point at the scratch page; clamp so they stay in bounds
        ids = jnp.where(col < n_valid, pt_ref[...], 0)
        q = q_ref[...]
        qf = q.astype(jnp.float32)  # the split by sign in f32 (exact), dots in the input dtype
        q_pos = jnp.maximum(qf, 0.0).astype(q.dtype)
        q_neg = jnp.minimum(qf, 0.0).astype(q.dtype)
        kmax = kmax_ref[ids].reshape(chunk * lpp, d)
        kmin = kmin_ref[ids].reshape(chunk * lpp, d)
        s = jnp.dot(q_pos, kmax.T, preferred_element_type=jnp.float32, precision=_IEEE)
        s += jnp.dot(q_neg, kmin.T, preferred_element_type=jnp.float32, precision=_IEEE)  # [M, chunk * L]
        if lpp > 1:
            s = jnp.max(s.reshape(s.shape[0], chunk, lpp), axis=-1)
        o_ref[...] = s


@functools.partial(jax.jit, static_argnames=("page_size", "chunk", "num_warps", "num_stages",
                                             "interpret"))
def page_scores(q, k_min, k_max, page_table, lengths=None, *, page_size: int | None = None,
                chunk: int = 16, num_warps: int = 4, num_stages: int = 2,
                interpret: bool | None = None):
    """q: [B, R*G, D]; k_min, k_max: [R, P, L, D]; page_table: int32[B, N]; lengths: int32[B].

    Returns float32[B, R, G, N]. Without `lengths` every table entry is scored (the caller
    masks), with it pages past ceil(length / page_size) are left unwritten (garbage).
    """
    b, hq, d = q.shape
    r, p, lpp, dk = k_min.shape
    if k_max.shape != k_min.shape or dk != d or r == 0 or hq % r:
        raise ValueError(f"page_scores: bad shapes {q.shape=} {k_min.shape=} {k_max.shape=}")
    if not supported(q, k_min):
        raise ValueError(f"page_scores needs power-of-2 head_dim and L: {q.shape=} {k_min.shape=}")
    if page_table.ndim != 2 or page_table.shape[0] != b:
        raise ValueError(f"page_scores: {page_table.shape=} must be [B, N] with B={b}")
    if not is_pow2(chunk):
        raise ValueError(f"chunk must be a power of 2, got {chunk}")
    g = hq // r
    n = page_table.shape[1]
    if lengths is None:
        page_size = 1
        lengths = jnp.full((b,), n, jnp.int32)
    elif page_size is None:
        raise ValueError("page_scores: pass page_size together with lengths")
    m = max(16, next_pow2(g))
    chunk = min(chunk, next_pow2(n))
    n_pad = pl.cdiv(n, chunk) * chunk
    pt = jnp.pad(page_table.astype(jnp.int32), ((0, 0), (0, n_pad - n)))
    qp = jnp.pad(q.astype(k_min.dtype).reshape(b, r, g, d), ((0, 0), (0, 0), (0, m - g), (0, 0)))
    kernel = functools.partial(_kernel, chunk=chunk, lpp=lpp, page_size=page_size)
    out = pl.pallas_call(
        kernel,
        grid=(n_pad // chunk, r, b),
        in_specs=[
            pl.BlockSpec((b,), lambda c, h, s: (0,)),  # lengths
            pl.BlockSpec((None, chunk), lambda c, h, s: (s, c)),  # page table
            pl.BlockSpec((None, None, m, d), lambda c, h, s: (s, h, 0, 0)),  # q
            pl.BlockSpec((None, p, lpp, d), lambda c, h, s: (h, 0, 0, 0)),  # k_min
            pl.BlockSpec((None, p, lpp, d), lambda c, h, s: (h, 0, 0, 0)),  # k_max
        ],
        out_specs=pl.BlockSpec((None, None, m, chunk), lambda c, h, s: (s, h, 0, c)),
        out_shape=jax.ShapeDtypeStruct((b, r, m, n_pad), jnp.float32),
        compiler_params=triton_params(num_warps, num_stages),
        interpret=resolve_interpret(interpret),
        name="lserve_page_scores",
    )(lengths.astype(jnp.int32), pt, qp, k_min, k_max)
    return out[:, :, :g, :n]
