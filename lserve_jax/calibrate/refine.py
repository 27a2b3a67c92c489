"""The boundary refinement: the gates near the cut at the target sparsity are close and move
from seed to seed, so the heads on each side of it are re-ranked by the measured rise of
next-token NLL over held-out natural text when each one alone streams (`refine_boundary`).

Exact and cheaper than a forward per flip: the pattern's forward keeps every layer's input,
and each flipped head recomputes the layers from its own on (`flip_costs`).
"""

from __future__ import annotations

import functools
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..config import ModelConfig
from ..evals.corpus import haystack_ids
from ..evals.nll import next_token_nll
from ..evals.passkey import Encode
from ..heads import binarize
from ..models.layer import final_norm
from ..params import Params
from .config import CalibConfig
from .gated import gated_layer


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
    return jax.jit(lambda lp, x, gate: gated_layer(lp, x, gate, cfg, sink, local))


@functools.lru_cache(maxsize=8)
def _weighted_nll_fn(cfg: ModelConfig):
    """Jitted (params, last layer's output x [1, T, hidden], tokens [1, T], weights [T - 1]) ->
    the weighted mean next-token NLL."""
    def f(params, x, tokens, w):
        nll = next_token_nll(params, final_norm(params, x, cfg), tokens)[0]
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
