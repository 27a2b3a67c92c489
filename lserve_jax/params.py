"""The parameter pytree: every array declared once, with init and abstract shapes derived from it.

Linear weights are stored [in, out] so the forward pass is `x @ w`. Layers are a tuple (not a
stacked array): after the head permutation each layer is still the same shape, but keeping them
separate lets each layer's attention use its own static retrieval-head count.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from .config import ModelConfig


@struct.dataclass
class LayerParams:
    attn_norm: jax.Array  # [hidden]
    wq: jax.Array  # [hidden, num_heads * head_dim]
    wk: jax.Array  # [hidden, num_kv_heads * head_dim]
    wv: jax.Array  # [hidden, num_kv_heads * head_dim]
    wo: jax.Array  # [num_heads * head_dim, hidden]
    bq: jax.Array | None  # [num_heads * head_dim] (Qwen2) or None
    bk: jax.Array | None  # [num_kv_heads * head_dim] or None
    bv: jax.Array | None  # [num_kv_heads * head_dim] or None
    mlp_norm: jax.Array  # [hidden]
    w_gate: jax.Array  # [hidden, intermediate]
    w_up: jax.Array  # [hidden, intermediate]
    w_down: jax.Array  # [intermediate, hidden]


@struct.dataclass
class Params:
    embed: jax.Array  # [vocab, hidden]
    layers: tuple[LayerParams, ...]
    final_norm: jax.Array  # [hidden]
    lm_head: jax.Array | None  # [hidden, vocab], None when tied to `embed`


def layer_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...] | None]:
    """Shape of every per-layer array (None: absent for this architecture)."""
    h, q, kv, f = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    bias = cfg.attention_bias
    return {
        "attn_norm": (h,), "wq": (h, q), "wk": (h, kv), "wv": (h, kv), "wo": (q, h),
        "bq": (q,) if bias else None, "bk": (kv,) if bias else None, "bv": (kv,) if bias else None,
        "mlp_norm": (h,), "w_gate": (h, f), "w_up": (h, f), "w_down": (f, h),
    }


def top_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...] | None]:
    h, v = cfg.hidden_size, cfg.vocab_size
    return {"embed": (v, h), "final_norm": (h,), "lm_head": None if cfg.tie_word_embeddings else (h, v)}


def _build(cfg: ModelConfig, make: Callable[[str, tuple[int, ...]], jax.Array]) -> Params:
    def opt(name, shape):
        return None if shape is None else make(name, shape)

    layers = tuple(
        LayerParams(**{n: opt(f"layers.{i}.{n}", s) for n, s in layer_shapes(cfg).items()})
        for i in range(cfg.num_layers)
    )
    return Params(layers=layers, **{n: opt(n, s) for n, s in top_shapes(cfg).items()})


def abstract_params(cfg: ModelConfig, dtype=jnp.bfloat16) -> Params:
    """ShapeDtypeStructs of every parameter (for checkpoint restore and shape checks)."""
    return _build(cfg, lambda name, shape: jax.ShapeDtypeStruct(shape, dtype))


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.bfloat16, scale: float = 0.02) -> Params:
    """Random parameters (benchmarks and tests): normal(0, scale) weights, unit norms."""
    counter = iter(range(1 << 30))

    def make(name, shape):
        if name.endswith("norm"):
            return jnp.ones(shape, dtype)
        k = jax.random.fold_in(key, next(counter))
        return (scale * jax.random.normal(k, shape, jnp.float32)).astype(dtype)

    return _build(cfg, make)


def flat_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """{"layers.3.wq": (hidden, q_dim), "embed": ..., ...} for every present array."""
    out = {}
    _build(cfg, lambda name, shape: out.setdefault(name, shape))
    return out


def from_flat(cfg: ModelConfig, arrays: dict[str, np.ndarray | jax.Array]) -> Params:
    """Assembles Params from a {flat name: array} dict (the converter's output)."""
    return _build(cfg, lambda name, shape: arrays[name])


def cast(params: Params, dtype) -> Params:
    return jax.tree.map(lambda x: x.astype(dtype), params)


def permute_kv_heads(params: Params, cfg: ModelConfig, perms: np.ndarray) -> Params:
    """Reorders each layer's KV heads (with their GQA query groups) by `perms[l]`.

    q/k/v output columns and o input rows move together, so the model computes exactly the same
    function: attention is a sum over heads, and each head's q, k, v and o slices travel as one.
    """
    n_kv, g, d = cfg.num_kv_heads, cfg.group_size, cfg.head_dim

    def cols(w, heads_per_kv, perm):  # [..., n_kv * heads_per_kv * d] columns
        lead = w.shape[:-1]
        w = w.reshape(*lead, n_kv, heads_per_kv * d)
        return jnp.take(w, perm, axis=len(lead)).reshape(*lead, -1)

    layers = []
    for layer, perm in zip(params.layers, np.asarray(perms)):
        perm = jnp.asarray(perm, jnp.int32)
        wo = layer.wo.reshape(n_kv, g * d, -1)
        layers.append(layer.replace(
            wq=cols(layer.wq, g, perm), wk=cols(layer.wk, 1, perm), wv=cols(layer.wv, 1, perm),
            bq=None if layer.bq is None else cols(layer.bq, g, perm),
            bk=None if layer.bk is None else cols(layer.bk, 1, perm),
            bv=None if layer.bv is None else cols(layer.bv, 1, perm),
            wo=jnp.take(wo, perm, axis=0).reshape(layer.wo.shape),
        ))
    return params.replace(layers=tuple(layers))
