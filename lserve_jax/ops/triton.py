"""Triton backend: the Pallas kernels of `lserve_jax.pallas` (Triton lowering).

First in the GPU default order for decode, append and page scores, second for prefill (after
the cuDNN hybrid, which itself runs the streaming heads here). On CPU the kernels run in
interpret mode, but only when a choice names "triton" (the reference is faster there).

Each implementation checks what the kernel needs before it traces anything and raises
`Unsupported` otherwise: a GPU (or CPU in interpret mode), a float dtype, and the Triton shape
rules (power-of-2 loads and dot dims >= 16; the prefill kernel pads D to a power of 2 itself, the
decode kernel reads a D such as 96 in power-of-2 pieces, so it takes any multiple of 16). The
8-bit weight product (`pallas.qmatmul`, weight-only; only when a choice names "triton": XLA's
GEMMs are the default, see `lserve_jax.quant`) takes at most 64 rows (decode) and block sizes
that divide the weight (it is never padded). The
prefill kernel has the offset (chunked) form (`q_offset`); the cuDNN engines refuse it, so a
chunk of a longer prompt comes here in the GPU default order.
Options are the kernels' keyword arguments; an unknown name is a ValueError, not a silent
fall-through. `interpret` (bool) is accepted by every op.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

from ..kv8 import KV8
from ..pallas import append as pallas_append
from ..pallas import compat
from ..pallas import decode as pallas_decode
from ..pallas import page_scores as pallas_scores
from ..pallas import prefill as pallas_prefill
from ..pallas import qmatmul as pallas_qmatmul
from ..quant import QUANTIZED, Int8Linear
from .decode import retrieval_slots, two_launches
from .registry import Unsupported, register
from ..pallas.sizes import is_pow2

GPU_FIRST = {"gpu": 20}  # below cudnn+triton (prefill), above the reference

PREFILL_OPTIONS = frozenset({"block_m", "block_k", "num_warps", "num_stages", "interpret"})
DECODE_OPTIONS = frozenset({"pages_per_block", "pages_per_split", "min_split_tokens", "target_programs",
                            "num_warps", "num_stages", "interpret"})
APPEND_OPTIONS = frozenset({"interpret"})
PAGE_SCORE_OPTIONS = frozenset({"chunk", "num_warps", "num_stages", "interpret"})
QMATMUL_OPTIONS = frozenset({"block_n", "block_k", "split_k", "num_warps", "num_stages", "interpret"})
_FLOATS = (jnp.float32, jnp.bfloat16, jnp.float16)



def check_options(op: str, options: dict, allowed: frozenset) -> None:
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for the Triton {op} kernel; it takes {sorted(allowed)}")


def check_device(options: dict) -> None:
    """Compiled on a GPU, or interpreted (interpret=True, or None on CPU: the kernels' default);
    nothing else lowers Triton kernels."""
    platform, interpret = compat.platform(), options.get("interpret")
    if platform == "gpu" or interpret is True or (platform == "cpu" and interpret is None):
        return
    raise Unsupported(f"Triton kernels compile only on a GPU (backend {platform!r}, "
                      f"interpret={options.get('interpret')})")


def check_prefill(q, options: dict) -> None:
    """Everything the prefill kernel needs; the cuDNN hybrid calls it before its cuDNN half."""
    check_options("prefill", options, PREFILL_OPTIONS)
    check_device(options)
    if q.dtype not in _FLOATS:
        raise Unsupported(f"the Triton prefill kernel takes float32/bfloat16/float16, got {q.dtype=}")
    if q.shape[-1] < 16:
        raise Unsupported(f"the Triton dots need head_dim >= 16: {q.shape=}")


def check_not_fp8(op: str, *arrays) -> None:
    """paged_decode reads bf16/float32 pages; 8-bit pages (`kv8.KV8`) fall through to the next
    implementation. The fused decode kernel reads them and the fused append writes them."""
    if any(isinstance(a, KV8) for a in arrays):
        raise Unsupported(f"the Triton {op} kernel has no FP8 KV pages yet")


@register("prefill", "triton", priority=GPU_FIRST)
def prefill(q, k, v, lengths, *, num_retrieval, sink, local, scale, q_offset=None, options):
    check_prefill(q, options)
    return pallas_prefill.prefill_attention_pallas(q, k, v, lengths, num_retrieval=num_retrieval, sink=sink,
                                                   local=local, scale=scale, q_offset=q_offset, **options)


@register("decode", "triton", priority=GPU_FIRST)
def decode(q, k_pages, v_pages, ring_k, ring_v, page_table, lengths, sel_pages, sel_count, *, mode, scale,
           dense=False, options):
    check_options("decode", options, DECODE_OPTIONS)
    check_device(options)
    b, hq, d = q.shape
    r, s = k_pages.shape[0], ring_k.shape[0]
    if q.dtype not in _FLOATS:
        raise Unsupported(f"the Triton decode kernel takes float32/bfloat16/float16, got {q.dtype=}")
    if not pallas_decode.head_dim_supported(d) or (r and not is_pow2(k_pages.shape[2])):
        # head dims that are not a power of 2 (96, 80) are read in power-of-2 pieces in the kernel
        raise Unsupported(f"the Triton decode kernel needs a head_dim multiple of 16 and a power-of-2 page "
                          f"size: {q.shape=} {k_pages.shape=}")
    if s and pallas_decode.ring_page(ring_k.shape[2]) < 16:
        # ring blocks too small for the fused kernel's dots: two launches of paged_decode, whose
        # ring programs take several small blocks per dot (bf16/float32 pages only)
        check_not_fp8("decode with a ring narrower than 16-token blocks", k_pages, ring_k)
        return two_launches(functools.partial(pallas_decode.paged_decode, **options), q, k_pages, v_pages, ring_k,
                            ring_v, page_table, lengths, sel_pages, sel_count, mode=mode, scale=scale)
    g = hq // (r + s)
    m = 1 if mode == "query_head" else g  # query rows per program head
    _, phys, lg = retrieval_slots(q, page_table, sel_pages, mode=mode, g=g)
    o = pallas_decode.sparse_decode(q.reshape(b, hq // m, m, d), k_pages, v_pages, ring_k, ring_v, phys, lg,
                                    sel_count.astype(jnp.int32), lengths, scale=scale, **options)
    return o.reshape(b, hq, d)


@register("append", "triton", priority=GPU_FIRST)
def append(k, v, positions, page_table, k_pages, v_pages, k_min, k_max, ring_k, ring_v, *, page, lp, sink, local,
           options):
    check_options("append", options, APPEND_OPTIONS)
    check_device(options)
    if not pallas_append.supported(k_pages, ring_k):
        raise Unsupported(f"the fused append kernel needs a power-of-2 head_dim: {k.shape=}")
    return pallas_append.fused_append(k, v, positions, page_table, k_pages, v_pages, k_min, k_max, ring_k, ring_v,
                                      page=page, lp=lp, sink=sink, local=local, **options)


@register("page_scores", "triton", priority=GPU_FIRST)
def page_scores(q, k_min, k_max, page_table, lengths, *, page_size, options):
    check_options("page_scores", options, PAGE_SCORE_OPTIONS)
    check_device(options)
    if not pallas_scores.supported(q, k_min):
        raise Unsupported(f"the page-score kernel needs a power-of-2 head_dim >= 16 and logical pages per "
                          f"page: {q.shape=} {k_min.shape=}")
    # pages past the sequence are left unwritten: the selector masks them
    return pallas_scores.page_scores(q, k_min, k_max, page_table, lengths, page_size=page_size, **options)


@register("qmatmul", "triton")  # explicit choices only: slower in the decode step (lserve_jax.quant)
def qmatmul(x, qw, *, options):
    check_options("qmatmul", options, QMATMUL_OPTIONS)
    check_device(options)
    if not isinstance(qw, QUANTIZED):
        raise Unsupported(f"the Triton qmatmul kernel takes FP8Linear or Int8Linear weights, got {type(qw).__name__}")
    k, n = qw.shape
    rows = x.size // k if k else 0
    if not 1 <= rows <= pallas_qmatmul.MAX_ROWS:
        raise Unsupported(f"the Triton qmatmul kernel takes 1..{pallas_qmatmul.MAX_ROWS} rows, got {rows} "
                          f"({x.shape=})")
    if x.dtype not in _FLOATS:
        raise Unsupported(f"the Triton qmatmul kernel takes float32/bfloat16/float16 activations, got {x.dtype=}")
    blocks = {name: options[name] for name in ("block_n", "block_k", "split_k") if name in options}
    try:
        pallas_qmatmul.plan(k, n, **blocks)
    except pallas_qmatmul.BlockSizeError as e:
        raise Unsupported(f"the Triton qmatmul kernel has no block sizes for weight [in, out]={qw.shape}: {e}") from None
    x2 = x.reshape(rows, k)
    if isinstance(qw, Int8Linear):  # x @ W == (x * inv_smooth) @ (w.T * scale): smoothed, not quantised
        x2 = (x2.astype(jnp.float32) * qw.inv_smooth).astype(x.dtype)
    y = pallas_qmatmul.qmatmul(x2, qw.w, qw.scale, **options)
    return y.reshape(*x.shape[:-1], n)
