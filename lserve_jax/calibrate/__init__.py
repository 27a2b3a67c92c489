"""Head-pattern calibration for any converted checkpoint (DuoAttention-style).

    python -m lserve_jax.calibrate [CHECKPOINT] [--method gradient|attention-mass] [--steps N] ...

`gradient` (DuoAttention, Xiao et al. 2024): one gate alpha in [0, 1] per (layer, KV head) mixes
full causal attention with streaming attention (sink + local tokens), per head
`o = alpha * o_full + (1 - alpha) * o_stream`. The gates start at 1 and are trained with Adam to
minimise the MSE between the final hidden states of the dense model and of the gated model over
the answer span of synthetic multi-passkey samples (`evals.multi_passkey_sample`), plus
`reg * mean|alpha|`; gates are clipped to [0, 1] after each step. The pass keys hide in natural
text (`--haystack text`: the calibration half of the shipped corpus, `evals.haystack_ids`, or
`--text FILE`), in tiled filler (`--haystack filler`), or alternately in both (`mixed`). `--text-weight w` adds `w` times the
same MSE over the haystack positions past the streaming window (the dense model's language
modelling over long range, which the answer span alone does not see). Only the gates get gradients:
the weights are constants, so no weight gradient is ever computed. The layers run as one
`lax.scan`; on CPU attention goes by blocks of query rows that read only the keys they may see,
with a flash-style backward pass (`gated_attention`).

Then the boundary refinement (`refine_boundary`, `--refine-band`, on by default): the gates near
the 50% cut are close and move from seed to seed, so the 12 heads on each side of it are
re-ranked by the measured rise of next-token NLL over natural text past the streaming window
when each one alone streams (the corpus's calibration half, 4 windows of 4096 tokens), and the
cheapest half streams. `--from-pattern TSV` runs only this step on an existing pattern (a
DuoAttention one, or an earlier run). On an H200 it takes seconds; on 2 CPU cores it is most
of the run (see README): the pattern's forward over each window keeps every layer's input, and
each flipped head recomputes the layers from its own on (`flip_costs`).

`attention-mass` (a cheap baseline): one dense forward per sample; a head's score is the
attention probability that the answer-span queries put outside the streaming window.

The result is a [layers, kv_heads] matrix in DuoAttention's TSV format (`heads.save_pattern`),
written atomically to `<checkpoint>/head_pattern.tsv` (or `--output`), with the loss curve and
settings as JSON beside it.

Modules: `config` (CalibConfig, CalibResult), `gated` (the gated forward and its blocked
attention), `optimize` (samples, the gradient method, the attention-mass baseline,
`calibrate`), `refine` (the boundary refinement), `cli` (`main`, the pattern and record files).
"""

from .cli import main, write_pattern_atomic
from .config import HAYSTACKS, METHODS, CalibConfig, CalibResult
from .gated import gated_attention, gated_hidden, gated_layer, gated_nll_fn, two_attentions
from .optimize import break_ties, calibrate, make_samples
from .refine import boundary_band, flip_costs, refine_boundary, refine_samples, rerank_band, text_samples

__all__ = ["CalibConfig", "CalibResult", "HAYSTACKS", "METHODS", "boundary_band", "break_ties", "calibrate",
           "flip_costs", "gated_attention", "gated_hidden", "gated_layer", "gated_nll_fn", "main", "make_samples",
           "refine_boundary", "refine_samples", "rerank_band", "text_samples", "two_attentions",
           "write_pattern_atomic"]
