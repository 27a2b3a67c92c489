"""Next-token negative log-likelihood, and the all-position forward through the library's
`prefill_attention` (`forward_hidden`, `token_nll`): the reference that tests hold the gated
forward (`calibrate.gated`) and the engine's sparse paths to. The scores (`evals.perplexity`,
`evals.passkey_proxy`) go through the gated forward, which is faster and compiles once for
every pattern.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..ops import OpChoice, prefill_attention
from ..config import ModelConfig
from ..heads import HeadLayout
from ..models.layer import decoder_layer, final_norm, lm_logits
from ..params import Params


def next_token_nll(params: Params, hidden: jax.Array, tokens: jax.Array, chunk: int | None = None) -> jax.Array:
    """[B, T, hidden] normed hidden states of `tokens` [B, T] -> float32 [B, T - 1]: the negative
    log-likelihood of each next token, `logsumexp(logits) - logit[next]`.

    On CPU the [positions, vocab] logits go through in chunks of `chunk` positions (default 64:
    small chunks stay in cache and run about 25% faster at 4K tokens); elsewhere in one piece
    unless `chunk` is given."""
    b, t, d = hidden.shape
    chunk = chunk or (64 if jax.default_backend() == "cpu" else b * (t - 1))
    n = b * (t - 1)
    pad = (-n) % chunk
    h = jnp.pad(hidden[:, :-1].reshape(n, d), ((0, pad), (0, 0))).reshape(-1, chunk, d)
    nxt = jnp.pad(tokens[:, 1:].reshape(n), (0, pad)).reshape(-1, chunk)

    def one(args):
        x, y = args
        logits = lm_logits(params, x)
        return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]

    return jax.lax.map(one, (h, nxt)).reshape(-1)[:n].reshape(b, t - 1)


def forward_hidden(params: Params, tokens: jax.Array, cfg: ModelConfig, layout: HeadLayout | None = None, *,
                   sink: int = 0, local: int = 1, impl: str = "reference") -> jax.Array:
    """Final (normed) hidden states [B, T, hidden] at every position of `tokens` [B, T] through
    the library's `prefill_attention` (each layer its own static retrieval-head count; `impl` an
    implementation name of `lserve_jax.ops`, "auto" for the platform's order).

    `params` must already be permuted retrieval-first for `layout` (None: dense)."""
    b, t = tokens.shape
    layout = layout or HeadLayout.dense(cfg.num_layers, cfg.num_kv_heads)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    lengths = jnp.full((b,), t, jnp.int32)
    x = params.embed[tokens]
    for lp, r in zip(params.layers, layout.num_retrieval):
        def attend(q, k, v, r=r):
            return prefill_attention(q, k, v, lengths, num_retrieval=r, sink=sink, local=local,
                                     choice=OpChoice.from_name("prefill", impl)), None

        x, _ = decoder_layer(lp, x, positions, cfg, attend)
    return final_norm(params, x, cfg)


def token_nll(params: Params, tokens: jax.Array, cfg: ModelConfig, layout: HeadLayout | None = None, *,
              sink: int = 0, local: int = 1, impl: str = "reference") -> jax.Array:
    """Negative log-likelihood of tokens[:, 1:] given their prefixes: float32 [B, T - 1]
    (`forward_hidden`'s model: permuted `params` for `layout`, None: dense)."""
    return next_token_nll(params, forward_hidden(params, tokens, cfg, layout, sink=sink, local=local, impl=impl),
                          tokens)
