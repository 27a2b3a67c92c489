"""The attention, append and page-score ops: one API each, implementations in backends.

API (each validates shapes with ValueErrors naming them, then dispatches):

    prefill_attention(q, k, v, lengths, *, num_retrieval, sink, local, scale=None, choice=OpChoice())
    decode_attention(q, k_pages, v_pages, ring_k, ring_v, page_table, lengths, sel_pages, sel_count,
                     *, mode, scale=None, choice=OpChoice())
    append_token(k, v, positions, page_table, k_pages, v_pages, k_min, k_max, ring_k, ring_v,
                 *, page, lp, sink, local, choice=OpChoice())
    page_scores(q, k_min, k_max, page_table, lengths, *, page_size, choice=OpChoice())
    qmatmul(x, qw, *, choice=OpChoice())   # x @ an 8-bit weight (quant.FP8Linear / Int8Linear)

Kernel choice and tuning are frozen values (no module state): `OpChoice(impls, options)` for
one op, `Kernels(prefill, decode, append, page_scores)` for a model's static spec, e.g.

    Kernels.from_names(prefill="auto", decode="pallas")       # the legacy impl strings
    Kernels().with_options(decode={"pages_per_block": 2})      # tuned options, default order
    OpChoice.from_options({"block_m": 64}, impls=("triton",))  # one op, one implementation

`registry.Registry.dispatch` tries the choice's implementations in order (empty: the platform
default order, see `registry`) and falls through only on `registry.Unsupported`, which an
implementation raises before tracing anything when it cannot run the inputs.

Backends, one file each: `reference` (pure jnp, the specs beside the kernels in
`lserve_jax.pallas`), `triton` (the Pallas Triton-lowered kernels), `cudnn` (dense and hybrid
prefill through jax.nn.dot_product_attention). Adding a backend (e.g. Mosaic GPU):

1. write `lserve_jax/ops/<name>.py` with functions decorated
   `@register("<op>", "<impl name>", priority={"gpu": rank})` taking the op's arguments plus
   `options` (a dict of its tuning kwargs), each raising `Unsupported` for what it cannot run
   (dtype, device, shape rules) before it traces a kernel;
2. add "<name>" to `registry.BACKENDS` (imported lazily on first dispatch). The file must
   import on every supported jax and platform (CPU CI included): what a version or platform
   lacks (e.g. Mosaic GPU on the CPU machines) its implementations raise as `Unsupported`.

Its rank places it in the default order of that platform (higher first; the Triton kernels
rank 20, the cuDNN hybrid prefill 30, the reference 0); without a rank it runs only when named.
"""

from .append import append_token
from .decode import MODES, decode_attention, dense_decode_attention
from .page_scores import page_scores
from .prefill import prefill_attention
from .qmatmul import qmatmul
from .registry import REGISTRY, Kernels, OpChoice, Unsupported

__all__ = ["MODES", "REGISTRY", "Kernels", "OpChoice", "Unsupported", "append_token", "decode_attention",
           "dense_decode_attention", "page_scores", "prefill_attention", "qmatmul"]
