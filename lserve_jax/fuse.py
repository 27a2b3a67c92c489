"""Fused projections: each layer's q/k/v as one [hidden, (Hq + 2 Hkv) D] weight and gate/up as one
[hidden, 2 I] weight. The same function in 3 fewer products a layer (and, with 8-bit weights,
3 fewer activation quantisations): the decode step is bound by launching kernels.

    params = fuse_projections(params, cfg)  # after permute_kv_heads, before quantize_model; tp == 1

Columns are [q | k | v] and [gate | up] (biases likewise); `models.layer.projections` runs one
product and splits its columns, or the separate products of a layer left unfused. 8-bit weights
fuse when they are one product: FP8Linear of one activation mode (values and per-output scales
concatenated), Int8Linear only with one SmoothQuant smoothing (a checkpoint's separately smoothed
INT8 weights stay separate). Tensor parallelism shards q/k/v heads separately: it runs unfused.
Checkpoints and calibration keep the separate weights (the declared ones).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .arrays import Arrays
from .quant import QUANTIZED, FP8Linear, Int8Linear

# fused weight -> the weights it replaces, in column order
FUSED = {"wqkv": ("wq", "wk", "wv"), "w_gate_up": ("w_gate", "w_up")}
BIASES = {"wq": "bq", "wk": "bk", "wv": "bv", "wqkv": "bqkv"}  # weight -> its bias, when declared


def is_fused(params) -> bool:
    """Whether any layer holds a fused weight."""
    layers = [params.layers] if isinstance(params.layers, Arrays) else params.layers  # stacked or not
    return any(f in lp for lp in layers for f in FUSED)


def _fusable(ws) -> bool:
    """Whether these weights are one product: float of one dtype, FP8Linear of one activation mode,
    or Int8Linear with one smoothing."""
    first = ws[0]
    if any(type(w) is not type(first) for w in ws):
        return False
    if isinstance(first, FP8Linear):
        return all(w.quantize_activations == first.quantize_activations for w in ws)
    if isinstance(first, Int8Linear):
        smooth = np.asarray(first.inv_smooth)
        return all(np.array_equal(np.asarray(w.inv_smooth), smooth) for w in ws[1:])
    return all(w.dtype == first.dtype for w in ws)


def _concat(ws):
    """The weights [in, out_i] side by side, [in, sum out_i]."""
    first = ws[0]
    if isinstance(first, QUANTIZED):  # values [out, in] and per-output scales stack; the smoothing is shared
        return first.replace(w=jnp.concatenate([w.w for w in ws]), scale=jnp.concatenate([w.scale for w in ws]))
    return jnp.concatenate(ws, axis=1)


def fuse_layer(lp: Arrays) -> Arrays:
    """One layer with each group of FUSED whose weights it holds and can fuse replaced by the fused
    weight (and bias); a group already fused, or that cannot be, is left as it is."""
    items = dict(lp.items())
    for fused, parts in FUSED.items():
        biases = [BIASES[p] for p in parts if BIASES.get(p) in items]
        if (not all(p in items for p in parts) or not _fusable([items[p] for p in parts])
                or len(biases) not in (0, len(parts))):  # some parts biased: kept separate
            continue
        items[fused] = _concat([items.pop(p) for p in parts])
        if biases:
            items[BIASES[fused]] = jnp.concatenate([items.pop(b) for b in biases])
    return Arrays(items)


def fuse_projections(params, cfg, *, consume: bool = False):
    """`params` with every layer's q/k/v and gate/up fused where they can be (`fuse_layer`);
    fused params come back unchanged. Layer by layer: with `consume`, each layer's replaced arrays
    are freed once its fused ones exist (the caller gives `params` up), so memory grows by one
    layer's projections at most."""
    if isinstance(params.layers, Arrays):
        raise ValueError("fuse_projections takes per-layer params, not stacked ones")
    q_cols = cfg.num_heads * cfg.head_dim
    layers = []
    for i, lp in enumerate(params.layers):
        if "wq" in lp and lp.wq.shape[1] != q_cols:
            raise ValueError(f"layer {i}: wq has {lp.wq.shape[1]} columns, the config {q_cols}")
        new = fuse_layer(lp)
        if consume:
            jax.block_until_ready(new)
            kept = {id(x) for x in jax.tree.leaves(new)}
            for x in jax.tree.leaves(lp):
                if isinstance(x, jax.Array) and id(x) not in kept:
                    x.delete()
        layers.append(new)
    return params.replace(layers=tuple(layers))
