"""Head patterns: which KV heads of each layer are retrieval heads, and the load-time permutation.

A DuoAttention pattern is a [layers, kv_heads] matrix of gate values alpha. With
`static_sparsity = s`, the s-quantile of alpha over the whole matrix is the threshold and heads
with alpha >= threshold are retrieval heads (so each layer keeps a different number of them).
The model permutes every layer's KV heads so that its retrieval heads come first; then "the
retrieval heads of layer l" is the slice [:R_l] everywhere (weights, cache, kernels).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np


class PatternError(ValueError):
    """A head pattern file that cannot be used with this model."""


@dataclasses.dataclass(frozen=True)
class HeadLayout:
    """Static per-layer head split, hashable so it can be a jit static argument.

    `num_retrieval[l]` KV heads of layer l are retrieval heads (the first ones after permutation);
    the remaining `num_kv_heads - num_retrieval[l]` are streaming heads.
    """

    num_kv_heads: int
    num_retrieval: tuple[int, ...]
    tp: int = 1  # devices whose head slices are each ordered retrieval-first (sharding.tp_permutation)

    @classmethod
    def dense(cls, num_layers: int, num_kv_heads: int) -> "HeadLayout":
        return cls(num_kv_heads, (num_kv_heads,) * num_layers)

    def num_streaming(self, layer: int) -> int:
        return self.num_kv_heads - self.num_retrieval[layer]

    @property
    def is_dense(self) -> bool:
        return all(r == self.num_kv_heads for r in self.num_retrieval)


def load_pattern(path: str | os.PathLike) -> np.ndarray:
    """Reads a [layers, kv_heads] gate matrix from a DuoAttention TSV or a .npy file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "full_attention_heads.tsv")
    if not os.path.exists(path):
        raise PatternError(f"head pattern file not found: {path}")
    try:
        alpha = np.load(path) if path.endswith(".npy") else np.loadtxt(path, dtype=np.float64, ndmin=2)
    except ValueError as e:
        raise PatternError(f"cannot parse head pattern {path}: {e}") from None
    alpha = np.asarray(alpha, dtype=np.float64)
    if alpha.ndim != 2 or alpha.size == 0 or not np.all(np.isfinite(alpha)):
        raise PatternError(f"head pattern {path} must be a finite 2-D [layers, kv_heads] matrix, got {alpha.shape=}")
    return alpha


def save_pattern(path: str | os.PathLike, alpha: np.ndarray) -> None:
    """Writes a gate matrix in DuoAttention's TSV format (tab-separated, one layer a row)."""
    np.savetxt(os.fspath(path), np.asarray(alpha, dtype=np.float64), delimiter="\t", fmt="%.18e")


def binarize(alpha: np.ndarray, static_sparsity: float) -> np.ndarray:
    """Boolean [layers, kv_heads] mask of retrieval heads, by the global-quantile rule."""
    if not 0.0 <= static_sparsity <= 1.0:
        raise PatternError(f"static_sparsity must be in [0, 1], got {static_sparsity}")
    if static_sparsity == 0.0:
        return np.ones(alpha.shape, dtype=bool)
    if static_sparsity == 1.0:
        return np.zeros(alpha.shape, dtype=bool)
    threshold = np.quantile(alpha, static_sparsity)
    return alpha >= threshold


def check_shape(alpha: np.ndarray, num_layers: int, num_kv_heads: int) -> None:
    if alpha.shape != (num_layers, num_kv_heads):
        raise PatternError(
            f"head pattern has shape {alpha.shape}, the model has {num_layers} layers x "
            f"{num_kv_heads} KV heads"
        )


def layout_and_permutation(retrieval: np.ndarray) -> tuple[HeadLayout, np.ndarray]:
    """From a boolean retrieval mask, the HeadLayout and per-layer KV-head permutations.

    `perm[l]` lists old KV-head indices in their new order: retrieval heads first (in their
    original order), then streaming heads. Stable, so a dense mask gives the identity.
    """
    retrieval = np.asarray(retrieval, dtype=bool)
    perms = np.stack([np.argsort(~row, kind="stable") for row in retrieval]).astype(np.int32)
    layout = HeadLayout(retrieval.shape[1], tuple(int(r) for r in retrieval.sum(axis=1)))
    return layout, perms
