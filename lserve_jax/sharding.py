"""Tensor parallelism over the GPUs of a host: KV heads (with their query groups) split over a
1-D mesh axis "tp".

Attention is independent per head, so each device runs the unchanged kernels, cache writes and
page selection on its own KV heads inside `shard_map`; the projections are column-parallel (q,
k, v, gate, up) and row-parallel (o, down), and XLA inserts the all-reduces after them. The page
table, lengths and the decode clock are replicated: every device sees the same pages, it only
holds different heads' pools.

Balance: with retrieval heads first in every device's slice, each device must hold the same
number of retrieval heads in a layer (shapes are static). `balance_retrieval` rounds each
layer's retrieval count up to a multiple of tp by promoting the streaming heads with the
highest gate values (more accurate, slightly more work), and `tp_permutation` lays the heads
out so that device d's slice [d*h, (d+1)*h) holds its retrieval heads first.

KV heads must divide evenly over the devices (no replication of KV heads): otherwise a clear
error. Multi-host: create the mesh after `jax.distributed.initialize()`; `jax.devices()` then
lists every host's GPUs and the same code runs (not tested beyond one machine).
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .arrays import Arrays
from .cache import LAYER_FIELDS, SHARED_FIELDS, KVCache
from .config import ModelConfig
from .heads import HeadLayout
from .params import Params, flat_axes, from_flat

AXIS = "tp"


class ShardingError(ValueError):
    pass


@functools.lru_cache(maxsize=None)
def get_mesh(tp: int) -> Mesh:
    devices = jax.devices()
    if tp > len(devices):
        raise ShardingError(f"--tp {tp} needs {tp} devices, {len(devices)} are visible ({devices[0].platform})")
    return Mesh(np.array(devices[:tp]), (AXIS,))


def check_tp(cfg: ModelConfig, layout: HeadLayout, tp: int) -> None:
    if tp < 1:
        raise ShardingError(f"tp must be >= 1, got {tp}")
    if cfg.num_kv_heads % tp:
        raise ShardingError(
            f"num_kv_heads={cfg.num_kv_heads} does not divide over tp={tp} devices; use a tp that divides it "
            f"(KV heads are not replicated)")
    bad = [i for i, r in enumerate(layout.num_retrieval) if r % tp]
    if bad:
        raise ShardingError(f"layers {bad} have retrieval-head counts not divisible by tp={tp}; "
                            f"build the layout with sharding.balance_retrieval")


def balance_retrieval(retrieval: np.ndarray, tp: int, alpha: np.ndarray | None = None) -> np.ndarray:
    """Promotes streaming heads (highest alpha first) until each layer's count divides by tp."""
    retrieval = np.array(retrieval, dtype=bool)
    score = np.zeros(retrieval.shape) if alpha is None else np.asarray(alpha, np.float64)
    for row, sc in zip(retrieval, score):
        extra = (-int(row.sum())) % tp
        for h in [h for h in np.argsort(-sc, kind="stable") if not row[h]][:extra]:
            row[h] = True
    return retrieval


def tp_permutation(retrieval: np.ndarray, tp: int) -> tuple[HeadLayout, np.ndarray]:
    """Per-layer KV-head orders in which device d's slice holds its retrieval heads first.

    Retrieval and streaming heads are dealt in contiguous runs so every device gets count/tp of
    each (a dense layout gives the identity); returns the global layout and perms[l]."""
    retrieval = np.asarray(retrieval, dtype=bool)
    layers, hkv = retrieval.shape
    perms = []
    for row in retrieval:
        if row.sum() % tp:
            raise ShardingError(f"retrieval count {row.sum()} not divisible by tp={tp}; balance it first")
        ret, stream = np.flatnonzero(row), np.flatnonzero(~row)
        perm = []
        nr, ns = len(ret) // tp, len(stream) // tp
        for d in range(tp):
            perm += list(ret[d * nr:(d + 1) * nr]) + list(stream[d * ns:(d + 1) * ns])
        perms.append(perm)
    layout = HeadLayout(hkv, tuple(int(r) for r in retrieval.sum(axis=1)), tp)
    return layout, np.asarray(perms, np.int32)


# Logical axes (lserve_jax.decl, cache.LAYER_FIELDS) split over the "tp" mesh axis; every other
# axis is replicated. Parameters: q/k/v/gate/up columns and o/down rows (their head and ffn
# axes); caches: the head axes of pools, rings and selections.
RULES = {"q_heads": AXIS, "kv_heads": AXIS, "ffn": AXIS, "retrieval": AXIS, "streaming": AXIS, "sel_heads": AXIS}


def spec_of(axes) -> P:
    """PartitionSpec of an array with these logical axes."""
    return P(*(RULES.get(a) for a in axes))


_LAYER_SPECS = Arrays({n: spec_of(axes) for n, (axes, _) in LAYER_FIELDS.items()})
_HEADS4 = P(None, None, AXIS, None)  # [B, T, heads, D]
_HEADS3 = P(None, AXIS, None)  # [B, heads, D]
# (in_specs, out_specs) of model._chunk_attention / model._decode_attention
PREFILL_SPECS = ((_HEADS4, _HEADS4, _HEADS4, _LAYER_SPECS, P(), P(), P(), P()), (_HEADS4, _LAYER_SPECS))
DECODE_SPECS = ((_HEADS3, _HEADS3, _HEADS3, _LAYER_SPECS, P(), P(), P()), (_HEADS3, _LAYER_SPECS))


def tensor_parallel(fn, tp: int, specs):
    """fn itself when tp == 1, else fn run per device over its heads (shard_map)."""
    if tp == 1:
        return fn
    in_specs, out_specs = specs
    return jax.shard_map(fn, mesh=get_mesh(tp), in_specs=in_specs, out_specs=out_specs, check_vma=False)


def param_specs(cfg: ModelConfig) -> Params:
    """PartitionSpecs of every parameter, from its declared logical axes."""
    return from_flat(cfg, {name: spec_of(axes) for name, axes in flat_axes(cfg).items()})


def _put(tree, specs, tp):
    mesh = get_mesh(tp)
    return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, specs)


def shard_params(params: Params, cfg: ModelConfig, tp: int) -> Params:
    return params if tp == 1 else _put(params, param_specs(cfg), tp)


def replicate(x, tp: int):
    """x committed to the devices the model runs on: the first device, or replicated over tp."""
    if tp == 1:
        return jax.device_put(x, jax.devices()[0])
    return jax.device_put(x, NamedSharding(get_mesh(tp), P()))


def shard_cache(cache: KVCache, tp: int) -> KVCache:
    if tp == 1:
        return jax.device_put(cache, jax.devices()[0])
    shared = {n: spec_of(axes) for n, (axes, _) in SHARED_FIELDS.items()}
    specs = cache.replace(layers=tuple(_LAYER_SPECS for _ in cache.layers), **shared)
    return _put(cache, specs, tp)
