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

# the reference jitted: one compile per shape instead of op-by-op dispatch (seconds per case on CPU)
_reference = jax.jit(prefill_attention_reference, static_argnames=("num_retrieval", "sink", "local", "scale"))


def _normal(rng, shape, dtype):
    # numpy, not jax.random: an eager jax.random draw compiles per shape (about a second a case)
    return jnp.asarray(rng.standard_normal(shape, np.float32).astype(jnp.dtype(dtype)))


def _inputs(seed, b, t, hq, hkv, d, dtype, lengths=None):
    rng = np.random.default_rng(seed)
    q = _normal(rng, (b, t, hq, d), dtype)
    k = _normal(rng, (b, t, hkv, d), dtype)
    v = _normal(rng, (b, t, hkv, d), dtype)
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
    # sink 0 (issue: NaN at head dims 96 and 128, fine at 64 and 80): rows that see no key in the
    # window's first block. Before the fix (finite mask value) the fused s * scale - m gave
    # exp2(+5e29) = inf there, then NaN; each of the D 96 / 128 cases below had NaN rows in
    # interpret mode too (XLA:CPU fuses the same FMA at these tile sizes).
    (1, 200, 2, 2, 64, 1, 0, 1, [200], 128, 32, _F32),           # local 1: self only
    (1, 200, 2, 2, 80, 1, 0, 1, [200], 128, 32, _F32),
    (1, 200, 2, 2, 96, 1, 0, 1, [200], 128, 32, _F32),
    (1, 200, 2, 2, 128, 1, 0, 1, [200], 128, 32, _F32),
    (1, 320, 4, 2, 128, 1, 0, 64, [320], None, None, _BF16),     # the case, default tiles
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
    # the sink-0 issue at its shape (q [1, 1000, 4, D], one retrieval head, local 256) and local 1
    (1, 1000, 4, 2, 64, 1, 0, 256, [1000], None, None, _BF16),
    (1, 1000, 4, 2, 80, 1, 0, 256, [1000], None, None, _BF16),
    (1, 1000, 4, 2, 96, 1, 0, 256, [1000], None, None, _BF16),
    (1, 1000, 4, 2, 128, 1, 0, 256, [1000], None, None, _BF16),
    (1, 1000, 4, 2, 128, 1, 0, 256, [999], None, None, _F32),
    (1, 1000, 4, 2, 96, 0, 0, 1, [1000], None, None, _F32),
    (1, 200, 4, 2, 96, 1, 0, 32, [190], 128, 64, _F32),
    (1, 320, 4, 2, 96, 0, 0, 64, [300], None, None, _F32),
    (2, 1024, 32, 8, 128, 4, 0, 1, [1024, 700], None, None, _BF16),
    (2, 1024, 32, 8, 96, 0, 0, 200, [1024, 700], 64, 32, _BF16),
]


def _case_id(c):
    return f"T{c[1]}-G{c[2] // c[3]}-D{c[4]}-nr{c[5]}-s{c[6]}l{c[7]}-{jnp.dtype(c[11]).name}"


@pytest.mark.parametrize("runner,case", kernel_cases(_CASES, _GPU_CASES, ids=_case_id))
def test_kernel_matches_reference(runner, case):
    b, t, hq, hkv, d, nr, sink, local, lengths, bm, bk, dtype = case
    q, k, v, lens = _inputs(t + 31 * nr + local, b, t, hq, hkv, d, dtype, lengths)
    kw = dict(num_retrieval=nr, sink=sink, local=local)
    out = prefill_attention_pallas(q, k, v, lens, block_m=bm, block_k=bk, **runner.kw, **kw)
    ref = _reference(*(x.astype(jnp.float32) for x in (q, k, v)), lens, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert np.all(np.isfinite(np.asarray(out, np.float32)))
    assert _rel(out, ref) <= runner.tol(dtype)
    lens_np = np.asarray(lens)
    for bi in range(b):
        assert np.all(np.asarray(out, np.float32)[bi, lens_np[bi]:] == 0)


@pytest.mark.parametrize("runner", RUNNERS)
def test_kernel_default_blocks_and_scale(runner):
    q, k, v, lens = _inputs(3, 1, 200, 4, 2, 64, jnp.float32, [190])
    kw = dict(num_retrieval=1, sink=4, local=50, scale=0.05)
    out = prefill_attention_pallas(q, k, v, lens, **runner.kw, **kw)
    ref = _reference(q, k, v, lens, **kw)
    assert _rel(out, ref) <= runner.tol(jnp.float32)


@pytest.mark.parametrize("runner", RUNNERS)
def test_kernel_non_pow2_group_and_head_dim(runner):
    # G = 3 (SmolLM2-like) -> one head per program; D = 48 padded to 64.
    q, k, v, lens = _inputs(4, 1, 40, 6, 2, 48, jnp.float32, [33])
    kw = dict(num_retrieval=1, sink=2, local=9)
    out = prefill_attention_pallas(q, k, v, lens, block_m=32, block_k=16, **runner.kw, **kw)
    ref = _reference(q, k, v, lens, **kw)
    assert _rel(out, ref) <= runner.tol(jnp.float32)


# ------------------------------------------------------------------------------------------
# Offset (chunked) form: q [B, T], k/v [B, Tk >= T], query row i at key position q_offset[b] + i.
# ------------------------------------------------------------------------------------------

def _offset_inputs(seed, b, t, tk, hq, hkv, d, dtype):
    rng = np.random.default_rng(seed)
    return _normal(rng, (b, t, hq, d), dtype), _normal(rng, (b, tk, hkv, d), dtype), _normal(rng, (b, tk, hkv, d), dtype)


def _offset_sweep():
    """T in {16, 40, 64} x Tk in {T, T + 24, 3T} x (retrieval-only, streaming-only, mixed), the
    GQA group, head dim, sink / local window and tiles cycling over the cases. Three rows per
    case with their own offsets (q_offset + T <= Tk, 0 included) and lengths (full, shorter, 0),
    rotated so that every row position gets each."""
    windows = [(0, 1), (3, 5), (0, 17), (3, 1), (0, 5), (3, 17), (3, 10 ** 6), (0, None), (3, None)]
    tiles = [(16, 16), (32, 16), (64, 32), (32, 32), (16, 32)]
    cases, i, j = [], 0, 0  # i: case, j: (T, Tk) pair
    for t in (16, 40, 64):
        for tk in (t, t + 24, 3 * t):
            for h, heads in enumerate(("retrieval", "streaming", "mixed")):
                g = (1, 2, 4)[(j + h) % 3]
                hkv = 1 if heads != "mixed" and (i + j) % 2 else 2
                nr = {"retrieval": hkv, "streaming": 0, "mixed": hkv // 2}[heads]
                sink, local = windows[(2 * j + h) % len(windows)]
                local = 2 * t if local is None else local  # None: a window wider than the chunk
                d = (32, 64, 48)[(j + 2 * h) % 3]
                bm, bk = tiles[i % len(tiles)]
                span = tk - t
                offs = [span, span // 3, min(7, span)]
                lens = [t, max(1, t - 7 - i % 5), 0]
                ro, rl = i % 3, (i + j) % 3
                offs, lens = offs[ro:] + offs[:ro], lens[rl:] + lens[:rl]
                cases.append((t, tk, hkv * g, hkv, d, nr, sink, local, offs, lens, bm, bk))
                i += 1
            j += 1
    return cases


_OFFSET_CASES = _offset_sweep()
# the GPU's shapes: llama3-8b heads, a chunk late in a long prompt, bf16; D 96 padded; G 1
_OFFSET_GPU_CASES = [
    (1024, 4096, 32, 8, 128, 4, 128, 1000, [3072], [1024], None, None, _BF16),
    (1024, 4096, 32, 8, 128, 0, 128, 1024, [3072], [1000], None, None, _BF16),
    (1024, 4096, 32, 8, 128, 8, 128, 1024, [3072], [1024], None, None, _BF16),
    (2048, 8192, 32, 8, 128, 4, 0, 256, [6144, 100], [2048, 2000], None, None, _BF16),
    (512, 3000, 8, 2, 96, 1, 0, 300, [2488, 1000], [512, 300], None, None, _BF16),
    (512, 1500, 4, 4, 64, 2, 64, 256, [988], [500], None, None, _F32),
    (333, 1333, 32, 8, 80, 4, 16, 200, [1000, 0], [333, 1], None, None, _F32),
]


def _offset_case_id(c):
    t, tk, hq, hkv, d, nr, sink, local = c[:8]
    kind = "ret" if nr == hkv else "str" if nr == 0 else "mix"
    dtype = jnp.dtype(c[12] if len(c) > 12 else _F32).name
    return f"T{t}-Tk{tk}-{kind}-G{hq // hkv}-D{d}-s{sink}l{local}-{dtype}"


@pytest.mark.parametrize("runner,case", kernel_cases(_OFFSET_CASES, [c for c in _OFFSET_GPU_CASES],
                                                     ids=_offset_case_id))
def test_offset_kernel_matches_reference(runner, case):
    t, tk, hq, hkv, d, nr, sink, local, offs, lens, bm, bk = case[:12]
    dtype = case[12] if len(case) > 12 else _F32
    b = len(lens)
    q, k, v = _offset_inputs(t + tk + 7 * nr + sink, b, t, tk, hq, hkv, d, dtype)
    lens, offs = jnp.asarray(lens, jnp.int32), jnp.asarray(offs, jnp.int32)
    kw = dict(num_retrieval=nr, sink=sink, local=local, q_offset=offs)
    out = prefill_attention_pallas(q, k, v, lens, block_m=bm, block_k=bk, **runner.kw, **kw)
    ref = _reference(*(x.astype(jnp.float32) for x in (q, k, v)), lens, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    out_np = np.asarray(out, np.float32)
    assert np.all(np.isfinite(out_np))
    assert _rel(out, ref) <= runner.tol(dtype)
    for bi, n in enumerate(np.asarray(lens)):
        assert np.all(out_np[bi, n:] == 0)


@pytest.mark.parametrize("runner", RUNNERS)
def test_chunked_prefill_equals_one_shot(runner):
    """A prompt prefilled in chunks through the ops API (offset form: each chunk's queries over
    the prompt's keys, those past the chunk masked by q_offset + length) equals the one-shot plain
    form. The choice puts the cuDNN hybrid first: it refuses the offset form,
    so the dispatcher falls through to the Triton kernel (as the GPU default order does)."""
    b, t, hq, hkv, d = 2, 96, 4, 2, 32
    q, k, v = _offset_inputs(21, b, t, t, hq, hkv, d, jnp.float32)
    lengths = np.asarray([96, 61], np.int32)
    kw = dict(num_retrieval=1, sink=3, local=17)
    tiles = dict(block_m=32, block_k=16)
    whole = prefill_attention(q, k, v, jnp.asarray(lengths), choice=runner.choice("triton", **tiles), **kw)
    ref = _reference(q, k, v, jnp.asarray(lengths), **kw)
    assert _rel(whole, ref) <= runner.tol(jnp.float32)
    choice = OpChoice.from_options({"interpret": runner.interpret, **tiles}, impls=("cudnn+triton", "triton"))
    chunks = []
    for s in (0, 32, 64):  # chunks of 32 over every key of the prompt: one compile for all three
        n = jnp.asarray(np.clip(lengths - s, 0, 32), jnp.int32)
        chunks.append(prefill_attention(q[:, s:s + 32], k, v, n, q_offset=jnp.full((b,), s, jnp.int32),
                                        choice=choice, **kw))
    chunked = jnp.concatenate(chunks, axis=1)
    assert _rel(chunked, whole) <= runner.tol(jnp.float32)
    assert np.all(np.asarray(chunked)[1, 61:] == 0)
    with pytest.raises(Unsupported, match="offset"):
        prefill_attention(q[:, :40], k, v, jnp.asarray([40, 40], jnp.int32), q_offset=jnp.zeros((b,), jnp.int32),
                          choice=OpChoice(("xla+triton",)), **kw)


# ------------------------------------------------------------------------------------------
# The ops API: implementations, default order, legacy names.
# ------------------------------------------------------------------------------------------

@pytest.mark.skipif(compat.on_gpu(), reason="CPU dispatch")
def test_dispatch_cpu_impls():
    q, k, v, lens = _inputs(5, 2, 33, 4, 2, 64, jnp.float32, [33, 20])
    kw = dict(num_retrieval=1, sink=3, local=8)
    ref = prefill_attention(q, k, v, lens, choice=OpChoice(("reference",)), **kw)
    # default order on CPU: the "cpu" backend (ops/cpu.py), then the reference
    assert _rel(prefill_attention(q, k, v, lens, **kw), ref) <= 1e-5
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

    assert _rel(run("auto"), ref) <= 1e-5  # the CPU default order
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
