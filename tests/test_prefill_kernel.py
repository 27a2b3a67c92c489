"""Unified block-sparse prefill attention: kernel (interpret mode) vs reference vs brute force."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lserve_jax.attention.prefill import prefill_attention
from lserve_jax.pallas import compat
from lserve_jax.pallas.prefill import (
    prefill_attention_pallas,
    prefill_attention_reference,
)


def _rel(out, ref) -> float:
  out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
  ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
  return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


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
# Kernel (interpret mode on CPU) vs reference.
# ------------------------------------------------------------------------------------------

# (b, t, hq, hkv, d, nr, sink, local, lengths, block_m, block_k)
_FP32_CASES = [
    # T = 1 and 17: tiny, blocks shrink to 16.
    (1, 1, 4, 1, 64, 0, 3, 5, None, 64, 32),
    (2, 17, 8, 1, 64, 0, 3, 5, [17, 9], 128, 64),          # GQA 8, all streaming
    (2, 17, 4, 4, 128, 2, 1, 4, [5, 17], 32, 16),          # GQA 1, mixed
    # T = 128, 300: sink / local not multiples of the block; mixed lengths.
    (2, 128, 8, 2, 64, 1, 5, 37, [128, 77], 64, 16),       # GQA 4 mixed
    (1, 128, 4, 4, 64, 4, 5, 37, None, 32, 32),            # all retrieval (= causal)
    (2, 300, 4, 1, 64, 0, 17, 45, [300, 123], 64, 32),     # GQA 4 all streaming
    (1, 300, 8, 1, 128, 0, 7, 300, [250], 128, 64),        # local >= T -> causal
    (1, 300, 2, 2, 64, 1, 40, 61, [299], 32, 16),          # sink spans 3 key blocks
    # T = 1061: one mixed case.
    (1, 1061, 2, 2, 64, 1, 129, 257, [1000], 32, 64),
]


@pytest.mark.parametrize("case", _FP32_CASES, ids=lambda c: f"T{c[1]}-G{c[2]//c[3]}-nr{c[5]}")
def test_kernel_matches_reference_fp32(case):
  b, t, hq, hkv, d, nr, sink, local, lengths, bm, bk = case
  q, k, v, lens = _inputs(t + 31 * nr + local, b, t, hq, hkv, d, jnp.float32, lengths)
  kw = dict(num_retrieval=nr, sink=sink, local=local)
  out = prefill_attention_pallas(q, k, v, lens, block_m=bm, block_k=bk, interpret=True, **kw)
  ref = prefill_attention_reference(q, k, v, lens, **kw)
  assert out.shape == q.shape and out.dtype == q.dtype
  assert _rel(out, ref) <= 1e-5
  lens_np = np.asarray(lens)
  for bi in range(b):
    assert np.all(np.asarray(out)[bi, lens_np[bi]:] == 0)


_BF16_CASES = [
    (2, 128, 8, 1, 128, 0, 16, 40, [128, 100], 128, 32),   # GQA 8, D 128
    (1, 300, 8, 2, 64, 1, 13, 70, None, 64, 32),           # GQA 4 mixed
    (1, 1061, 4, 1, 128, 1, 128, 1061, [1061], 128, 64),   # all retrieval causal, T 1061
]


@pytest.mark.parametrize("case", _BF16_CASES, ids=lambda c: f"T{c[1]}-G{c[2]//c[3]}-nr{c[5]}")
def test_kernel_matches_reference_bf16(case):
  b, t, hq, hkv, d, nr, sink, local, lengths, bm, bk = case
  q, k, v, lens = _inputs(7, b, t, hq, hkv, d, jnp.bfloat16, lengths)
  kw = dict(num_retrieval=nr, sink=sink, local=local)
  out = prefill_attention_pallas(q, k, v, lens, block_m=bm, block_k=bk, interpret=True, **kw)
  assert out.dtype == jnp.bfloat16
  ref = prefill_attention_reference(q.astype(jnp.float32), k.astype(jnp.float32),
                                    v.astype(jnp.float32), lens, **kw)
  assert _rel(out, ref) <= 1e-2


def test_kernel_default_blocks_and_scale():
  q, k, v, lens = _inputs(3, 1, 200, 4, 2, 64, jnp.float32, [190])
  kw = dict(num_retrieval=1, sink=4, local=50, scale=0.05)
  out = prefill_attention_pallas(q, k, v, lens, interpret=True, **kw)
  ref = prefill_attention_reference(q, k, v, lens, **kw)
  assert _rel(out, ref) <= 1e-5


def test_kernel_non_pow2_group_and_head_dim():
  # G = 3 (SmolLM2-like) -> one head per program; D = 48 padded to 64.
  q, k, v, lens = _inputs(4, 1, 40, 6, 2, 48, jnp.float32, [33])
  kw = dict(num_retrieval=1, sink=2, local=9)
  out = prefill_attention_pallas(q, k, v, lens, block_m=32, block_k=16, interpret=True, **kw)
  ref = prefill_attention_reference(q, k, v, lens, **kw)
  assert _rel(out, ref) <= 1e-5


# ------------------------------------------------------------------------------------------
# Dispatch.
# ------------------------------------------------------------------------------------------

@pytest.mark.skipif(compat.on_gpu(), reason="CPU dispatch")
def test_dispatch_cpu_impls():
  q, k, v, lens = _inputs(5, 2, 33, 4, 2, 64, jnp.float32, [33, 20])
  kw = dict(num_retrieval=1, sink=3, local=8)
  ref = prefill_attention(q, k, v, lens, impl="reference", **kw)
  np.testing.assert_array_equal(np.asarray(prefill_attention(q, k, v, lens, **kw)),
                                np.asarray(ref))  # auto -> reference on CPU
  assert _rel(prefill_attention(q, k, v, lens, impl="pallas", **kw), ref) <= 1e-5
  assert _rel(prefill_attention(q, k, v, lens, impl="xla+pallas", **kw), ref) <= 1e-5
  # Dense XLA baseline, valid when every head is dense.
  dense_kw = dict(num_retrieval=2, sink=3, local=8)
  dref = prefill_attention(q, k, v, lens, impl="reference", **dense_kw)
  assert _rel(prefill_attention(q, k, v, lens, impl="xla", **dense_kw), dref) <= 1e-5
  with pytest.raises(ValueError, match="streaming"):
    prefill_attention(q, k, v, lens, impl="xla", **kw)
  with pytest.raises(ValueError, match="GPU"):
    prefill_attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16),
                      v.astype(jnp.bfloat16), lens, impl="cudnn", **dense_kw)
  with pytest.raises(ValueError, match="unknown impl"):
    prefill_attention(q, k, v, lens, impl="mosaic", **kw)


def test_dispatch_under_jit():
  q, k, v, lens = _inputs(6, 1, 24, 2, 1, 32, jnp.float32, [24])
  f = jax.jit(lambda q, k, v, l: prefill_attention(q, k, v, l, num_retrieval=0, sink=2,
                                                   local=5, impl="pallas"))
  ref = prefill_attention_reference(q, k, v, lens, num_retrieval=0, sink=2, local=5)
  assert _rel(f(q, k, v, lens), ref) <= 1e-5


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
