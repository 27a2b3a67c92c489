"""The parameter pytree, derived from the model family's declaration (`lserve_jax.models`).

Linear weights are stored [in, out] so the forward pass is `x @ w`. Each layer is an `Arrays`
holding exactly the weights its family declares (q/k/v biases for Qwen2, q/k norms for Qwen3);
init, abstract shapes, the converters' shape checks and the shardings all come from the same
declaration. Layers are a tuple (not a stacked array): after the head permutation each layer
is still the same shape, but keeping them separate lets each layer's attention use its own
static retrieval-head count.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from . import models
from .arrays import Arrays
from .config import ModelConfig
from .decl import ArrayDecl, axis_sizes
from .fuse import is_fused
from .quant import QUANTIZED, Int8Linear

LayerParams = Arrays  # one layer's weights: attn_norm, wq, wk, wv, wo, mlp_norm, w_gate, ... as declared


@struct.dataclass
class Params:
    embed: jax.Array  # [vocab, hidden]
    layers: tuple[Arrays, ...]  # per layer, the family's declared weights
    final_norm: jax.Array  # [hidden]
    lm_head: jax.Array | None  # [hidden, vocab], None when tied to `embed`


def layer_decls(cfg: ModelConfig) -> dict[str, ArrayDecl]:
    """Every per-layer array of this config: name -> declaration."""
    sizes = axis_sizes(cfg)
    return {p.name: p.decl(sizes) for p in models.get(cfg.architecture).layer_decls(cfg)}


def top_decls(cfg: ModelConfig) -> dict[str, ArrayDecl | None]:
    """embed, final_norm, lm_head (None when tied)."""
    sizes = axis_sizes(cfg)
    return {p.name: p.decl(sizes) if p.present(cfg) else None for p in models.TOP_PARAMS}


def _build(cfg: ModelConfig, make: Callable[[str, ArrayDecl], Any]) -> Params:
    layer = layer_decls(cfg)
    layers = tuple(Arrays({n: make(f"layers.{i}.{n}", d) for n, d in layer.items()})
                   for i in range(cfg.num_layers))
    top = {n: None if d is None else make(n, d) for n, d in top_decls(cfg).items()}
    return Params(layers=layers, **top)


def abstract_params(cfg: ModelConfig, dtype=jnp.bfloat16) -> Params:
    """ShapeDtypeStructs of every parameter (for checkpoint restore and shape checks)."""
    return _build(cfg, lambda name, d: jax.ShapeDtypeStruct(d.shape, dtype))


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.bfloat16, scale: float = 0.02) -> Params:
    """Random parameters (benchmarks and tests): normal(0, scale) weights, unit norms, zero biases."""
    counter = iter(range(1 << 30))

    def make(name, d: ArrayDecl):
        if d.init == "ones":
            return jnp.ones(d.shape, dtype)
        if d.init == "zeros":
            return jnp.zeros(d.shape, dtype)
        k = jax.random.fold_in(key, next(counter))
        return (scale * jax.random.normal(k, d.shape, jnp.float32)).astype(dtype)

    return _build(cfg, make)


def flat_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """{"layers.3.wq": (hidden, q_dim), "embed": ..., ...} for every present array."""
    out = {}
    _build(cfg, lambda name, d: out.setdefault(name, d.shape))
    return out


def flat_axes(cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
    """Logical axes of every present array, by flat name."""
    out = {}
    _build(cfg, lambda name, d: out.setdefault(name, d.axes))
    return out


def from_flat(cfg: ModelConfig, arrays: dict[str, np.ndarray | jax.Array]) -> Params:
    """Assembles Params from a {flat name: array} dict (the converter's output)."""
    return _build(cfg, lambda name, d: arrays[name])


def cast(params: Params, dtype) -> Params:
    return jax.tree.map(lambda x: x.astype(dtype), params)


def stack_layers(params: Params) -> Params:
    """`params` with its layers stacked into one Arrays of [layers, ...] arrays (for a lax.scan
    over layers: one traced layer compiles in seconds rather than minutes)."""
    if isinstance(params.layers, Arrays):
        return params
    return params.replace(layers=jax.tree.map(lambda *xs: jnp.stack(xs), *params.layers))


# per-layer arrays the engine derives from the weights (not in a checkpoint): their axes
DERIVED_AXES = {"k_center": ("kv_heads", "head_dim")}  # `kv8.key_centers`


def permute_kv_heads(params: Params, cfg: ModelConfig, perms: np.ndarray) -> Params:
    """Reorders each layer's KV heads (with their GQA query groups) by `perms[l]`.

    Every array with a head axis moves: the "q_heads" axis in groups of G query heads, the
    "kv_heads" axis one KV head at a time (q/k/v columns and biases, o rows), so the model
    computes exactly the same function: attention is a sum over heads, and each head's q, k, v
    and o slices travel as one. Per-head-dim arrays (q/k norms) are shared by all heads.
    """
    if is_fused(params):
        raise ValueError("permute the KV heads before fusing the projections (lserve_jax.fuse)")
    n_kv = cfg.num_kv_heads
    decls = layer_decls(cfg)

    def move(w, axes, perm):
        if isinstance(w, QUANTIZED):  # stored [out, in] with per-output scales: both move
            moved = dict(w=move(w.w.T, axes, perm).T, scale=move(w.scale, axes[1:], perm))
            if isinstance(w, Int8Linear):  # and the per-input smoothing with the input axis
                moved["inv_smooth"] = move(w.inv_smooth, axes[:1], perm)
            return w.replace(**moved)
        for ax, name in enumerate(axes):
            if name in ("q_heads", "kv_heads"):
                shape = w.shape
                w = w.reshape(*shape[:ax], n_kv, shape[ax] // n_kv, *shape[ax + 1:])
                w = jnp.take(w, perm, axis=ax).reshape(shape)
        return w

    layers = []
    for layer, perm in zip(params.layers, np.asarray(perms)):
        perm = jnp.asarray(perm, jnp.int32)
        layers.append(Arrays({n: move(w, decls[n].axes if n in decls else DERIVED_AXES[n], perm)
                              for n, w in layer.items()}))
    return params.replace(layers=tuple(layers))
