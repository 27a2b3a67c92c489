"""Head-pattern calibration for any converted checkpoint (DuoAttention-style), and all-position forwards.

    python -m lserve_jax.calibrate [CHECKPOINT] [--method gradient|attention-mass] [--steps N] ...

`gradient` (DuoAttention, Xiao et al. 2024): one gate alpha in [0, 1] per (layer, KV head) mixes
full causal attention with streaming attention (sink + local tokens), per head
`o = alpha * o_full + (1 - alpha) * o_stream`. The gates start at 1 and are trained with Adam to
minimise the MSE between the final hidden states of the dense model and of the gated model over
the answer span of synthetic multi-passkey samples (`passkey.multi_passkey_sample`), plus
`reg * mean|alpha|`; gates are clipped to [0, 1] after each step. The pass keys hide in natural
text (`--haystack text`: the calibration half of the shipped corpus, `corpus.haystack_ids`, or
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
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .attention.prefill import prefill_attention
from .config import ModelConfig
from .heads import HeadLayout, binarize, check_shape, load_pattern, save_pattern
from .model import _mlp, _proj, _qkv, rms_norm
from .params import LayerParams, Params
from .corpus import haystack_ids, read_text
from .passkey import Encode, multi_passkey_sample
from .rope import apply_rope, inv_frequencies

METHODS = ("gradient", "attention-mass")
HAYSTACKS = ("text", "filler", "mixed")


@dataclasses.dataclass(frozen=True)
class CalibConfig:
    """Knobs of a calibration run. `sink`/`local` are the streaming window being calibrated
    for. The defaults are the settings that produced the shipped SmolLM2-135M pattern: the
    decode window (64 + 128: the narrower one, and answers are decoded); 80 Adam steps on
    samples of 512-1536 tokens whose pass keys hide in tiled filler; then the boundary
    refinement at 50% sparsity (`refine_boundary`: 12 heads on each side of the cut, re-ranked
    by their measured cost on 4 windows of 4096 tokens of natural text). 17.8 minutes on 2 CPU
    cores (8.1 + 9.7), 8.5 seconds on an H200.

    Measured on SmolLM2 (bench/calib_sweep.py, bench/results/calib_sweep-2026-12-02*.json; 4K
    perplexity ratio to dense at 50% streaming heads, and a teacher-forced pass-key proxy on the
    accuracy grid, 23 cells where dense passes): the optimisation alone gives 1.029-1.031 with
    23/23 cells for filler samples (three seeds), 1.019-1.020 with 20/23 for natural-text
    samples, 1.020-1.028 with 20-23 for mixed ones. The refinement brings all seven patterns tried
    to 1.016-1.021 (six of them to 1.018 or lower); the cells at the model's retrieval limit (1536
    and 2048 tokens) stay fragile: 23/23 after refinement for filler seed 0 and mixed seed 2,
    20-22 for the other five."""

    method: str = "gradient"
    sink: int = 64
    local: int = 128
    lengths: tuple[int, ...] = (512, 1024, 1536)  # sample lengths, cycled (each compiles once)
    num_keys: int = 3  # pass keys per sample
    steps: int = 80  # optimisation steps (gradient) or samples (attention-mass)
    lr: float = 0.05
    reg: float = 0.05  # lambda of the L1 term, on the mean |alpha|
    haystack: str = "filler"  # "text": natural text (corpus.haystack_ids or a given text); "filler":
    # tiled filler; "mixed": the two alternate, sample by sample (odd samples in text)
    text_weight: float = 0.0  # weight of the MSE over haystack positions past the window
    init: float = 1.0
    seed: int = 0
    max_minutes: float | None = None  # stop early (after a finished step) past this
    # Boundary refinement (gradient method, after the optimisation; 0 turns it off): the
    # `refine_band` streaming heads with the highest gates and the `refine_band` retrieval heads
    # with the lowest gates at `refine_sparsity` are re-ranked by the measured log-likelihood
    # cost of streaming each one alone (`refine_boundary`).
    refine_band: int = 12
    refine_sparsity: float = 0.5
    refine_samples: int = 4  # natural-text windows (the corpus's calibration half)
    refine_length: int = 4096  # tokens per text window
    refine_local: int | None = None  # local window of the text cost (None: `local`)

    @property
    def refine_window(self) -> int:
        return self.local if self.refine_local is None else self.refine_local

    @property
    def refines(self) -> bool:
        """Whether `calibrate` ends with the boundary refinement (gradient method only:
        attention-mass is the cheap baseline)."""
        return self.method == "gradient" and self.refine_band > 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.haystack not in HAYSTACKS:
            raise ValueError(f"haystack must be one of {HAYSTACKS}, got {self.haystack!r}")
        if self.text_weight < 0:
            raise ValueError(f"need text_weight >= 0, got {self.text_weight}")
        if self.sink < 0 or self.local < 1:
            raise ValueError(f"need sink >= 0 and local >= 1, got sink={self.sink}, local={self.local}")
        if self.refine_band < 0 or self.refine_samples < 1 or not 0.0 < self.refine_sparsity < 1.0:
            raise ValueError(f"need refine_band >= 0, refine_samples >= 1 and 0 < refine_sparsity < 1, "
                             f"got refine_band={self.refine_band}, refine_samples={self.refine_samples}, "
                             f"refine_sparsity={self.refine_sparsity}")
        if self.refine_band and self.refine_length <= self.sink + self.refine_window:
            raise ValueError(f"refine_length {self.refine_length} must exceed the window sink + local = "
                             f"{self.sink + self.refine_window}")
        if self.steps < 1 or not self.lengths or min(self.lengths) < 1 or self.num_keys < 1:
            raise ValueError(f"need steps >= 1, num_keys >= 1 and positive lengths, got {self}")


@dataclasses.dataclass
class CalibResult:
    alpha: np.ndarray  # [layers, kv_heads], float64
    curve: list[dict]  # one entry per step
    seconds: float
    config: CalibConfig
    grad_mag: np.ndarray | None = None  # accumulated |d loss / d alpha| (gradient method)
    refine: dict | None = None  # what `refine_boundary` measured and moved (refine_band > 0)

    def to_json(self) -> dict:
        return {"config": dataclasses.asdict(self.config), "seconds": self.seconds,
                "minutes": self.seconds / 60, "curve": self.curve, "alpha": self.alpha.tolist(),
                "grad_mag": None if self.grad_mag is None else self.grad_mag.tolist(),
                "refine": self.refine}


# ------------------------------------------------------------------------------------------
# Forwards.
# ------------------------------------------------------------------------------------------


def _window(t: int, sink: int, local: int) -> jax.Array:
    """[T, T] bool: causal and inside a streaming head's Λ window."""
    i = jnp.arange(t)[:, None]
    j = jnp.arange(t)[None, :]
    return (j <= i) & ((j < sink) | (i - j < local))


def _two_attentions(q, k, v, sink: int, local: int, stream: bool = True):
    """Full causal and streaming attention from one score matrix, with the reference semantics
    of `prefill_attention` (every head retrieval / every head streaming).

    q [B, T, Hq, D], k/v [B, T, Hkv, D] -> (o_full, o_stream) float32 [B, T, Hkv, G, D] and the
    streaming share of each row's causal softmax mass [B, Hkv, G, T] (1 - the mass outside the
    window). Both softmaxes share the causal row max (the window always holds the diagonal, so
    its sum stays away from underflow for any realistic score range). `stream=False`: only
    o_full. Scores are one [B, Hkv, G*T, T] batched matmul (no K/V repeat across the group).
    """
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    qh = q.astype(jnp.float32).reshape(b, t, hkv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, hkv, g * t, d)
    kh = k.astype(jnp.float32).transpose(0, 2, 1, 3)  # [B, Hkv, T, D]
    vh = v.astype(jnp.float32).transpose(0, 2, 1, 3)
    s = jnp.einsum("bhqd,bhkd->bhqk", qh, kh).reshape(b, hkv, g, t, t) / math.sqrt(d)
    s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)
    e = jnp.exp(s - jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True)))  # [B, Hkv, G, T, T]

    def attend(p):
        l = jnp.sum(p, axis=-1)  # [B, Hkv, G, T]
        o = jnp.einsum("bhqk,bhkd->bhqd", p.reshape(b, hkv, g * t, t), vh).reshape(b, hkv, g, t, d)
        return (o / l[..., None]).transpose(0, 3, 1, 2, 4), l  # [B, T, Hkv, G, D]

    o_full, l_full = attend(e)
    if not stream:
        return o_full, None, None
    o_stream, l_stream = attend(jnp.where(_window(t, sink, local), e, 0.0))
    return o_full, o_stream, l_stream / l_full


BLOCK = 256  # query rows per block of `gated_attention` on CPU (elsewhere: one block)
STREAM_BLOCK = 128  # the same for its streaming attention (reads sink + local + block keys per block)


def _block_bias(rows: tuple[int, int], keys: tuple[tuple[int, int], ...], sink: int, local: int | None) -> np.ndarray:
    """[n, m] float32 additive mask: 0 where the query rows [rows[0], rows[1]) may see the keys
    (positions `keys`, ranges concatenated): causal, and inside the sink + local window unless
    local is None; -inf elsewhere. An add, not a select: XLA's CPU backend fuses it into the
    softmax pass, where a select costs a pass of its own."""
    i = np.arange(*rows)[:, None]
    j = np.concatenate([np.arange(a, b) for a, b in keys])[None, :]
    mask = j <= i
    if local is not None:
        mask &= (j < sink) | (i - j < local)
    return np.where(mask, 0.0, -np.inf).astype(np.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _softmax_attend(q, k, v, spec):
    """q [B, Hkv, G, n, D] (pre-scaled), k/v [B, Hkv, m, D] -> float32 [B, Hkv, G, n, D]: softmax
    attention over the keys `_block_bias(*spec)` allows (every row allows one). Its gradient
    recomputes the probabilities from the saved log-sum-exp (flash-attention style) rather
    than keeping the [n, m] intermediates: calibration's backward pass is mostly this."""
    return _attend_fwd(q, k, v, spec)[0]


def _attend_fwd(q, k, v, spec):
    d = v.shape[-1]
    s = jnp.einsum("bhgqd,bhkd->bhgqk", q, k) + _block_bias(*spec)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - m)
    # a ones column on v: the same matmul gives the softmax denominators (no pass of its own over p)
    ol = jnp.einsum("bhgqk,bhkd->bhgqd", p, jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1))
    l = ol[..., d:]
    o = ol[..., :d] / l
    return o, (q, k, v, o, m + jnp.log(l))


def _attend_bwd(spec, res, do):
    q, k, v, o, lse = res
    p = jnp.exp(jnp.einsum("bhgqd,bhkd->bhgqk", q, k) + _block_bias(*spec) - lse)
    ds = p * (jnp.einsum("bhgqd,bhkd->bhgqk", do, v) - jnp.sum(do * o, axis=-1, keepdims=True))
    # dk and dv as [D, m] products with p and ds in their own layout, transposed after: XLA's CPU
    # dot would otherwise copy the [n, m] matrices into [m, n] first (about 20% of this pass)
    dv = jnp.einsum("bhgqd,bhgqk->bhdk", do, p)
    dk = jnp.einsum("bhgqd,bhgqk->bhdk", q, ds)
    return jnp.einsum("bhgqk,bhkd->bhgqd", ds, k), jnp.swapaxes(dk, -1, -2), jnp.swapaxes(dv, -1, -2)


_softmax_attend.defvjp(_attend_fwd, _attend_bwd)


def _full_attention(qh, kh, vh, block: int):
    """Causal attention by blocks of query rows, each reading the keys up to its last row:
    qh [B, Hkv, G, T, D] (pre-scaled), kh/vh [B, Hkv, T, D] -> float32 [B, Hkv, G, T, D]."""
    t = qh.shape[3]
    outs = []
    for s in range(0, t, block):
        e = min(s + block, t)
        outs.append(_softmax_attend(qh[:, :, :, s:e], kh[:, :, :e], vh[:, :, :e], ((s, e), ((0, e),), 0, None)))
    return jnp.concatenate(outs, axis=3) if len(outs) > 1 else outs[0]


def _streaming_attention(qh, kh, vh, sink: int, local: int, block: int):
    """Streaming (sink + local) attention by blocks of query rows, each reading the sink and the
    `local + block` keys before its last row; shapes as `_full_attention`."""
    t = qh.shape[3]
    outs = []
    for s in range(0, t, block):
        e = min(s + block, t)
        lo = max(0, s - local + 1)  # first key inside some row's local window
        if lo <= sink:  # the sink and local keys overlap: one slice, the window mask
            keys, ks, vs = ((0, e),), kh[:, :, :e], vh[:, :, :e]
        else:  # keys [0, sink) (visible to every row) then [lo, e)
            keys = ((0, sink), (lo, e))
            ks = jnp.concatenate([kh[:, :, :sink], kh[:, :, lo:e]], axis=2)
            vs = jnp.concatenate([vh[:, :, :sink], vh[:, :, lo:e]], axis=2)
        outs.append(_softmax_attend(qh[:, :, :, s:e], ks, vs, ((s, e), keys, sink, local)))
    return jnp.concatenate(outs, axis=3) if len(outs) > 1 else outs[0]


def gated_attention(q, k, v, gate, sink: int, local: int, block: int | None = None):
    """Per KV head `gate * full causal + (1 - gate) * streaming` attention, computed by blocks of
    `block` query rows that touch only the keys they may see: a block's full attention reads the
    keys up to its last row (about half the [T, T] work), its streaming attention the sink and
    the `local + block` keys before its last row. The same function as `_two_attentions`' two
    outputs mixed (its reference, tests/test_calibrate.py) at a fraction of the work and memory
    (what makes CPU calibration affordable at 4K tokens).

    q [B, T, Hq, D], k/v [B, T, Hkv, D] -> float32 [B, T, Hkv, G, D]. gate: None: full attention
    only; a float [Hkv] array in [0, 1]: the mix; a bool [Hkv] array: binary gates, each head
    computing only its own attention (a `lax.cond` per head, so one compilation serves every
    binary pattern; True: full). block: default `BLOCK` on CPU; on a GPU one block (the whole
    [T, T], which a GPU does faster than many small blocks, and compiles faster)."""
    b, t, hq, d = q.shape
    cpu = jax.default_backend() == "cpu"
    block = block or (BLOCK if cpu else t)
    sblock = min(block, STREAM_BLOCK) if cpu else block
    hkv = k.shape[2]
    g = hq // hkv
    qh = (q.astype(jnp.float32) / math.sqrt(d)).reshape(b, t, hkv, g, d).transpose(0, 2, 3, 1, 4)
    kh = k.astype(jnp.float32).transpose(0, 2, 1, 3)  # [B, Hkv, T, D]
    vh = v.astype(jnp.float32).transpose(0, 2, 1, 3)
    full = lambda q, k, v: _full_attention(q, k, v, block)  # noqa: E731
    stream = lambda q, k, v: _streaming_attention(q, k, v, sink, local, sblock)  # noqa: E731
    if gate is None:
        o = full(qh, kh, vh)
    elif jnp.issubdtype(gate.dtype, jnp.bool_):  # one head at a time, each on its own branch
        o = jnp.concatenate([jax.lax.cond(gate[h], full, stream, qh[:, h:h + 1], kh[:, h:h + 1], vh[:, h:h + 1])
                             for h in range(hkv)], axis=1)
    else:
        a = gate.astype(jnp.float32)[None, :, None, None, None]
        o = a * full(qh, kh, vh) + (1.0 - a) * stream(qh, kh, vh)
    return o.transpose(0, 3, 1, 2, 4)


def _gated_layer(lp, x: jax.Array, gate, cfg: ModelConfig, sink: int, local: int) -> jax.Array:
    """One decoder layer of the gated model: x [B, T, hidden] -> the next layer's input.
    gate: as `gated_attention`'s."""
    b, t = x.shape[:2]
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    inv_freq = inv_frequencies(cfg)
    h = rms_norm(x, lp.attn_norm, cfg.rms_norm_eps)
    q, k, v = _qkv(lp, h, cfg)
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)
    o = gated_attention(q, k, v, gate, sink, local).astype(x.dtype)
    x = x + _proj(o.reshape(b, t, -1), lp.wo)
    return _mlp(lp, x, cfg)


def stack_layers(params: Params) -> Params:
    """`params` with its layers stacked into one LayerParams of [layers, ...] arrays, the form
    `gated_hidden` scans over (one traced layer: compiles in seconds rather than minutes)."""
    if isinstance(params.layers, LayerParams):
        return params
    return params.replace(layers=jax.tree.map(lambda *xs: jnp.stack(xs), *params.layers))


def gated_hidden(params: Params, tokens: jax.Array, cfg: ModelConfig, gates: jax.Array | None, *,
                 sink: int, local: int) -> jax.Array:
    """Final (normed) hidden states [B, T, hidden] of the gated model, in the original head order.

    gates: [layers, kv_heads] in [0, 1]; 1 is full attention, 0 streaming (binary gates give
    exactly the sparse prefill model); None: the dense model (streaming attention not computed).
    The layers run as a `lax.scan` (pass `stack_layers(params)` to stack them once, not per call)."""
    def layer(x, lp, gate):
        return _gated_layer(lp, x, gate, cfg, sink, local)

    layers = stack_layers(params).layers
    if gates is None:
        body = lambda x, lp: (layer(x, lp, None), None)  # noqa: E731
        x, _ = jax.lax.scan(body, params.embed[tokens], layers)
    else:
        body = lambda x, lg: (layer(x, *lg), None)  # noqa: E731
        x, _ = jax.lax.scan(body, params.embed[tokens], (layers, jnp.asarray(gates)))
    return rms_norm(x, params.final_norm, cfg.rms_norm_eps)


def forward_hidden(params: Params, tokens: jax.Array, cfg: ModelConfig, layout: HeadLayout | None = None, *,
                   sink: int = 0, local: int = 1, impl: str = "reference") -> jax.Array:
    """Final (normed) hidden states at every position through the library's `prefill_attention`.

    `params` must already be permuted retrieval-first for `layout` (None: dense)."""
    b, t = tokens.shape
    layout = layout or HeadLayout.dense(cfg.num_layers, cfg.num_kv_heads)
    inv_freq = inv_frequencies(cfg)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    lengths = jnp.full((b,), t, jnp.int32)
    x = params.embed[tokens]
    for i, lp in enumerate(params.layers):
        h = rms_norm(x, lp.attn_norm, cfg.rms_norm_eps)
        q, k, v = _qkv(lp, h, cfg)
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)
        o = prefill_attention(q, k, v, lengths, num_retrieval=layout.num_retrieval[i], sink=sink,
                              local=local, impl=impl)
        x = x + _proj(o.reshape(b, t, -1), lp.wo)
        x = _mlp(lp, x, cfg)
    return rms_norm(x, params.final_norm, cfg.rms_norm_eps)


def lm_logits(params: Params, hidden: jax.Array) -> jax.Array:
    """[..., hidden] normed hidden states -> float32 [..., vocab] logits."""
    w = params.embed.T if params.lm_head is None else params.lm_head
    return jnp.einsum("...h,hv->...v", hidden, w, preferred_element_type=jnp.float32)


def token_nll(params: Params, tokens: jax.Array, cfg: ModelConfig, layout: HeadLayout | None = None, *,
              sink: int = 0, local: int = 1, impl: str = "reference") -> jax.Array:
    """Negative log-likelihood of tokens[:, 1:] given their prefixes: float32 [B, T - 1]."""
    return next_token_nll(params, forward_hidden(params, tokens, cfg, layout, sink=sink, local=local, impl=impl),
                          tokens)


def next_token_nll(params: Params, hidden: jax.Array, tokens: jax.Array, chunk: int | None = None) -> jax.Array:
    """[B, T, hidden] normed hidden states of `tokens` [B, T] -> float32 [B, T - 1]: the negative
    log-likelihood of each next token, `logsumexp(logits) - logit[next]`.

    On CPU the [positions, vocab] logits go through in chunks of `chunk` positions (default 64:
    small chunks stay in cache and run about 25% faster at 4K tokens); elsewhere in one piece
    unless `chunk` is given."""
    b, t, d = hidden.shape
    chunk = chunk or (64 if jax.default_backend() == "cpu" else b * (t - 1))
    n = b * (t - 1)
    pad = (-n) % chunk
    h = jnp.pad(hidden[:, :-1].reshape(n, d), ((0, pad), (0, 0))).reshape(-1, chunk, d)
    nxt = jnp.pad(tokens[:, 1:].reshape(n), (0, pad)).reshape(-1, chunk)

    def one(args):
        x, y = args
        logits = lm_logits(params, x)
        return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]

    return jax.lax.map(one, (h, nxt)).reshape(-1)[:n].reshape(b, t - 1)


@functools.lru_cache(maxsize=8)
def gated_nll_fn(cfg: ModelConfig, sink: int, local: int):
    """Jitted (params, tokens [B, T], gates or None) -> `next_token_nll` [B, T - 1] of the gated
    model (binary gates: the sparse prefill model exactly; None: dense). Cached per window, so
    every pattern scored at one window shares one compilation."""
    @jax.jit
    def nll(params, tokens, gates):
        return next_token_nll(params, gated_hidden(params, tokens, cfg, gates, sink=sink, local=local),
                              tokens)
    return nll


# ------------------------------------------------------------------------------------------
# Calibration.
# ------------------------------------------------------------------------------------------


def make_samples(encode: Encode, cfg: CalibConfig, n: int, haystack: Sequence[int] | None = None,
                 rng: np.random.Generator | None = None) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """n (tokens int32 [T], span float32 [T], context float32 [T]) triples. `span` marks the
    positions whose next-token outputs are the answer (the loss positions); `context` the prompt
    positions past the streaming window (sink + local), where streaming heads see less than
    dense ones (the `text_weight` term). The prompt is shortened so prompt + answer is exactly
    the requested length (one compiled shape per length). haystack: natural-text token ids to
    hide the keys in (None: tiled filler; with cfg.haystack "mixed", only odd samples use it).
    rng: where the keys, depths and offsets come from (default: seeded with cfg.seed)."""
    rng = np.random.default_rng(cfg.seed) if rng is None else rng
    out = []
    for i in range(n):
        length = cfg.lengths[i % len(cfg.lengths)]
        text = haystack if cfg.haystack != "mixed" or i % 2 else None
        s = multi_passkey_sample(encode, length, cfg.num_keys, rng, fit_answer=True, haystack=text)
        span = np.zeros(length, np.float32)
        span[len(s.ids) - 1: length - 1] = 1.0  # outputs that predict the answer tokens
        context = np.zeros(length, np.float32)
        context[min(cfg.sink + cfg.local, len(s.ids) - 1): len(s.ids) - 1] = 1.0
        out.append((np.asarray(s.ids + s.answer_ids, np.int32), span, context))
    return out


@functools.lru_cache(maxsize=8)
def _gradient_step_fn(cfg: ModelConfig, sink: int, local: int, reg: float, lr: float, text_weight: float):
    """Jitted Adam step on the gates (cached: a sweep of seeds or haystacks compiles once)."""
    opt = optax.adam(lr)

    def mse(h, target, w):
        w = w[None, :, None]
        return jnp.sum(w * (h - target) ** 2) / (jnp.maximum(jnp.sum(w), 1.0) * h.shape[-1])

    def loss_fn(gates, params, tokens, span, context, target):
        # no jax.checkpoint (15% faster on CPU than rematerialising): the blocked attention keeps the saved state small
        h = gated_hidden(params, tokens, cfg, gates, sink=sink, local=local).astype(jnp.float32)
        distill = mse(h, target, span)
        if text_weight:
            distill = distill + text_weight * mse(h, target, context)
        l1 = jnp.mean(jnp.abs(gates))
        return distill + reg * l1, (distill, l1)

    def step(gates, opt_state, params, tokens, span, context):
        target = gated_hidden(params, tokens, cfg, None, sink=sink, local=local)
        target = jax.lax.stop_gradient(target.astype(jnp.float32))
        (loss, (distill, l1)), g = jax.value_and_grad(loss_fn, has_aux=True)(gates, params, tokens, span,
                                                                             context, target)
        updates, opt_state = opt.update(g, opt_state, gates)
        gates = jnp.clip(optax.apply_updates(gates, updates), 0.0, 1.0)
        return gates, opt_state, loss, distill, l1, jnp.abs(g)

    return opt, jax.jit(step)


def _attention_mass_fn(cfg: ModelConfig, cc: CalibConfig):
    """Jitted (params, tokens, span) -> [layers, kv_heads]: the causal attention mass that the
    span queries put outside the streaming window, averaged over them and the query group."""
    def mass(params, tokens, span):
        b, t = tokens.shape
        inv_freq = inv_frequencies(cfg)
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        w = span / jnp.maximum(jnp.sum(span), 1.0)  # [T] query weights
        x = params.embed[tokens]
        scores = []
        for lp in params.layers:
            h = rms_norm(x, lp.attn_norm, cfg.rms_norm_eps)
            q, k, v = _qkv(lp, h, cfg)
            q = apply_rope(q, positions, inv_freq)
            k = apply_rope(k, positions, inv_freq)
            o, _, inside = _two_attentions(q, k, v, cc.sink, cc.local)
            scores.append(jnp.einsum("bhgq,q->h", 1.0 - inside, w) / (b * cfg.group_size))
            x = x + _proj(o.astype(x.dtype).reshape(b, t, -1), lp.wo)
            x = _mlp(lp, x, cfg)
        return jnp.stack(scores)

    return jax.jit(mass)


def calibrate(params: Params, cfg: ModelConfig, encode: Encode, cc: CalibConfig = CalibConfig(), *,
              haystack: Sequence[int] | None = None,
              log: Callable[[str], None] | None = print) -> CalibResult:
    """Runs a calibration; returns the gate matrix, the per-step curve and the wall time.

    haystack: natural-text token ids for `cc.haystack` "text" or "mixed" and for the boundary
    refinement (default: the calibration half of the shipped corpus, `corpus.haystack_ids(encode)`).
    The refinement (`cc.refine_band` > 0) follows the gradient method only: attention-mass is
    the cheap baseline."""
    log = log or (lambda s: None)
    params = jax.tree.map(jnp.asarray, params)
    if haystack is None and (cc.haystack != "filler" or cc.refines):
        haystack = haystack_ids(encode)
    samples = make_samples(encode, cc, cc.steps, None if cc.haystack == "filler" else haystack)
    start = time.perf_counter()
    curve: list[dict] = []
    shape = (cfg.num_layers, cfg.num_kv_heads)

    def over_time() -> bool:
        return cc.max_minutes is not None and time.perf_counter() - start > 60 * cc.max_minutes

    if cc.method == "attention-mass":
        fn = _attention_mass_fn(cfg, cc)
        total = np.zeros(shape)
        n = 0
        for i, (tokens, span, _) in enumerate(samples):
            total += np.asarray(fn(params, jnp.asarray(tokens)[None], jnp.asarray(span)), np.float64)
            n += 1
            curve.append({"step": i, "seconds": time.perf_counter() - start, "length": int(tokens.shape[0])})
            log(f"[calibrate] sample {i + 1}/{cc.steps} len {tokens.shape[0]} "
                f"({time.perf_counter() - start:.0f}s)")
            if over_time():
                break
        return CalibResult(total / n, curve, time.perf_counter() - start, cc)

    opt, step = _gradient_step_fn(cfg, cc.sink, cc.local, cc.reg, cc.lr, cc.text_weight)
    # committed to the device from the start, as the step's outputs are: otherwise the second
    # step of each sample length compiles again
    gates = jax.device_put(jnp.full(shape, cc.init, jnp.float32), jax.devices()[0])
    opt_state = jax.device_put(opt.init(gates), jax.devices()[0])
    grad_mag = np.zeros(shape)
    stacked = stack_layers(params)
    for i, (tokens, span, context) in enumerate(samples):
        gates, opt_state, loss, distill, l1, g = step(gates, opt_state, stacked, jnp.asarray(tokens)[None],
                                                      jnp.asarray(span), jnp.asarray(context))
        loss, distill, l1 = float(loss), float(distill), float(l1)
        grad_mag += np.asarray(g, np.float64)
        el = time.perf_counter() - start
        curve.append({"step": i, "loss": loss, "distill": distill, "l1": l1, "seconds": el,
                      "length": int(tokens.shape[0])})
        log(f"[calibrate] step {i + 1}/{cc.steps} len {tokens.shape[0]} loss {loss:.5f} "
            f"(distill {distill:.5f}, mean alpha {l1:.3f}) {el:.0f}s")
        if over_time():
            log(f"[calibrate] stopping after {i + 1} steps: past --max-minutes {cc.max_minutes}")
            break
    del stacked
    alpha = break_ties(np.asarray(gates, np.float64), grad_mag)
    report = None
    if cc.refines:
        alpha, report = refine_boundary(params, cfg, encode, alpha, cc, haystack=haystack, log=log)
    return CalibResult(alpha, curve, time.perf_counter() - start, cc, grad_mag, report)


def break_ties(alpha: np.ndarray, secondary: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Gates clipped to exactly 0 (or 1) tie; the quantile rule could then not split them at
    every sparsity. Adds eps * secondary (normalised to [0, 1]) and rescales into [0, 1]: ties
    are ordered by `secondary` (the accumulated |gradient|), distinct gates keep their order
    unless they are closer than eps."""
    sec = np.asarray(secondary, np.float64)
    sec = (sec - sec.min()) / max(np.ptp(sec), 1e-30)
    return (np.clip(alpha, 0.0, 1.0) + eps * sec) / (1.0 + eps)


def text_samples(haystack: Sequence[int], n: int, length: int, skip: int, rng: np.random.Generator
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
    """n windows of `length` natural-text tokens from random offsets, (tokens int32 [T], weights
    float32 [T]) weighted on every position from `skip` on (past a streaming window)."""
    if len(haystack) < length:
        raise ValueError(f"the haystack text has {len(haystack)} tokens, fewer than {length}")
    out = []
    for _ in range(n):
        start = int(rng.integers(0, len(haystack) - length + 1))
        w = np.zeros(length, np.float32)
        w[skip:] = 1.0
        out.append((np.asarray(haystack[start:start + length], np.int32), w))
    return out


def refine_samples(cc: CalibConfig, haystack: Sequence[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The held-out text `refine_boundary` scores on: `cc.refine_samples` windows of
    `cc.refine_length` tokens of `haystack`, weighted past the refinement window, drawn with their
    own seed (not the optimisation's)."""
    rng = np.random.default_rng([cc.seed, 1])
    return text_samples(haystack, cc.refine_samples, cc.refine_length, cc.sink + cc.refine_window, rng)


@functools.lru_cache(maxsize=8)
def _layer_fn(cfg: ModelConfig, sink: int, local: int):
    """Jitted (layer params, x, binary gate: bool [Hkv]) -> next x: one compilation serves every
    layer and gate."""
    return jax.jit(lambda lp, x, gate: _gated_layer(lp, x, gate, cfg, sink, local))


@functools.lru_cache(maxsize=8)
def _weighted_nll_fn(cfg: ModelConfig):
    """Jitted (params, last layer's output x [1, T, hidden], tokens [1, T], weights [T - 1]) ->
    the weighted mean next-token NLL."""
    def f(params, x, tokens, w):
        nll = next_token_nll(params, rms_norm(x, params.final_norm, cfg.rms_norm_eps), tokens)[0]
        return jnp.sum(w * nll) / jnp.maximum(jnp.sum(w), 1.0)
    return jax.jit(f)


def flip_costs(params: Params, cfg: ModelConfig, retrieval: np.ndarray, heads: Sequence[int],
               samples: Sequence[tuple[np.ndarray, np.ndarray]], *, sink: int, local: int,
               log: Callable[[str], None] | None = None) -> tuple[float, np.ndarray, np.ndarray]:
    """What streaming each head costs, measured from the binary pattern `retrieval` ([layers,
    kv_heads] bool): the rise of the mean weighted negative log-likelihood over `samples` when
    head h (a flat index) streams and every other head stays as in the pattern, i.e.
    NLL(P + h streaming) - NLL(P) for a retrieval head and NLL(P) - NLL(P - h streaming) for a
    streaming one. Returns (NLL(P), costs [len(heads)], the same per sample [len(samples),
    len(heads)]: the costs are their mean).

    Exact, and cheaper than a forward per flip: the pattern's forward keeps every layer's input,
    so flipping a head in layer l recomputes layers l.. only (`_layer_fn`, blocked attention)."""
    layer = _layer_fn(cfg, sink, local)
    final = _weighted_nll_fn(cfg)
    retrieval = np.asarray(retrieval, bool)
    gates = [jnp.asarray(row) for row in retrieval]
    hkv = retrieval.shape[1]
    head = params.replace(layers=())  # what the final NLL reads
    t0 = time.perf_counter()
    base = np.zeros(len(samples))
    flipped = np.zeros((len(samples), len(heads)))
    for i, (tokens, w) in enumerate(samples):
        tok = jnp.asarray(tokens)[None]
        wd = jnp.asarray(w[:-1])  # weights of the predictions
        xs = [params.embed[tok]]  # xs[l]: input of layer l
        for lp, g in zip(params.layers, gates):
            xs.append(layer(lp, xs[-1], g))
        base[i] = float(final(head, xs[-1], tok, wd))
        for j, h in enumerate(heads):
            l, kv = divmod(int(h), hkv)
            x = layer(params.layers[l], xs[l], jnp.asarray(retrieval[l] != (np.arange(hkv) == kv)))
            for m in range(l + 1, cfg.num_layers):
                x = layer(params.layers[m], x, gates[m])
            flipped[i, j] = float(final(head, x, tok, wd))
        if log:
            log(f"[refine] window {i + 1}/{len(samples)}: {len(heads)} heads flipped "
                f"({time.perf_counter() - t0:.0f}s)")
    sign = np.where(retrieval.ravel()[np.asarray(heads, int)], 1.0, -1.0)
    per_sample = sign * (flipped - base[:, None])
    costs = per_sample.mean(0)
    if log:
        for h, c, sd in zip(heads, costs, per_sample.std(0)):
            log(f"[refine] layer {h // hkv}, kv head {h % hkv}: streaming costs {c:+.5f} nats "
                f"(sd over windows {sd:.5f})")
    return float(base.mean()), costs, per_sample


def boundary_band(alpha: np.ndarray, sparsity: float, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(retrieval mask at `sparsity`, flat indices of the band): the k streaming heads with the
    highest gates and the k retrieval heads with the lowest (fewer if a side has fewer)."""
    retrieval = binarize(alpha, sparsity)
    n_stream = int((~retrieval).sum())
    k = min(k, n_stream, alpha.size - n_stream)
    order = np.argsort(alpha.ravel(), kind="stable")
    return retrieval, order[n_stream - k: n_stream + k]


def rerank_band(alpha: np.ndarray, band: Sequence[int], cost: Sequence[float]) -> np.ndarray:
    """The band's gate values reassigned in cost order (cheapest to stream gets the lowest): the
    same set of values, so a cut outside the band does not move and the band's cheapest half is
    on the streaming side of its own cut."""
    flat = alpha.ravel().copy()
    band = np.asarray(band)
    ranked = band[np.lexsort((flat[band], np.asarray(cost)))]
    flat[ranked] = np.sort(flat[band])
    return flat.reshape(alpha.shape)


def refine_boundary(params: Params, cfg: ModelConfig, encode: Encode, alpha: np.ndarray, cc: CalibConfig, *,
                    haystack: Sequence[int] | None = None,
                    log: Callable[[str], None] | None = print) -> tuple[np.ndarray, dict]:
    """Re-ranks the heads at the `cc.refine_sparsity` boundary by what streaming each costs the
    model's language modelling.

    The optimisation ranks heads by a hidden-state MSE on pass-key samples: the heads it is sure
    about are right, but the gates near the cut are close, move from seed to seed, and say little
    about long-range language modelling. Here the binary pattern at the target sparsity is the
    baseline and the band is `boundary_band`'s (`cc.refine_band` heads on each side of the cut);
    each band head's cost is the measured rise of the next-token NLL over natural text past the
    streaming window (`flip_costs`, window `cc.sink` + `cc.refine_window`) when that head alone
    streams, on held-out text (`refine_samples`: the corpus's calibration half, never the half
    perplexity is scored on). The band's cheapest half streams (`rerank_band`); heads outside
    the band keep their gates. Measured on SmolLM2 (bench/results/calib_sweep-2026-12-02e/f.json):
    the 4K perplexity ratio to dense went from 1.019-1.031 to 1.016-1.021 for all seven
    calibrated patterns tried. Returns (alpha, report)."""
    log = log or (lambda s: None)
    t0 = time.perf_counter()
    haystack = haystack_ids(encode) if haystack is None else haystack
    retrieval, band = boundary_band(alpha, cc.refine_sparsity, cc.refine_band)
    samples = refine_samples(cc, haystack)
    base, cost, per_window = flip_costs(params, cfg, retrieval, band, samples, sink=cc.sink, local=cc.refine_window,
                                        log=log)
    alpha_new = rerank_band(alpha, band, cost)
    after = binarize(alpha_new, cc.refine_sparsity).ravel()
    moved = [int(h) for h in band if after[h] != retrieval.ravel()[h]]
    report = {"sparsity": cc.refine_sparsity, "band": [int(h) for h in band], "cost": cost.tolist(),
              "window_cost": per_window.tolist(),
              "base_nll": base, "moved": moved, "seconds": time.perf_counter() - t0,
              "alpha_before": alpha.tolist()}
    log(f"[refine] {len(moved)} of {len(band)} boundary heads changed side ({report['seconds']:.0f}s)")
    return alpha_new, report


def write_pattern_atomic(path: str | os.PathLike, alpha: np.ndarray) -> Path:
    """Writes the TSV through a temporary file in the same directory and renames it into place."""
    path = Path(path).expanduser().absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        save_pattern(tmp, alpha)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def random_pattern(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A random gate matrix (the control for a calibrated one at the same sparsity)."""
    return np.random.default_rng(seed).random(shape)


# ------------------------------------------------------------------------------------------
# CLI.
# ------------------------------------------------------------------------------------------


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(",") if x)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lserve_jax.calibrate", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", nargs="?", help="converted checkpoint directory (default: the default model)")
    d = CalibConfig()
    ap.add_argument("--method", choices=METHODS, default=d.method)
    ap.add_argument("--output", help="pattern TSV path (default: <checkpoint>/head_pattern.tsv)")
    ap.add_argument("--curve", help="JSON of settings, loss curve and gates (default: <output>.json)")
    ap.add_argument("--steps", type=int, default=d.steps, help="optimisation steps / samples (%(default)s)")
    ap.add_argument("--lengths", type=_ints, default=d.lengths, help="sample lengths, comma-separated")
    ap.add_argument("--num-keys", type=int, default=d.num_keys)
    ap.add_argument("--sink", type=int, default=d.sink)
    ap.add_argument("--local", type=int, default=d.local)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--reg", type=float, default=d.reg, help="L1 weight lambda (%(default)s)")
    ap.add_argument("--haystack", choices=HAYSTACKS, default=d.haystack,
                    help="hide the keys in natural text, in tiled filler, or alternately in both (%(default)s)")
    ap.add_argument("--text", help="UTF-8 text file for --haystack text/mixed and the refinement (default: the "
                    "calibration half of the shipped corpus, lserve_jax/data/)")
    ap.add_argument("--text-weight", type=float, default=d.text_weight,
                    help="weight of the MSE over haystack positions past the window (%(default)s)")
    ap.add_argument("--refine-band", type=int, default=d.refine_band,
                    help="boundary refinement: heads on each side of the --refine-sparsity cut re-ranked by "
                    "their measured cost on natural text (%(default)s; 0: off)")
    ap.add_argument("--refine-sparsity", type=float, default=d.refine_sparsity,
                    help="static sparsity whose cut is refined (%(default)s)")
    ap.add_argument("--refine-samples", type=int, default=d.refine_samples, help="text windows (%(default)s)")
    ap.add_argument("--refine-length", type=int, default=None,
                    help=f"tokens per text window (default: {d.refine_length} or the model's context if shorter)")
    ap.add_argument("--refine-local", type=int, default=None, help="local window of the refinement's "
                    "streaming heads (default: --local)")
    ap.add_argument("--from-pattern", help="skip the optimisation: refine the boundary of this pattern TSV")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--max-minutes", type=float, default=None, help="stop the optimisation after the step "
                    "that passes this (the refinement still runs)")
    ap.add_argument("--dtype", default="float32", help="parameter dtype for calibration (%(default)s)")
    args = ap.parse_args(argv)

    from .api import default_checkpoint
    from .checkpoint import open_checkpoint
    from .tokenizer import Tokenizer

    ckpt = open_checkpoint(args.checkpoint or default_checkpoint())
    if not ckpt.tokenizer_file.exists():
        print(f"error: {ckpt.path} has no tokenizer.json (needed to build the samples)", file=sys.stderr)
        return 2
    max_len = ckpt.config.max_position_embeddings
    refine_length = args.refine_length or min(d.refine_length, max_len)
    try:
        cc = CalibConfig(method=args.method, sink=args.sink, local=args.local, lengths=args.lengths,
                         num_keys=args.num_keys, steps=args.steps, lr=args.lr, reg=args.reg, seed=args.seed,
                         haystack=args.haystack, text_weight=args.text_weight, max_minutes=args.max_minutes,
                         refine_band=args.refine_band, refine_sparsity=args.refine_sparsity,
                         refine_samples=args.refine_samples, refine_length=refine_length,
                         refine_local=args.refine_local)
    except ValueError as e:
        ap.error(str(e))
    refine = cc.refines
    if not args.from_pattern and max(cc.lengths) > max_len:
        ap.error(f"--lengths {max(cc.lengths)} exceeds the model context {max_len}")
    if refine and cc.refine_length > max_len:
        ap.error(f"--refine-length {cc.refine_length} exceeds the model context {max_len}")
    if args.from_pattern and not refine:
        ap.error("--from-pattern refines a pattern: it needs --method gradient and --refine-band > 0")
    if args.text and cc.haystack == "filler" and not refine:
        ap.error("--text needs --haystack text or mixed, or the refinement (--refine-band > 0)")
    alpha0 = None
    if args.from_pattern:
        try:
            alpha0 = load_pattern(args.from_pattern)
            check_shape(alpha0, ckpt.config.num_layers, ckpt.config.num_kv_heads)
        except (OSError, ValueError) as e:
            print(f"error: --from-pattern {args.from_pattern}: {e}", file=sys.stderr)
            return 2
    tok = Tokenizer.from_checkpoint_dir(ckpt.path)
    encode = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    haystack = None
    if cc.haystack != "filler" or refine:
        try:
            haystack = encode(read_text(args.text)) if args.text else haystack_ids(encode)
        except (OSError, UnicodeDecodeError) as e:
            print(f"error: cannot read --text {args.text}: {e}", file=sys.stderr)
            return 2
        need = max([*(cc.lengths if cc.haystack != "filler" and alpha0 is None else ()),
                    *((cc.refine_length,) if refine else ())])
        if len(haystack) < need:
            ap.error(f"the haystack text has {len(haystack)} tokens, fewer than the {need} the samples need "
                     f"(--lengths / --refine-length)")
    params = ckpt.load_params(args.dtype)
    print(f"[calibrate] {ckpt.path} ({ckpt.config.num_layers} layers x {ckpt.config.num_kv_heads} KV heads), "
          f"{cc}", flush=True)
    logp = lambda s: print(s, flush=True)  # noqa: E731
    if alpha0 is not None:
        t0 = time.perf_counter()
        alpha, report = refine_boundary(jax.tree.map(jnp.asarray, params), ckpt.config, encode, alpha0, cc,
                                        haystack=haystack, log=logp)
        res = CalibResult(alpha, [], time.perf_counter() - t0, cc, None, report)
    else:
        res = calibrate(params, ckpt.config, encode, cc, haystack=haystack, log=logp)
    out = write_pattern_atomic(args.output or ckpt.path / "head_pattern.tsv", res.alpha)
    curve_path = Path(args.curve) if args.curve else out.with_suffix(".json")
    curve_path.parent.mkdir(parents=True, exist_ok=True)
    dev = jax.devices()[0]
    record = {"checkpoint": str(ckpt.path), "device": "CPU" if dev.platform == "cpu" else dev.device_kind,
              "cpu_cores": os.cpu_count(), **res.to_json()}
    if args.from_pattern:
        record["from_pattern"] = str(Path(args.from_pattern).absolute())
    curve_path.write_text(json.dumps(record, indent=1))
    print(f"[calibrate] wrote {out} and {curve_path} in {res.seconds / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
