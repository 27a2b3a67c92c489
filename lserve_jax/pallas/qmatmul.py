"""Pallas (Triton lowering) kernel for the decode projections with 8-bit weights: a skinny GEMM
that reads the int8 / e4m3 weight once and dequantises it in registers.

    y[M, N] = x[M, K] @ (w[N, K].T * scale[N])          (float32 out; the caller casts)

Weight-only (W8A16): the activations keep their dtype (bf16, f16 or f32) and each 8-bit weight
tile is converted to it in the kernel (every int8 and e4m3 value is exact in bf16), so the dot is
an ordinary half-precision (or IEEE f32) MMA accumulated in float32 and the per-output-channel
scale multiplies the accumulator at the end. No activation amax, no activation quantiser, one
launch: at decode's handful of rows the product is bound by reading the weight, which is half
the bytes of bf16. The result is at least as accurate as the W8A8 GEMMs of `lserve_jax.quant`
(same weights, unquantised activations).

Kernel: grid (N / block_n, split_k). Program (j, s) owns output columns [j*BN, (j+1)*BN) and the
contraction range [s*K/S, (s+1)*K/S), which it walks in `block_k` chunks with a fori_loop (the
Triton lowering pipelines it over `num_stages`): x[:, chunk] [Mp, BK] against the weight tile
w[cols, chunk] [BN, BK], contracted over their last axes (the weight stays [N, K] in memory, the
layout `quant` stores). The rows are zero-padded to Mp = max(16, next power of 2) (Triton dots
need dims >= 16; the copy is a few KB). With split_k > 1 each split writes float32 partial sums
[S, Mp, N] that XLA adds afterwards, so a small N still fills the GPU's SMs.

Shapes: the weight is never padded (that would copy it every call): block_n must divide N and
block_k must divide K / split_k, all powers of 2 and >= 16. `plan` picks them (or checks given
ones) and raises `BlockSizeError` when none fits; the real models' K (576, 896, 1536, 2048,
4096, 4864, 14336) all take block_k = 64, their N all take block_n = 64 or smaller.
The pure-jnp spec is `qmatmul_reference` below.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .compat import resolve_interpret, triton_params
from .sizes import is_pow2, next_pow2

__all__ = ["BlockSizeError", "MAX_ROWS", "plan", "qmatmul", "qmatmul_reference"]

# f32 activations: IEEE dots (the Triton lowering's DEFAULT is TF32); no effect on bf16 inputs
_IEEE = jax.lax.Precision.HIGHEST
MAX_ROWS = 64  # a skinny GEMM: more rows are a GEMM for cuBLAS (the rows ride in one dot tile)
NUM_SMS = 132  # H100; only steers the split-K heuristic
TARGET_PROGRAMS = NUM_SMS  # split K until the grid has at least one program per SM ...
MIN_SPLIT_K = 256  # ... while each split still covers this much of K
_BLOCK_N = (64, 32, 16)  # default block_n: the largest that divides N
_BLOCK_K = (256, 128, 64, 32, 16)  # default block_k: the largest that divides K / split_k
_MAX_SPLIT = 16
WEIGHT_DTYPES = (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn))


class BlockSizeError(ValueError):
    """No block sizes (block_n | N, block_k | K / split_k, powers of 2 >= 16) fit these shapes."""




def qmatmul_reference(x: jax.Array, w: jax.Array, scale: jax.Array) -> jax.Array:
    """x [..., K] @ (w [N, K] 8-bit).T * scale [N] -> float32 [..., N] (float32 math, the spec)."""
    dims = (((x.ndim - 1,), (1,)), ((), ()))
    y = jax.lax.dot_general(x.astype(jnp.float32), w.astype(jnp.float32), dims,
                            preferred_element_type=jnp.float32, precision=_IEEE)
    return y * scale.astype(jnp.float32)


def _check_block(name: str, block: int, extent: int, what: str) -> None:
    if not (is_pow2(block) and block >= 16 and extent % block == 0):
        raise BlockSizeError(f"{name}={block} must be a power of 2 >= 16 dividing {what}={extent}")


def plan(k: int, n: int, *, block_n: int | None = None, block_k: int | None = None,
         split_k: int | None = None) -> tuple[int, int, int]:
    """(block_n, block_k, split_k) for a [*, K] x [N, K] product: the given ones checked, the
    others chosen. Defaults: the largest block_n of (64, 32, 16) dividing N; split_k the smallest
    power of 2 (<= 16) giving a program per SM (N / block_n * split_k >= 132) while each split
    keeps >= 256 of K in a multiple of block_k (64 when not given); the largest block_k of
    (256, 128, 64, 32, 16) dividing K / split_k. BlockSizeError when nothing fits. Untuned: the
    defaults are a starting point for bench/fp8_gemm.py on the GPU."""
    if block_n is None:
        block_n = next((b for b in _BLOCK_N if n % b == 0), None)
        if block_n is None:
            raise BlockSizeError(f"no block_n in {_BLOCK_N} divides N={n}")
    _check_block("block_n", block_n, n, "N")
    if split_k is None:
        split_k, step = 1, block_k or 64
        while (n // block_n * split_k < TARGET_PROGRAMS and 2 * split_k <= _MAX_SPLIT
               and k % (2 * split_k) == 0 and (k // (2 * split_k)) % step == 0
               and k // (2 * split_k) >= MIN_SPLIT_K):
            split_k *= 2
    if split_k < 1 or k % split_k:
        raise BlockSizeError(f"split_k={split_k} must be >= 1 and divide K={k}")
    if block_k is None:
        block_k = next((b for b in _BLOCK_K if (k // split_k) % b == 0), None)
        if block_k is None:
            raise BlockSizeError(f"no block_k in {_BLOCK_K} divides K / split_k = {k // split_k}")
    _check_block("block_k", block_k, k // split_k, "K / split_k")
    return block_n, block_k, split_k


def _kernel(x_ref, w_ref, scale_ref, o_ref, *, block_k, steps):
    # x_ref: [Mp, K] (whole); w_ref: [BN, K] this program's output channels; scale_ref: f32[BN]
    # o_ref: f32[Mp, BN] this split's partial sums
    start = pl.program_id(1) * (steps * block_k)
    dims = (((1,), (1,)), ((), ()))  # contract the last axes: x [Mp, BK] . w [BN, BK] -> [Mp, BN]

    def body(i, acc):
        k0 = pl.multiple_of(start + i * block_k, block_k)
        x = x_ref[:, pl.ds(k0, block_k)]
        w = w_ref[:, pl.ds(k0, block_k)].astype(x.dtype)  # exact: int8 and e4m3 values fit bf16
        return acc + jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32, precision=_IEEE)

    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc * scale_ref[...][None, :]


@functools.partial(jax.jit, static_argnames=("block_n", "block_k", "split_k", "num_warps", "num_stages",
                                             "interpret"))
def qmatmul(x: jax.Array, w: jax.Array, scale: jax.Array, *, block_n: int | None = None,
            block_k: int | None = None, split_k: int | None = None, num_warps: int = 4,
            num_stages: int = 3, interpret: bool | None = None) -> jax.Array:
    """x [M, K] (bf16, f16 or f32; M <= 64) @ (w [N, K] int8 or float8_e4m3fn).T * scale f32[N]
    -> float32 [M, N]. Block sizes default to `plan`'s; BlockSizeError when they do not fit."""
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1] or scale.shape != (w.shape[0],):
        raise ValueError(f"qmatmul needs x [M, K], w [N, K], scale [N]: {x.shape=} {w.shape=} {scale.shape=}")
    if jnp.dtype(w.dtype) not in WEIGHT_DTYPES:
        raise ValueError(f"qmatmul takes int8 or float8_e4m3fn weights, got {w.dtype}")
    m, k = x.shape
    n = w.shape[0]
    if not 1 <= m <= MAX_ROWS:
        raise ValueError(f"qmatmul takes 1..{MAX_ROWS} rows, got {m}")
    bn, bk, s = plan(k, n, block_n=block_n, block_k=block_k, split_k=split_k)
    mp = max(16, next_pow2(m))
    xp = jnp.pad(x, ((0, mp - m), (0, 0)))
    out = pl.pallas_call(
        functools.partial(_kernel, block_k=bk, steps=k // (s * bk)),
        grid=(n // bn, s),
        in_specs=[
            pl.BlockSpec((mp, k), lambda j, i: (0, 0)),  # x: every program reads its K range
            pl.BlockSpec((bn, k), lambda j, i: (j, 0)),  # w: this block's output channels
            pl.BlockSpec((bn,), lambda j, i: (j,)),  # scale
        ],
        out_specs=pl.BlockSpec((None, mp, bn), lambda j, i: (i, 0, j)),
        out_shape=jax.ShapeDtypeStruct((s, mp, n), jnp.float32),
        compiler_params=triton_params(num_warps, num_stages),
        interpret=resolve_interpret(interpret),
        name="lserve_qmatmul",
    )(xp, w, scale.astype(jnp.float32))
    return (out[0] if s == 1 else jnp.sum(out, axis=0))[:m]
