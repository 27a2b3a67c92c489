"""The gated model that calibration trains: per (layer, KV head) a gate in [0, 1] mixes full
causal attention with streaming attention (sink + local tokens),
`o = gate * o_full + (1 - gate) * o_stream`, inside THE decoder layer (`models.layer`).

Binary gates give exactly the sparse prefill model (`prefill_attention`'s semantics, in the
original head order), so the same forward scores patterns (`evals.perplexity`,
`evals.passkey_proxy`). On CPU the attention goes by blocks of query rows that read only the
keys they may see, with a flash-style backward pass (`gated_attention`); the layers run as one
`lax.scan` over stacked weights.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from ..config import ModelConfig
from ..evals.nll import next_token_nll
from ..kv8 import fake_quantize
from ..models.layer import decoder_layer, final_norm
from ..ops import attn8
from ..params import Params, stack_layers


def _window(t: int, sink: int, local: int) -> jax.Array:
    """[T, T] bool: causal and inside a streaming head's Λ window."""
    i = jnp.arange(t)[:, None]
    j = jnp.arange(t)[None, :]
    return (j <= i) & ((j < sink) | (i - j < local))


def two_attentions(q, k, v, sink: int, local: int, stream: bool = True):
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


def _attend_fp8(q, k, v, spec, v_scale):
    """`_softmax_attend`'s forward with FP8 attention's roundings (`attn8.fp8_softmax_pv`; q, k, v
    already rounded and dequantised). No gradient."""
    s = jnp.einsum("bhgqd,bhkd->bhgqk", q, k) + _block_bias(*spec)
    return attn8.fp8_softmax_pv(s, lambda p: jnp.einsum("bhgqk,bhkd->bhgqd", p, v), v_scale)


def _full_attention(qh, kh, vh, block: int, v_scale=None):
    """Causal attention by blocks of query rows, each reading the keys up to its last row:
    qh [B, Hkv, G, T, D] (pre-scaled), kh/vh [B, Hkv, T, D] -> float32 [B, Hkv, G, T, D].
    v_scale: FP8 attention's roundings (`_attend_fp8`, forward only) with V's scale."""
    t = qh.shape[3]
    outs = []
    for s in range(0, t, block):
        e = min(s + block, t)
        args = (qh[:, :, :, s:e], kh[:, :, :e], vh[:, :, :e], ((s, e), ((0, e),), 0, None))
        outs.append(_softmax_attend(*args) if v_scale is None else _attend_fp8(*args, v_scale))
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


def gated_attention(q, k, v, gate, sink: int, local: int, block: int | None = None, fp8: bool = False):
    """Per KV head `gate * full causal + (1 - gate) * streaming` attention, computed by blocks of
    `block` query rows that touch only the keys they may see: a block's full attention reads the
    keys up to its last row (about half the [T, T] work), its streaming attention the sink and
    the `local + block` keys before its last row. The same function as `two_attentions`' two
    outputs mixed (its reference, tests/test_calibrate.py) at a fraction of the work and memory
    (what makes CPU calibration affordable at 4K tokens).

    q [B, T, Hq, D], k/v [B, T, Hkv, D] -> float32 [B, T, Hkv, G, D]. gate: None: full attention
    only; a float [Hkv] array in [0, 1]: the mix; a bool [Hkv] array: binary gates, each head
    computing only its own attention (a `lax.cond` per head, so one compilation serves every
    binary pattern; True: full). block: default `BLOCK` on CPU; on a GPU one block (the whole
    [T, T], which a GPU does faster than many small blocks, and compiles faster).

    fp8: the full (retrieval) heads' attention with FP8 operands as `ops.attn8` computes it
    (prefill impl "cudnn8+triton"): K centred and Q, K rotated (`attn8.incoherent_qk`), Q, K, V
    rounded to e4m3 with one scale each over the heads whose gate is above 0.5 (every head
    without gates), and `_attend_fp8`'s roundings; the
    streaming heads unquantised. Forward only."""
    b, t, hq, d = q.shape
    cpu = jax.default_backend() == "cpu"
    block = block or (BLOCK if cpu else t)
    sblock = min(block, STREAM_BLOCK) if cpu else block
    hkv = k.shape[2]
    g = hq // hkv

    def heads(q, k, v):  # [B, Hkv, G, T, D] (pre-scaled), [B, Hkv, T, D] x 2, in float32
        return ((q.astype(jnp.float32) / math.sqrt(d)).reshape(b, t, hkv, g, d).transpose(0, 2, 3, 1, 4),
                k.astype(jnp.float32).transpose(0, 2, 1, 3), v.astype(jnp.float32).transpose(0, 2, 1, 3))

    plain = heads(q, k, v)
    dense_in, v_scale = plain, None
    if fp8:
        sel = None if gate is None else (gate if jnp.issubdtype(gate.dtype, jnp.bool_) else gate > 0.5)
        qr, kr = attn8.incoherent_qk(q, k)
        (q8, sq), (k8, sk) = attn8.per_tensor(qr, None if sel is None else jnp.repeat(sel, g)), attn8.per_tensor(kr, sel)
        v8, v_scale = attn8.per_tensor(v, sel)
        dense_in = heads(q8.astype(jnp.float32) * sq, k8.astype(jnp.float32) * sk, v8.astype(jnp.float32) * v_scale)
    full = lambda q, k, v: _full_attention(q, k, v, block, v_scale)  # noqa: E731
    stream = lambda q, k, v: _streaming_attention(q, k, v, sink, local, sblock)  # noqa: E731
    if gate is None:
        o = full(*dense_in)
    elif jnp.issubdtype(gate.dtype, jnp.bool_):  # one head at a time, each on its own branch
        at = lambda xs, h: tuple(x[:, h:h + 1] for x in xs)  # noqa: E731
        o = jnp.concatenate([jax.lax.cond(gate[h], lambda a, _: full(*a), lambda _, s: stream(*s),
                                          at(dense_in, h), at(plain, h)) for h in range(hkv)], axis=1)
    else:
        a = gate.astype(jnp.float32)[None, :, None, None, None]
        o = a * full(*dense_in) + (1.0 - a) * stream(*plain)
    return o.transpose(0, 3, 1, 2, 4)


def gated_layer(lp, x: jax.Array, gate, cfg: ModelConfig, sink: int, local: int, kv_dtype=None,
                attn8: bool = False) -> jax.Array:
    """One decoder layer of the gated model: x [B, T, hidden] -> the next layer's input.
    gate: as `gated_attention`'s. kv_dtype: an 8-bit KV dtype (`lserve_jax.kv8`: e4m3 or int8):
    attention reads K (after RoPE) and V back from that storage, every position (what decode reads
    from the cache; prefill attends to a chunk's own keys unquantised, so this is the harder case).
    attn8: the full heads' attention with FP8 operands (`gated_attention(fp8=True)`)."""
    b, t = x.shape[:2]
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))

    def attend(q, k, v):
        if kv_dtype is not None:
            k, v = fake_quantize(k, kv_dtype), fake_quantize(v, kv_dtype)
        return gated_attention(q, k, v, gate, sink, local, fp8=attn8), None

    x, _ = decoder_layer(lp, x, positions, cfg, attend)
    return x


def gated_hidden(params: Params, tokens: jax.Array, cfg: ModelConfig, gates: jax.Array | None, *,
                 sink: int, local: int, kv_dtype=None, attn8: bool = False) -> jax.Array:
    """Final (normed) hidden states [B, T, hidden] of the gated model, in the original head order.

    gates: [layers, kv_heads] in [0, 1]; 1 is full attention, 0 streaming (binary gates give
    exactly the sparse prefill model); None: the dense model (streaming attention not computed).
    The layers run as a `lax.scan` (pass `params.stack_layers(params)` to stack them once, not
    per call). kv_dtype, attn8: as `gated_layer`'s."""
    def layer(x, lp, gate):
        return gated_layer(lp, x, gate, cfg, sink, local, kv_dtype, attn8)

    layers = stack_layers(params).layers
    if gates is None:
        body = lambda x, lp: (layer(x, lp, None), None)  # noqa: E731
        x, _ = jax.lax.scan(body, params.embed[tokens], layers)
    else:
        body = lambda x, lg: (layer(x, *lg), None)  # noqa: E731
        x, _ = jax.lax.scan(body, params.embed[tokens], (layers, jnp.asarray(gates)))
    return final_norm(params, x, cfg)


@functools.lru_cache(maxsize=8)
def gated_nll_fn(cfg: ModelConfig, sink: int, local: int, kv_dtype=None, attn8: bool = False):
    """Jitted (params, tokens [B, T], gates or None) -> `next_token_nll` [B, T - 1] of the gated
    model (binary gates: the sparse prefill model exactly; None: dense; kv_dtype: K and V read
    back from 8-bit pages, `gated_layer`; attn8: FP8 attention in the full heads). Cached per window, so every pattern scored at one
    window shares one compilation."""
    @jax.jit
    def nll(params, tokens, gates):
        return next_token_nll(params, gated_hidden(params, tokens, cfg, gates, sink=sink, local=local,
                                                   kv_dtype=kv_dtype, attn8=attn8), tokens)
    return nll
