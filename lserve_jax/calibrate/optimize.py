"""The gate optimisation (DuoAttention's gradient method) and the attention-mass baseline:
calibration samples, the jitted Adam step, and `calibrate`, which ends with the boundary
refinement (`refine.refine_boundary`)."""

from __future__ import annotations

import functools
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..config import ModelConfig
from ..evals.corpus import haystack_ids
from ..evals.passkey import Encode, multi_passkey_sample
from ..models.layer import decoder_layer
from ..params import Params, stack_layers
from .config import CalibConfig, CalibResult
from .gated import gated_hidden, two_attentions
from .refine import refine_boundary


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
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        w = span / jnp.maximum(jnp.sum(span), 1.0)  # [T] query weights

        def attend(q, k, v):  # dense attention out, the layer's per-head score as aux
            o, _, inside = two_attentions(q, k, v, cc.sink, cc.local)
            return o, jnp.einsum("bhgq,q->h", 1.0 - inside, w) / (b * cfg.group_size)

        x = params.embed[tokens]
        scores = []
        for lp in params.layers:
            x, score = decoder_layer(lp, x, positions, cfg, attend)
            scores.append(score)
        return jnp.stack(scores)

    return jax.jit(mass)


def calibrate(params: Params, cfg: ModelConfig, encode: Encode, cc: CalibConfig = CalibConfig(), *,
              haystack: Sequence[int] | None = None,
              log: Callable[[str], None] | None = print) -> CalibResult:
    """Runs a calibration; returns the gate matrix, the per-step curve and the wall time.

    haystack: natural-text token ids for `cc.haystack` "text" or "mixed" and for the boundary
    refinement (default: the calibration half of the shipped corpus, `evals.haystack_ids(encode)`).
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
