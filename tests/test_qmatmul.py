"""The 8-bit weight product (`lserve_jax.pallas.qmatmul`, op "qmatmul"): the weight-only Triton
kernel equals its float32 spec for int8 and e4m3 weights, bf16 and f32 activations, padded row
counts, split-K and given block sizes; block planning divides the weight or refuses it; the
kernel lowers through the Triton rules; the registry runs XLA's W8A8 path on CPU (project()
unchanged) and the kernel when named, falling through for what it cannot run."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lserve_jax import ops
from lserve_jax.models.layer import project
from lserve_jax.ops import OpChoice, Unsupported
from lserve_jax.ops.registry import REGISTRY
from lserve_jax.pallas import compat
from lserve_jax.pallas.qmatmul import BlockSizeError, plan, qmatmul, qmatmul_reference
from lserve_jax.quant import (FP8, dequantize_weight, fp8_matmul, int8_matmul, quantize_weight,
                              quantize_weight_int8)

from .kernel_base import INTERPRET, kernel_cases

# (rows, K, N, weight dtype, x dtype, kernel kwargs): rows 1/4/16/33 (padded to 16/16/16/64),
# the small models' shapes, default plans (split_k 1 and > 1) and given block sizes
CASES = [
    (1, 576, 64, jnp.int8, jnp.bfloat16, {}),
    (4, 576, 64, FP8, jnp.float32, {}),
    (16, 896, 128, FP8, jnp.bfloat16, {}),  # default split_k 2
    (33, 896, 128, jnp.int8, jnp.float32, {"split_k": 1}),
    (4, 4864, 896, FP8, jnp.bfloat16, {}),  # default split_k 4, block_k 64 (4864 = 64 * 76)
    (4, 4864, 896, jnp.int8, jnp.bfloat16, {"block_n": 128, "block_k": 256, "split_k": 1}),
    (33, 1536, 256, FP8, jnp.float32, {"block_n": 32, "block_k": 32, "split_k": 8}),
    (1, 896, 192, jnp.int8, jnp.float32, {"block_n": 64, "block_k": 128, "split_k": 7}),  # odd split: 128 | 896/7
]
GPU_CASES = [  # llama3-8b's decode projections at batch 4
    (4, 4096, 4096, FP8, jnp.bfloat16, {}),
    (4, 4096, 1024, jnp.int8, jnp.bfloat16, {}),
    (4, 4096, 14336, FP8, jnp.bfloat16, {}),
    (4, 14336, 4096, jnp.int8, jnp.bfloat16, {}),
]


def _case_id(c):
    m, k, n, wd, xd, kw = c
    return f"m{m}-{k}x{n}-{jnp.dtype(wd).name}-{jnp.dtype(xd).name}" + "".join(f"-{a}{b}" for a, b in kw.items())


def _operands(m, k, n, wdtype, xdtype, seed=0):
    kx, kw = jax.random.split(jax.random.PRNGKey(seed))
    x = jax.random.normal(kx, (m, k), jnp.float32).astype(xdtype)
    w = jax.random.normal(kw, (k, n), jnp.float32) * jnp.exp(jax.random.uniform(kw, (1, n), minval=-2, maxval=2))
    if jnp.dtype(wdtype) == jnp.dtype(jnp.int8):
        return x, quantize_weight_int8(w, None)
    return x, quantize_weight(w)


def _rel(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("runner,case", kernel_cases(CASES, GPU_CASES, ids=_case_id))
def test_kernel_equals_the_reference(runner, case):
    m, k, n, wdtype, xdtype, kw = case
    x, qw = _operands(m, k, n, wdtype, xdtype)
    got = qmatmul(x, qw.w, qw.scale, interpret=runner.interpret, **kw)
    assert got.shape == (m, n) and got.dtype == jnp.float32
    assert _rel(got, qmatmul_reference(x, qw.w, qw.scale)) < runner.tol(xdtype)


def test_plan_divides_the_real_models_shapes_and_refuses_the_rest():
    for k in (576, 896, 1536, 2048, 4096, 4864, 14336):
        for n in (64, 192, 576, 896, 1024, 4096, 4864, 14336, 28672):
            bn, bk, s = plan(k, n)
            assert n % bn == 0 and (k // s) % bk == 0 and k % s == 0, (k, n, bn, bk, s)
    assert plan(4096, 4096) == (64, 256, 4)  # 64 column blocks x 4 splits: a program per SM
    assert plan(4096, 14336)[2] == 1  # 224 column blocks already fill the SMs
    assert plan(576, 64, block_n=32, block_k=64, split_k=3) == (32, 64, 3)
    for k, n, kw in [(576, 100, {}), (40, 64, {}), (576, 64, {"block_n": 48}), (576, 64, {"block_n": 128}),
                     (576, 64, {"block_k": 128}), (576, 64, {"split_k": 5}), (576, 64, {"block_k": 8})]:
        with pytest.raises(BlockSizeError):
            plan(k, n, **kw)


def test_kernel_refuses_bad_inputs():
    x, qw = _operands(4, 576, 64, FP8, jnp.bfloat16)
    with pytest.raises(ValueError, match="rows"):
        qmatmul(jnp.zeros((65, 576), jnp.bfloat16), qw.w, qw.scale)
    with pytest.raises(ValueError, match="int8 or float8_e4m3fn"):
        qmatmul(x, qw.w.astype(jnp.bfloat16), qw.scale)
    with pytest.raises(BlockSizeError):
        qmatmul(x, qw.w, qw.scale, block_n=128)


@pytest.mark.parametrize("wdtype,xdtype,split_k", [(FP8, jnp.bfloat16, 1), (jnp.int8, jnp.float32, 4),
                                                   (jnp.int8, jnp.bfloat16, None)])
def test_kernel_lowers_through_the_triton_rules(wdtype, xdtype, split_k):
    """Lowered for CUDA on this machine (no GPU needed): power-of-2 blocks, dots >= 16, the
    8-bit conversions."""
    x, qw = _operands(33, 896, 128, wdtype, xdtype)
    f = jax.jit(lambda x, w, s: qmatmul(x, w, s, split_k=split_k, interpret=False))
    try:
        text = f.trace(x, qw.w, qw.scale).lower(lowering_platforms=("cuda",)).as_text()
    except (NotImplementedError, RuntimeError) as e:
        if "triton" in str(e).lower() or "cuda" in str(e).lower():
            pytest.skip(f"no CUDA lowering in this jaxlib: {e}")
        raise
    assert "lserve_qmatmul" in text


def test_default_orders():
    assert REGISTRY.default_order("qmatmul", "gpu") == ("xla",)  # triton: explicit choices only
    assert REGISTRY.default_order("qmatmul", "cpu") == ("xla",)


@pytest.mark.skipif(compat.on_gpu(), reason="CPU default order")
@pytest.mark.parametrize("act", [True, False])
def test_project_on_cpu_is_xlas_path_unchanged(act):
    x, qw = _operands(3, 64, 32, FP8, jnp.bfloat16)
    x3 = x.reshape(1, 3, 64)
    qw = quantize_weight(dequantize_weight(qw), quantize_activations=act)
    assert "pallas_call" not in str(jax.make_jaxpr(lambda x: project(x, qw))(x3))
    np.testing.assert_array_equal(np.asarray(project(x3, qw)), np.asarray(fp8_matmul(x3, qw).astype(x.dtype)))
    _, qi = _operands(3, 64, 32, jnp.int8, jnp.bfloat16)
    qi = qi.replace(inv_smooth=jnp.linspace(0.5, 2.0, 64))
    np.testing.assert_array_equal(np.asarray(project(x3, qi)), np.asarray(int8_matmul(x3, qi).astype(x.dtype)))
    np.testing.assert_array_equal(np.asarray(ops.qmatmul(x3, qi)), np.asarray(int8_matmul(x3, qi)))


@pytest.mark.parametrize("wdtype", [FP8, jnp.int8])
@pytest.mark.parametrize("xdtype", [jnp.float32, jnp.bfloat16])
def test_triton_through_the_registry_is_the_weight_only_product(wdtype, xdtype):
    """Named with interpret: x [2, 3, K] @ the dequantised weight (an Int8Linear's smoothing undone)."""
    x, qw = _operands(6, 576, 192, wdtype, xdtype, seed=1)
    if jnp.dtype(wdtype) == jnp.dtype(jnp.int8):
        qw = qw.replace(inv_smooth=jnp.linspace(0.5, 2.0, 576))
    x3 = x.reshape(2, 3, 576)
    got = ops.qmatmul(x3, qw, choice=INTERPRET.choice("triton", split_k=2))
    assert got.shape == (2, 3, 192) and got.dtype == jnp.float32
    ref = x3.astype(jnp.float32) @ dequantize_weight(qw)
    # bf16 activations: an Int8Linear's smoothed activations are rounded to bf16 once more
    assert _rel(got, ref) < INTERPRET.tol(xdtype)


def test_triton_refusals_fall_through_to_xla():
    x, qw = _operands(65, 576, 64, FP8, jnp.bfloat16)
    only = INTERPRET.choice("triton")
    with pytest.raises(Unsupported, match="1..64 rows"):
        ops.qmatmul(x, qw, choice=only)  # prefill's rows: XLA's GEMMs
    both = OpChoice(("triton", "xla"), only.options)
    np.testing.assert_array_equal(np.asarray(ops.qmatmul(x, qw, choice=both)), np.asarray(fp8_matmul(x, qw)))
    x, qw = _operands(4, 576, 100, jnp.int8, jnp.bfloat16)  # N = 100: no power-of-2 block divides it
    with pytest.raises(Unsupported, match="no block sizes"):
        ops.qmatmul(x, qw, choice=only)
    np.testing.assert_array_equal(np.asarray(ops.qmatmul(x, qw, choice=both)), np.asarray(int8_matmul(x, qw)))
    with pytest.raises(Unsupported, match="no block sizes"):
        ops.qmatmul(x[:, :64], quantize_weight(jnp.ones((64, 64))), choice=only.with_options(block_k=128))
    with pytest.raises(ValueError, match="unknown option"):
        ops.qmatmul(x, qw, choice=only.with_options(block_m=16))
    with pytest.raises(ValueError, match="FP8Linear or Int8Linear"):
        ops.qmatmul(x, jnp.ones((576, 100)))
    with pytest.raises(ValueError, match="does not match"):
        ops.qmatmul(x[:, :64], qw)
