"""Unified block-sparse prefill attention: kernel (interpreted on CPU, compiled under the `gpu`
marker) vs reference vs brute force; the ops API's implementations and its validation."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lserve_jax.ops import OpChoice, Unsupported, prefill_attention
from lserve_jax.pallas import compat
from lserve_jax.pallas.prefill import (
    prefill_attention_pallas,
    prefill_attention_reference,
)

from .kernel_base import INTERPRET, RUNNERS, gpu_only, kernel_cases
from .kernel_base import rel_err as _rel


def _inputs(seed, b, t, hq, hkv, d, dtype, lengths=None):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(ks[0], (b, t, hq, d), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (b, t, hkv, d), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (b, t, hkv, d), jnp.float32).astype(dtype)
    if lengths is None:
        lengths = [t] * b
    return q, k, v, jnp.asarray(lengths, jnp.int32)


def _brute_force(q, k, v, lengths, num_retrieval, sink, local, scale=None):
    """Per (b, head, row) loops in float64 numpy: the contract written out literally."""
    q, k, v = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v))
    lengths = np.asarray(lengths)
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = np.zeros_like(q)
    for bi in range(b):
        for h in range(hq):
            kh = h // g
            for i in range(int(lengths[bi])):
                vis = [j for j in range(t)
                       if j <= i and j < lengths[bi]
                       and (kh < num_retrieval or j < sink or i - j < local)]
                s = np.array([q[bi, i, h] @ k[bi, j, kh] for j in vis]) * scale
                p = np.exp(s - s.max())
                out[bi, i, h] = (p[:, None] * v[bi, vis, kh]).sum(0) / p.sum()
    return out


# ------------------------------------------------------------------------------------------
# Reference vs brute force (tiny shapes).
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("b,t,hq,hkv,nr,sink,local,lengths", [
    (2, 9, 4, 2, 1, 2, 3, [9, 5]),      # mixed, GQA 2
    (1, 7, 2, 2, 0, 0, 2, [7]),         # all streaming, no sink
    (1, 8, 4, 1, 1, 3, 2, [6]),         # all retrieval, GQA 4, padded
    (2, 6, 3, 3, 2, 1, 1, [1, 6]),      # local = 1 (self only) + sink, length 1
    (1, 5, 2, 1, 0, 9, 1, [5]),         # sink >= T -> causal
])
def test_reference_matches_brute_force(b, t, hq, hkv, nr, sink, local, lengths):
    q, k, v, lens = _inputs(0, b, t, hq, hkv, 8, jnp.float32, lengths)
    ref = prefill_attention_reference(q, k, v, lens, num_retrieval=nr, sink=sink, local=local)
    bf = _brute_force(q, k, v, lens, nr, sink, local)
    np.testing.assert_allclose(np.asarray(ref), bf, rtol=1e-5, atol=1e-5)


def test_reference_scale_and_padding_rows_zero():
    q, k, v, lens = _inputs(1, 2, 6, 2, 1, 8, jnp.float32, [6, 3])
    ref = prefill_attention_reference(q, k, v, lens, num_retrieval=0, sink=1, local=2,
                                      scale=0.3)
    bf = _brute_force(q, k, v, lens, 0, 1, 2, scale=0.3)
    np.testing.assert_allclose(np.asarray(ref), bf, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(ref)[1, 3:] == 0)


# ------------------------------------------------------------------------------------------
# Kernel vs reference: interpreted on CPU, compiled on a GPU (`gpu` marker).
# ------------------------------------------------------------------------------------------

# (b, t, hq, hkv, d, nr, sink, local, lengths, block_m, block_k, dtype); blocks None = defaults
_F32, _BF16 = jnp.float32, jnp.bfloat16
_CASES = [
    # T = 1 and 17: tiny, blocks shrink to 16.
    (1, 1, 4, 1, 64, 0, 3, 5, None, 64, 32, _F32),
    (2, 17, 8, 1, 64, 0, 3, 5, [17, 9], 128, 64, _F32),          # GQA 8, all streaming
    (2, 17, 4, 4, 128, 2, 1, 4, [5, 17], 32, 16, _F32),          # GQA 1, mixed
    # T = 128, 300: sink / local not multiples of the block; mixed lengths.
    (2, 128, 8, 2, 64, 1, 5, 37, [128, 77], 64, 16, _F32),       # GQA 4 mixed
    (1, 128, 4, 4, 64, 4, 5, 37, None, 32, 32, _F32),            # all retrieval (= causal)
    (2, 300, 4, 1, 64, 0, 17, 45, [300, 123], 64, 32, _F32),     # GQA 4 all streaming
    (1, 300, 8, 1, 128, 0, 7, 300, [250], 128, 64, _F32),        # local >= T -> causal
    (1, 300, 2, 2, 64, 1, 40, 61, [299], 32, 16, _F32),          # sink spans 3 key blocks
    # T = 1061: one mixed case.
    (1, 1061, 2, 2, 64, 1, 129, 257, [1000], 32, 64, _F32),
    (2, 128, 8, 1, 128, 0, 16, 40, [128, 100], 128, 32, _BF16),  # GQA 8, D 128
    (1, 300, 8, 2, 64, 1, 13, 70, None, 64, 32, _BF16),          # GQA 4 mixed
    (1, 1061, 4, 1, 128, 1, 128, 1061, [1061], 128, 64, _BF16),  # all retrieval causal, T 1061
]
# llama3-8b heads (Hq 32, Hkv 8) at the GPU's shapes: default tiles, head dims 64..128 (80 and 96
# padded to 128 in the kernel), T up to 4K
_GPU_CASES = [
    (2, 1061, 32, 8, 128, 3, 128, 300, [1061, 700], None, None, _BF16),
    (1, 4096, 32, 8, 128, 4, 128, 1000, [4096], None, None, _BF16),
    (1, 4096, 32, 8, 128, 0, 128, 1024, [4000], None, None, _BF16),  # streaming only
    (1, 2048, 8, 2, 64, 2, 128, 8192, [2000], None, None, _BF16),   # dense, D 64
    (1, 777, 4, 4, 128, 1, 5, 77, [777], None, None, _BF16),        # G 1
    (1, 1024, 32, 8, 64, 4, 64, 256, [1000], None, None, _BF16),
    (1, 1024, 32, 8, 80, 4, 64, 256, [1000], None, None, _BF16),
    (1, 1024, 32, 8, 96, 4, 64, 256, [1000], None, None, _BF16),
    (1, 1024, 32, 8, 128, 4, 64, 256, [1000], None, None, _F32),
    (2, 300, 8, 1, 64, 0, 17, 45, [300, 123], None, None, _F32),  # G 8 streaming, default tiles
]


def _case_id(c):
    return f"T{c[1]}-G{c[2] // c[3]}-D{c[4]}-nr{c[5]}-{jnp.dtype(c[11]).name}"


@pytest.mark.parametrize("runner,case", kernel_cases(_CASES, _GPU_CASES, ids=_case_id))
def test_kernel_matches_reference(runner, case):
    b, t, hq, hkv, d, nr, sink, local, lengths, bm, bk, dtype = case
    q, k, v, lens = _inputs(t + 31 * nr + local, b, t, hq, hkv, d, dtype, lengths)
    kw = dict(num_retrieval=nr, sink=sink, local=local)
    out = prefill_attention_pallas(q, k, v, lens, block_m=bm, block_k=bk, **runner.kw, **kw)
    ref = prefill_attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)), lens, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert _rel(out, ref) <= runner.tol(dtype)
    lens_np = np.asarray(lens)
    for bi in range(b):
        assert np.all(np.asarray(out, np.float32)[bi, lens_np[bi]:] == 0)


@pytest.mark.parametrize("runner", RUNNERS)
def test_kernel_default_blocks_and_scale(runner):
    q, k, v, lens = _inputs(3, 1, 200, 4, 2, 64, jnp.float32, [190])
    kw = dict(num_retrieval=1, sink=4, local=50, scale=0.05)
    out = prefill_attention_pallas(q, k, v, lens, **runner.kw, **kw)
    ref = prefill_attention_reference(q, k, v, lens, **kw)
    assert _rel(out, ref) <= runner.tol(jnp.float32)


@pytest.mark.parametrize("runner", RUNNERS)
def test_kernel_non_pow2_group_and_head_dim(runner):
    # G = 3 (SmolLM2-like) -> one head per program; D = 48 padded to 64.
    q, k, v, lens = _inputs(4, 1, 40, 6, 2, 48, jnp.float32, [33])
    kw = dict(num_retrieval=1, sink=2, local=9)
    out = prefill_attention_pallas(q, k, v, lens, block_m=32, block_k=16, **runner.kw, **kw)
    ref = prefill_attention_reference(q, k, v, lens, **kw)
    assert _rel(out, ref) <= runner.tol(jnp.float32)


# ------------------------------------------------------------------------------------------
# The ops API: implementations, default order, legacy names.
# ------------------------------------------------------------------------------------------

@pytest.mark.skipif(compat.on_gpu(), reason="CPU dispatch")
def test_dispatch_cpu_impls():
    q, k, v, lens = _inputs(5, 2, 33, 4, 2, 64, jnp.float32, [33, 20])
    kw = dict(num_retrieval=1, sink=3, local=8)
    ref = prefill_attention(q, k, v, lens, choice=OpChoice(("reference",)), **kw)
    np.testing.assert_array_equal(np.asarray(prefill_attention(q, k, v, lens, **kw)),
                                  np.asarray(ref))  # default order on CPU: the reference
    assert _rel(prefill_attention(q, k, v, lens, choice=INTERPRET.choice("triton"), **kw), ref) <= 1e-5
    assert _rel(prefill_attention(q, k, v, lens, choice=OpChoice(("xla+triton",)), **kw), ref) <= 1e-5
    # Dense XLA baseline, valid when every head is dense.
    dense_kw = dict(num_retrieval=2, sink=3, local=8)
    dref = prefill_attention(q, k, v, lens, choice=OpChoice(("reference",)), **dense_kw)
    assert _rel(prefill_attention(q, k, v, lens, choice=OpChoice(("xla",)), **dense_kw), dref) <= 1e-5
    with pytest.raises(Unsupported, match="streaming"):
        prefill_attention(q, k, v, lens, choice=OpChoice(("xla",)), **kw)
    with pytest.raises(Unsupported, match="GPU"):
        prefill_attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), lens,
                          choice=OpChoice(("cudnn",)), **dense_kw)
    with pytest.raises(ValueError, match="unknown prefill implementation"):
        prefill_attention(q, k, v, lens, choice=OpChoice(("mosaic",)), **kw)


@pytest.mark.skipif(compat.on_gpu(), reason="CPU dispatch")
def test_impl_names():
    """OpChoice.from_name takes the implementation names users pass (`--prefill-impl`)."""
    q, k, v, lens = _inputs(5, 2, 33, 4, 2, 64, jnp.float32, [33, 20])
    kw = dict(num_retrieval=1, sink=3, local=8)
    ref = prefill_attention_reference(q, k, v, lens, **kw)

    def run(name):
        return prefill_attention(q, k, v, lens, choice=OpChoice.from_name("prefill", name), **kw)

    np.testing.assert_array_equal(np.asarray(run("auto")), np.asarray(ref))
    assert _rel(run("pallas"), ref) <= 1e-5
    with pytest.raises(ValueError, match="unknown prefill implementation"):
        run("mosaic")


def test_dispatch_under_jit():
    q, k, v, lens = _inputs(6, 1, 24, 2, 1, 32, jnp.float32, [24])
    choice = INTERPRET.choice("triton")
    f = jax.jit(lambda q, k, v, l: prefill_attention(q, k, v, l, num_retrieval=0, sink=2, local=5, choice=choice))
    ref = prefill_attention_reference(q, k, v, lens, num_retrieval=0, sink=2, local=5)
    assert _rel(f(q, k, v, lens), ref) <= 1e-5


# The GPU dispatch (moved from bench/prefill_attn.py): every implementation the GPU can pick,
# against the float32 reference. case: (b, t, hq, hkv, d, dtype, nr, sink, local, lengths)
_GPU_DISPATCH = [
    ((2, 1061, 32, 8, 128, _BF16, 3, 128, 300, [1061, 700]), ("triton", "cudnn+triton", "default")),
    ((1, 4096, 32, 8, 128, _BF16, 4, 128, 1000, [4096]), ("triton", "cudnn+triton", "default")),
    ((2, 300, 8, 1, 64, _F32, 0, 17, 45, [300, 123]), ("triton", "default")),
    ((1, 2048, 8, 2, 64, _BF16, 2, 128, 8192, [2000]), ("triton", "cudnn", "default")),
    ((1, 777, 4, 4, 128, _BF16, 1, 5, 77, [777]), ("triton", "cudnn+triton")),
]


@gpu_only
@pytest.mark.parametrize("case,impl", [(c, i) for c, impls in _GPU_DISPATCH for i in impls],
                         ids=lambda x: x if isinstance(x, str) else f"T{x[1]}-nr{x[6]}-{jnp.dtype(x[5]).name}")
def test_dispatch_gpu(case, impl):
    b, t, hq, hkv, d, dtype, nr, sink, local, lengths = case
    q, k, v, lens = _inputs(11, b, t, hq, hkv, d, dtype, lengths)
    kw = dict(num_retrieval=nr, sink=sink, local=local)
    choice = OpChoice() if impl == "default" else OpChoice((impl,))
    out = jax.jit(lambda q, k, v, l: prefill_attention(q, k, v, l, choice=choice, **kw))(q, k, v, lens)
    ref = prefill_attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)), lens, **kw)
    assert _rel(out, ref) <= (1e-5 if dtype == _F32 else 1e-2)
    for bi in range(b):
        assert bool(jnp.all(out[bi, lengths[bi]:] == 0))


# ------------------------------------------------------------------------------------------
# Shape validation.
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", [prefill_attention_pallas, prefill_attention_reference,
                                prefill_attention])
def test_shape_validation(fn):
    q, k, v, lens = _inputs(0, 2, 8, 4, 2, 16, jnp.float32)
    kw = dict(num_retrieval=1, sink=1, local=2)
    with pytest.raises(ValueError, match="q.shape"):
        fn(q[0], k, v, lens, **kw)
    with pytest.raises(ValueError, match="k.shape"):
        fn(q, k[:, :7], v[:, :7], lens, **kw)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        fn(q[:, :, :3], k, v, lens, **kw)
    with pytest.raises(ValueError, match="k.shape"):
        fn(q, k, v[:, :, :1], lens, **kw)
    with pytest.raises(ValueError, match="lengths.shape"):
        fn(q, k, v, lens[:1], **kw)
    with pytest.raises(ValueError, match="num_retrieval"):
        fn(q, k, v, lens, num_retrieval=3, sink=1, local=2)
    with pytest.raises(ValueError, match="sink"):
        fn(q, k, v, lens, num_retrieval=1, sink=-1, local=2)
    with pytest.raises(ValueError, match="static Python int"):
        fn(q, k, v, lens, num_retrieval=1, sink=jnp.int32(1), local=2)
    with pytest.raises(ValueError, match="dtype"):
        fn(q, k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), lens, **kw)


def test_pallas_block_validation():
    q, k, v, lens = _inputs(0, 1, 8, 2, 1, 16, jnp.float32)
    with pytest.raises(ValueError, match="block_k"):
        prefill_attention_pallas(q, k, v, lens, num_retrieval=1, sink=1, local=2, block_k=24)
    with pytest.raises(ValueError, match="head_dim"):
        prefill_attention_pallas(q[..., :8], k[..., :8], v[..., :8], lens,
                                 num_retrieval=1, sink=1, local=2)


def test_compat():
    p = compat.triton_params(num_warps=4, num_stages=2)
    assert p.num_warps == 4 and p.num_stages == 2
    assert compat.resolve_interpret(None) is (not compat.on_gpu())
    assert compat.resolve_interpret(False) is False
    assert compat.platform() == jax.default_backend()
