"""Reference backend: the pure-jnp specs, defined beside their kernels in `lserve_jax.pallas`.

Runs on every platform and supports every shape, so it is last in every default order (and
the whole order on CPU, where XLA runs it faster than an interpreted kernel). Tuning options
are ignored: the reference has none. The 8-bit weight product's is called "xla": it is not a
spec but the production path of `lserve_jax.quant` (XLA's W8A8 GEMMs), prefill's on the GPU.
"""

from __future__ import annotations

from ..pallas.append import append_reference
from ..pallas.decode import paged_decode_reference
from ..pallas.page_scores import page_scores_reference
from ..pallas.prefill import prefill_attention_reference
from ..quant import FP8Linear, fp8_matmul, int8_matmul
from .decode import two_launches
from .registry import register

ANY_PLATFORM = {"*": 0}  # lowest rank: tried after every kernel


@register("prefill", "reference", priority=ANY_PLATFORM)
def prefill(q, k, v, lengths, *, num_retrieval, sink, local, scale, q_offset, options):
    del options
    return prefill_attention_reference(q, k, v, lengths, num_retrieval=num_retrieval, sink=sink, local=local,
                                       scale=scale, q_offset=q_offset)


@register("decode", "reference", priority=ANY_PLATFORM)
def decode(q, k_pages, v_pages, ring_k, ring_v, page_table, lengths, sel_pages, sel_count, *, mode, scale,
           dense=False, options):
    del options
    return two_launches(paged_decode_reference, q, k_pages, v_pages, ring_k, ring_v, page_table, lengths,
                        sel_pages, sel_count, mode=mode, scale=scale)


@register("append", "reference", priority=ANY_PLATFORM)
def append(k, v, positions, page_table, k_pages, v_pages, k_min, k_max, ring_k, ring_v, *, page, lp, sink, local,
           options):
    del options
    return append_reference(k, v, positions, page_table, k_pages, v_pages, k_min, k_max, ring_k, ring_v,
                            page=page, lp=lp, sink=sink, local=local)


@register("page_scores", "reference", priority=ANY_PLATFORM)
def page_scores(q, k_min, k_max, page_table, lengths, *, page_size, options):
    del lengths, page_size, options  # every entry is scored; the selector masks past the length
    return page_scores_reference(q, k_min, k_max, page_table)


@register("qmatmul", "xla", priority=ANY_PLATFORM)
def qmatmul(x, qw, *, options):
    del options
    return fp8_matmul(x, qw) if isinstance(qw, FP8Linear) else int8_matmul(x, qw)
