"""Model logits equal Hugging Face transformers on the same (converted) weights."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lserve_jax import cache as kvc
from lserve_jax.checkpoint import open_checkpoint
from lserve_jax.config import SparseConfig
from lserve_jax.convert.cli import convert
from lserve_jax.heads import HeadLayout
from lserve_jax.ops import Kernels
from lserve_jax.model import ModelSpec, decode_step, prefill

from .hf_models import VARIANTS, hf_logits, make_hf_model

SPARSE = SparseConfig(page_size=16, logical_page_size=4, token_budget=512)
PROMPT_LENS = (5, 23, 1)
DECODE_STEPS = 16
TOL = 1e-4


def run_cached(params, cfg, prompts, continuations, sparse=SPARSE, layout=None):
    """Prefill a batch, then teacher-force `continuations` through decode_step.

    Returns (prefill last-token logits [B, V], decode logits [steps, B, V], decode jit).
    """
    layout = layout or HeadLayout.dense(cfg.num_layers, cfg.num_kv_heads)
    spec = ModelSpec(cfg, layout, sparse, Kernels.from_names(prefill="reference", decode="reference"))
    b = len(prompts)
    max_pages = 8
    cache = kvc.init_cache(cfg, layout, sparse, batch=b, num_pages=b * max_pages + 1,
                           max_pages_per_seq=max_pages, dtype=jnp.float32)
    table = np.arange(1, b * max_pages + 1, dtype=np.int32).reshape(b, max_pages)
    cache = cache.replace(page_table=jnp.asarray(table))
    t = 32
    tokens = np.zeros((b, t), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
    pf = jax.jit(functools.partial(prefill, spec=spec), donate_argnames=("cache",))
    dec = jax.jit(functools.partial(decode_step, spec=spec), donate_argnames=("cache",))
    first, cache = pf(params, cache, jnp.asarray(tokens), lengths)
    steps = []
    for s in range(continuations.shape[1]):
        logits, cache = dec(params, cache, jnp.asarray(continuations[:, s]))
        steps.append(np.asarray(logits))
    return np.asarray(first), np.stack(steps) if steps else None, dec


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(0)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(variant, tmp_path, rng):
    model = make_hf_model(variant, tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "ckpt", dtype="float32", progress=False)
    ckpt = open_checkpoint(tmp_path / "ckpt")
    cfg = ckpt.config
    params = ckpt.load_params()
    prompts = [list(rng.integers(0, cfg.vocab_size, n)) for n in PROMPT_LENS]
    cont = rng.integers(0, cfg.vocab_size, (len(prompts), DECODE_STEPS)).astype(np.int32)
    first, steps, dec = run_cached(params, cfg, prompts, cont)
    for i, p in enumerate(prompts):
        full = hf_logits(model, p + list(cont[i]))
        np.testing.assert_allclose(first[i], full[len(p) - 1], atol=TOL, rtol=0)
        np.testing.assert_allclose(steps[:, i], full[len(p):], atol=TOL, rtol=0)
    assert dec._cache_size() == 1, "decode steps recompiled"


def test_bin_checkpoint_matches(tmp_path, rng):
    model = make_hf_model("llama3", tmp_path / "hf", safe_serialization=False)
    assert list((tmp_path / "hf").glob("*.bin")) and not list((tmp_path / "hf").glob("*.safetensors"))
    convert(tmp_path / "hf", tmp_path / "ckpt", dtype="float32", progress=False)
    ckpt = open_checkpoint(tmp_path / "ckpt")
    prompt = list(rng.integers(0, ckpt.config.vocab_size, 9))
    first, _, _ = run_cached(ckpt.load_params(), ckpt.config, [prompt], np.zeros((1, 0), np.int32))
    np.testing.assert_allclose(first[0], hf_logits(model, prompt)[-1], atol=TOL, rtol=0)


def test_sparse_off_equals_dense_with_pattern(tmp_path, rng):
    """A head permutation with every head retrieval and budget >= context is exactly dense."""
    from lserve_jax.params import permute_kv_heads

    model = make_hf_model("mistral", tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "ckpt", dtype="float32", progress=False)
    ckpt = open_checkpoint(tmp_path / "ckpt")
    cfg = ckpt.config
    params = ckpt.load_params()
    # a permutation that reorders heads but keeps all of them retrieval heads
    perms = np.stack([np.roll(np.arange(cfg.num_kv_heads), 1 + l) for l in range(cfg.num_layers)])
    permuted = permute_kv_heads(params, cfg, perms)
    prompt = list(rng.integers(0, cfg.vocab_size, 13))
    cont = rng.integers(0, cfg.vocab_size, (1, 4)).astype(np.int32)
    a, sa, _ = run_cached(params, cfg, [prompt], cont)
    b, sb, _ = run_cached(permuted, cfg, [prompt], cont)
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    np.testing.assert_allclose(sa, sb, atol=1e-5, rtol=0)
    full = hf_logits(model, prompt + list(cont[0]))
    np.testing.assert_allclose(sb[:, 0], full[len(prompt):], atol=TOL, rtol=0)


@pytest.mark.parametrize("mode,variant", [("query_head", "mistral"), ("kv_head", "mistral"), ("query_head", "qwen3")])
def test_sparse_paths_equal_dense_when_nothing_is_dropped(mode, variant, tmp_path, rng):
    """Streaming heads whose window covers the whole context, and a page budget that covers it,
    read exactly what dense attention reads: the logits must equal transformers'."""
    from lserve_jax.heads import layout_and_permutation
    from lserve_jax.params import permute_kv_heads

    model = make_hf_model(variant, tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "ckpt", dtype="float32", progress=False)
    ckpt = open_checkpoint(tmp_path / "ckpt")
    cfg = ckpt.config
    retrieval = np.array([[True, False], [False, True]])  # one streaming head per layer
    layout, perms = layout_and_permutation(retrieval)
    params = permute_kv_heads(ckpt.load_params(), cfg, perms)
    sparse = SparseConfig(page_size=16, logical_page_size=4, token_budget=512, selection_mode=mode,
                          prefill_sink=4, prefill_local=128, decode_sink=4, decode_local=124)
    prompts = [list(rng.integers(0, cfg.vocab_size, n)) for n in PROMPT_LENS]
    cont = rng.integers(0, cfg.vocab_size, (len(prompts), DECODE_STEPS)).astype(np.int32)
    first, steps, _ = run_cached(params, cfg, prompts, cont, sparse=sparse, layout=layout)
    for i, p in enumerate(prompts):
        full = hf_logits(model, p + list(cont[i]))
        np.testing.assert_allclose(first[i], full[len(p) - 1], atol=TOL, rtol=0)
        np.testing.assert_allclose(steps[:, i], full[len(p):], atol=TOL, rtol=0)


def test_ring_drops_the_middle(tmp_path, rng):
    """With a small decode window, streaming heads see sink + the last `local` tokens only:
    check against a dense reference that applies the same Λ mask (reference attention)."""
    from lserve_jax.heads import layout_and_permutation
    from lserve_jax.params import permute_kv_heads

    make_hf_model("llama3", tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "ckpt", dtype="float32", progress=False)
    ckpt = open_checkpoint(tmp_path / "ckpt")
    cfg = ckpt.config
    layout, perms = layout_and_permutation(np.array([[False, False], [False, False]]))
    params = permute_kv_heads(ckpt.load_params(), cfg, perms)
    sink, local = 3, 5
    sparse = SparseConfig(page_size=16, logical_page_size=4, token_budget=512, prefill_sink=sink,
                          prefill_local=local, decode_sink=sink, decode_local=local)
    prompt = list(rng.integers(0, cfg.vocab_size, 11))
    cont = rng.integers(0, cfg.vocab_size, (1, 6)).astype(np.int32)
    _, steps, _ = run_cached(params, cfg, [prompt], cont, sparse=sparse, layout=layout)
    # the same model run as a full forward whose every head applies the Λ mask
    full_tokens = jnp.asarray([prompt + list(cont[0])])
    from lserve_jax.evals import forward_hidden, lm_logits

    streaming = HeadLayout(cfg.num_kv_heads, (0,) * cfg.num_layers)
    ref = np.asarray(lm_logits(params, forward_hidden(params, full_tokens, cfg, streaming, sink=sink, local=local)))
    np.testing.assert_allclose(steps[:, 0], ref[0, len(prompt):], atol=TOL, rtol=0)
