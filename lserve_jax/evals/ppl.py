"""Perplexity of a head pattern over long text, and the random control pattern.

The all-position NLL is the gated forward's (`calibrate.gated_nll_fn`): with binary gates it is
the sparse prefill model exactly (checked against `prefill_attention` in tests), with one
compilation per window for every pattern scored.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

from ..calibrate.gated import gated_nll_fn
from ..config import ModelConfig
from ..params import Params


def perplexity(params: Params, cfg: ModelConfig, text_ids: Sequence[int], length: int, windows: int,
               gates: np.ndarray | None, sink: int, local: int, kv_dtype=None, attn8: bool = False) -> dict:
    """Perplexity over `windows` consecutive, non-overlapping full windows of `length` tokens:
    exp of the total NLL over every predicted token of every window (each window predicts its
    length - 1 tokens from its own prefix); also over the positions past the streaming window
    (`tail`, where streaming heads see less than dense), and per window (`window_ppl`).

    gates: [layers, kv_heads] in the original head order (binary: the sparse prefill model
    whose streaming heads see `sink` + `local`); None: dense. kv_dtype: K and V read back from
    8-bit pages (`calibrate.gated_layer`); attn8: the full heads' attention with FP8 operands."""
    if windows < 1 or len(text_ids) < windows * length:
        raise ValueError(f"the text has {len(text_ids)} tokens, {windows} x {length} requested")
    toks = jnp.asarray(np.asarray(text_ids[: windows * length], np.int32).reshape(windows, length))
    g = None if gates is None else jnp.asarray(gates, jnp.float32)
    fn = gated_nll_fn(cfg, sink, local, kv_dtype, attn8)
    nll = np.concatenate([np.asarray(fn(params, toks[i:i + 1], g), np.float64) for i in range(windows)])
    tail = nll[:, sink + local:]
    return {"ppl": float(np.exp(nll.mean())), "ppl_tail": float(np.exp(tail.mean())) if tail.size else None,
            "tokens": int(nll.size), "windows": windows,
            "window_ppl": [float(x) for x in np.exp(nll.mean(axis=1))]}


def random_pattern(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A random gate matrix (the control for a calibrated one at the same sparsity)."""
    return np.random.default_rng(seed).random(shape)
