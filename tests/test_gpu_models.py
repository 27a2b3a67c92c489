"""End to end on the GPU: a tiny random model served by the engine with the default kernel order
(the Triton / cuDNN kernels) generates exactly the greedy tokens of the same engine on the jnp
references. Head dims 64, 128 and 96 (not a power of 2: the prefill kernel pads it, the decode
kernel reads it in power-of-2 pieces, append and page scores fall back to their references),
dense and sparse layouts, whole-prompt and chunked prefill (the offset form of the prefill
kernel), and a prefill sink of 0 (the issue where the prefill kernel gave NaN at D 96 / 128).

    pytest -m gpu tests/test_gpu_models.py      # on the GPU; skipped elsewhere
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from lserve_jax.config import SparseConfig
from lserve_jax.engine import Engine
from lserve_jax.heads import HeadLayout
from lserve_jax.params import permute_kv_heads
from lserve_jax.sampling import SamplingParams

from .kernel_base import GPU_MARKS
from .tiny import tiny_config, tiny_params

pytestmark = list(GPU_MARKS)  # every test here is a GPU case

# selection really selects (2 pages of 16 out of up to 13), streaming heads keep windows shorter
# than the prompts; the prefill window crosses chunk boundaries
SPARSE = SparseConfig(page_size=16, logical_page_size=4, token_budget=32, selector_interval=3,
                      prefill_sink=4, prefill_local=40, decode_sink=4, decode_local=28)
# prefill sink 0: rows past the first key block see no key in it (the NaN issue, prompt 190)
SPARSE_SINK0 = SparseConfig(page_size=16, logical_page_size=4, token_budget=32, selector_interval=3,
                            prefill_sink=0, prefill_local=24, decode_sink=4, decode_local=28)
DENSE = SparseConfig(page_size=16, logical_page_size=4)

PROMPT_LENGTHS = (5, 70, 190)
GREEDY = SamplingParams(max_new_tokens=10)

# (head_dim, layout, sparse config, prefill chunk): D 96 in every mode, 128 and 64 dense and sparse
CASES = [
    (96, "dense", DENSE, None), (96, "dense", DENSE, 32), (96, "sparse", SPARSE, None), (96, "sparse", SPARSE, 32),
    (96, "sparse", SPARSE_SINK0, 32),
    (128, "dense", DENSE, 32), (128, "sparse", SPARSE_SINK0, None),
    (64, "dense", DENSE, None), (64, "sparse", SPARSE, 32),
]
_NAMES = {id(DENSE): "dense", id(SPARSE): "sparse", id(SPARSE_SINK0): "sparse-sink0"}


def _case_id(c):
    d, _, sparse, chunk = c
    return f"D{d}-{_NAMES[id(sparse)]}-{'whole' if chunk is None else f'chunk{chunk}'}"


@functools.lru_cache(maxsize=None)
def _model(head_dim: int, layout: str):
    """(params, config, head layout): the tiny Llama at `head_dim`, dense or with one retrieval
    and one streaming KV head per layer (weights permuted retrieval-first)."""
    cfg = tiny_config(head_dim=head_dim, max_position_embeddings=256)
    params = tiny_params(cfg)
    if layout == "dense":
        return params, cfg, HeadLayout.dense(cfg.num_layers, cfg.num_kv_heads)
    return permute_kv_heads(params, cfg, np.array([[1, 0], [0, 1]])), cfg, HeadLayout(2, (1, 1))


def _prompts(cfg):
    rng = np.random.default_rng(7)
    return [[int(t) for t in rng.integers(1, cfg.vocab_size, n)] for n in PROMPT_LENGTHS]


def _generate(head_dim, layout, sparse, *, chunk, **impls):
    params, cfg, heads = _model(head_dim, layout)
    eng = Engine(params, cfg, layout=heads, sparse=sparse, max_slots=4, prefill_chunk=chunk, **impls)
    return [g.token_ids for g in eng.generate(_prompts(cfg), GREEDY)]


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_default_kernels_equal_references(case):
    head_dim, layout, sparse, chunk = case
    got = _generate(head_dim, layout, sparse, chunk=chunk)
    want = _generate(head_dim, layout, sparse, chunk=chunk, prefill_impl="reference", decode_impl="reference")
    assert all(len(t) == GREEDY.max_new_tokens for t in got)
    assert got == want


@pytest.mark.parametrize("kv", ["fp8_e4m3", "int8"])
@pytest.mark.parametrize("case", [(64, "sparse", SPARSE, 32), (128, "dense", DENSE, None)], ids=_case_id)
def test_fp8_kv_default_kernels_equal_references(case, kv):
    """8-bit KV pages (kv_dtype "fp8_e4m3" / "int8", keys centred): the fused Triton decode kernel
    reads 8-bit pages and rings with their per-token scales, and gives the greedy tokens of the jnp
    references on the same cache."""
    head_dim, layout, sparse, chunk = case
    got = _generate(head_dim, layout, sparse, chunk=chunk, kv_dtype=kv)
    want = _generate(head_dim, layout, sparse, chunk=chunk, kv_dtype=kv, prefill_impl="reference",
                     decode_impl="reference")
    assert all(len(t) == GREEDY.max_new_tokens for t in got)
    assert got == want
