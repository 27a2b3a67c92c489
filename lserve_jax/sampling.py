"""Token sampling: greedy, temperature, top-k and top-p, on device, with traced knobs
(changing a knob does not recompile)."""

from __future__ import annotations

import dataclasses
import math
import operator
import secrets

import jax
import jax.numpy as jnp
import numpy as np


SEED_RANGE = (-(2**63), 2**63)  # what jax.random.key takes (a C long)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick each new token. Every value is checked here, so a bad knob fails before any
    work with a message that names it."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int | None = 0  # None: a fresh random seed for each generate call
    stop: tuple[str, ...] = ()  # stop strings (checked on the decoded text); a single str is one stop string
    ignore_eos: bool = False  # keep generating past EOS tokens, up to max_new_tokens

    def __post_init__(self):
        n = _as_int(self.max_new_tokens)
        if n is None or n < 1:
            raise ValueError(f"max_new_tokens must be >= 1 (an integer), got {self.max_new_tokens!r}")
        if not _is_real(self.temperature) or not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        k = _as_int(self.top_k)
        if k is None or k < 0:
            raise ValueError(f"top_k must be >= 0 (an integer; 0 = off), got {self.top_k!r}")
        if not _is_real(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None:
            seed = _as_int(self.seed)
            if seed is None or not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
                raise ValueError(f"seed must be a 64-bit integer in [-2**63, 2**63) or None, got {self.seed!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        try:
            stop = tuple(stop)
        except TypeError:
            raise ValueError(f"stop must be a string or a sequence of strings, got {self.stop!r}") from None
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty, got {s!r} in stop={stop!r}")
        object.__setattr__(self, "stop", stop)  # frozen: a list or a bare str becomes a tuple
        if not isinstance(self.ignore_eos, (bool, np.bool_)):
            raise ValueError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")


def _as_int(x) -> int | None:
    """x as an int if it is a Python or NumPy integer (not a bool, not a float), else None."""
    if isinstance(x, (bool, np.bool_)):
        return None
    try:
        return operator.index(x)
    except TypeError:
        return None


def _is_real(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def random_seed() -> int:
    """A fresh seed for sampling without one. Below 2**31: with 32-bit JAX, jax.random.key keeps
    only the low 32 bits of a seed, and a printed seed must give the same run again."""
    return secrets.randbelow(2**31)


def sample(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: jax.Array,
           top_p: jax.Array) -> jax.Array:
    """logits float32 [B, V] -> token ids int32 [B]."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    v = logits.shape[-1]
    scaled = logits / jnp.maximum(temperature, 1e-6)
    order = jnp.argsort(-scaled, axis=-1)
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    rank = jnp.arange(v)
    keep = jnp.where(top_k > 0, rank < top_k, True)[None, :]
    probs = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
    # top-p: keep the smallest prefix whose mass reaches p (the first token always stays)
    before = jnp.cumsum(probs, axis=-1) - probs
    keep = keep & (before < top_p)
    choice = jax.random.categorical(key, jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
    sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)


def seed_key_data(seed: int) -> np.ndarray:
    """uint32 [2]: the key data of a request's seed (host side, once per request). jax takes 32
    bits of a seed without x64, so the high 32 bits are folded in: every 64-bit seed its own."""
    seed = int(seed) % (1 << 64)
    key = jax.random.key(seed & 0xFFFFFFFF)
    if seed >> 32:
        key = jax.random.fold_in(key, seed >> 32)
    return np.asarray(jax.random.key_data(key), np.uint32)


def sample_rows(logits: jax.Array, key_data: jax.Array, positions: jax.Array, temperature: jax.Array,
                top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Per-row sampling, each row with its own knobs and key: logits float32 [B, V], key_data
    uint32 [B, 2] (`seed_key_data` of each request's seed), positions int32 [B] (where the sampled
    token goes), knobs [B]. A row's key is its seed's key folded with the position, so a
    request's tokens depend on nothing but its seed: not on the batch it runs in, nor on being
    preempted and recomputed.

    When no row samples (temperature 0 everywhere: greedy) only the argmax runs: `sample`'s sort
    of the vocabulary, whose result greedy rows drop, cost 7 ms of a 60 ms CPU decode step
    (SmolLM2's 49152 tokens). A row's token is the same either way."""
    def one(lg, kd, pos, t, k, p):
        key = jax.random.fold_in(jax.random.wrap_key_data(kd), pos)
        return sample(lg[None], key, t, k, p)[0]

    def sampled():
        return jax.vmap(one)(logits, key_data, positions, temperature, top_k, top_p)

    def greedy():
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    return jax.lax.cond(jnp.any(temperature > 0), sampled, greedy)
