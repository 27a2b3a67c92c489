"""The pass-key grid: context length x needle depth, one token-exact prompt per cell and trial
(`passkey.passkey_prompt`), the same prompts for every variant of a study.

Two ways to score it:

* `run_grid`: greedy decoding through an `Engine` (sparse prefill, streaming rings and page
  selection in decode); a cell passes if the key is in the output. The real test
  (`bench/accuracy.py`).
* `passkey_proxy`: teacher-forced through the gated forward (`calibrate.gated_hidden`, prefill
  semantics only); a cell passes if the greedy argmax at every answer position is the answer
  token. Cheap enough to rank candidate patterns (`bench/calib_sweep.py`), not a substitute.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..calibrate.gated import gated_hidden
from ..config import ModelConfig
from ..models.layer import lm_logits
from ..params import Params
from ..sampling import SamplingParams
from .passkey import Encode, PasskeyPrompt, passed, passkey_prompt, random_key

# Scaled to SmolLM2's 8K context, so that a 64 + 128 streaming window bites from 256 tokens on.
GRID_LENGTHS = (256, 512, 1024, 1536, 2048)
GRID_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)

Grid = list[list[list[PasskeyPrompt]]]  # [length][depth][trial]


def grid_prompts(encode: Encode, lengths: Sequence[int], depths: Sequence[float], trials: int, seed: int) -> Grid:
    """[len][depth][trial] PasskeyPrompts; the keys come from `seed`, so every variant of a
    study gets the same prompts."""
    rng = np.random.default_rng(seed)
    return [[[passkey_prompt(encode, n, d, random_key(rng)) for _ in range(trials)] for d in depths]
            for n in lengths]


def run_grid(engine, prompts: Grid, max_new_tokens: int = 8,
             log: Callable[[str], None] | None = None) -> tuple[list, list]:
    """Greedy generation for every cell (its trials batched) through `engine`. Returns (pass
    [len][depth] as the fraction of trials passed, outputs [len][depth][trial]: the texts, or
    the token ids for an engine without a tokenizer)."""
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    frac, outs = [], []
    for row in prompts:
        frow, orow = [], []
        for cell in row:
            gens = engine.generate([p.ids for p in cell], sampling)
            texts = [g.text if engine.tokenizer is not None else g.token_ids for g in gens]
            ok = [passed(p, t) if isinstance(t, str) else passed(p, output_ids=t) for p, t in zip(cell, texts)]
            frow.append(sum(ok) / len(ok))
            orow.append(texts)
        frac.append(frow)
        outs.append(orow)
        if log:
            log(f"  length {row[0][0].length}: {['%.2f' % f for f in frow]}")
    return frac, outs


@functools.lru_cache(maxsize=8)
def _proxy_fn(cfg: ModelConfig, sink: int, local: int):
    """Jitted (params, tokens [B, W], gates or None, pos [B, A]) -> the greedy argmax at `pos`
    (the positions whose next token is an answer token), int [B, A]."""
    @jax.jit
    def fn(params, tokens, gates, pos):
        h = gated_hidden(params, tokens, cfg, gates, sink=sink, local=local)
        h = jnp.take_along_axis(h, pos[..., None], axis=1)
        return jnp.argmax(lm_logits(params, h), axis=-1)
    return fn


def passkey_proxy(params: Params, cfg: ModelConfig, cells: Sequence[PasskeyPrompt], gates: jax.Array | None, *,
                  sink: int, local: int) -> list[bool]:
    """Per cell, whether the gated model's greedy argmax, teacher-forced on prompt + answer, is
    the key's tokens at every answer position. gates: [layers, kv_heads] (binary: the sparse
    prefill model with a `sink` + `local` window; None: dense). The cells run as one batch,
    right-padded to a common width (causal: padding changes nothing before it)."""
    width = max(len(c.ids) + len(c.answer_ids) for c in cells)
    a = max(len(c.answer_ids) for c in cells)
    toks = np.zeros((len(cells), width), np.int32)
    pos = np.zeros((len(cells), a), np.int32)
    for i, c in enumerate(cells):
        seq = c.ids + c.answer_ids
        toks[i, :len(seq)] = seq
        pos[i, :len(c.answer_ids)] = np.arange(len(c.answer_ids)) + len(c.ids) - 1
        pos[i, len(c.answer_ids):] = len(c.ids) - 1
    out = np.asarray(_proxy_fn(cfg, sink, local)(params, jnp.asarray(toks), gates, jnp.asarray(pos)))
    return [list(out[i, :len(c.key_ids)]) == c.key_ids for i, c in enumerate(cells)]
