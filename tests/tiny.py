"""Shared tiny models for the CPU suite: one config preset with per-test overrides, random
params (cached per config), and a word-level tokenizer over the tiny vocabulary."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lserve_jax.config import ModelConfig, SparseConfig
from lserve_jax.params import init_params

# eos_token_ids=(): a random model may emit any id; with no EOS every run goes to its length limit
_BASE = dict(architecture="llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
             num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=128, eos_token_ids=())

# 16-token pages in 4-token logical pages: several pages per short prompt
TINY_SPARSE = SparseConfig(page_size=16, logical_page_size=4, token_budget=128)


def tiny_config(**overrides) -> ModelConfig:
    """The tiny Llama (2 layers, 4 query / 2 KV heads of 16, vocab 128) with `overrides`."""
    return ModelConfig(**{**_BASE, **overrides})


TINY = tiny_config()


@functools.lru_cache(maxsize=16)
def tiny_params(cfg: ModelConfig = TINY, seed: int = 0, scale: float = 0.5, dtype=jnp.float32):
    """Random float32 params; scale 0.5 gives peaky logits, so greedy choices are far from ties."""
    return init_params(cfg, jax.random.key(seed), dtype, scale=scale)


def word_tokenizer_json(path, vocab_size: int = TINY.vocab_size) -> None:
    """A WordLevel tokenizer over the tiny vocab: id i <-> "w{i:03d}" (fixed width, so no token's
    text is a substring of another's, which keeps stop-string expectations simple)."""
    from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, **{f"w{i:03d}": i for i in range(1, vocab_size)}}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))
