"""The kernel registry: fall-through only on Unsupported, errors that name every refusal, the
default orders, options reaching the kernels, and the frozen choice values."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lserve_jax import ops
from lserve_jax.ops import Kernels, OpChoice, Unsupported
from lserve_jax.ops.registry import REGISTRY, Registry
from lserve_jax.pallas import compat
from lserve_jax.pallas.prefill import prefill_attention_reference

from .kernel_base import INTERPRET


def _toy_registry():
    """A registry of fake implementations of one op, "toy": a refuses, b and c run."""
    reg = Registry()
    calls = []

    @reg.register("toy", "a", priority={"cpu": 3, "gpu": 3})
    def a(x, *, options):
        calls.append("a")
        raise Unsupported("a cannot")

    @reg.register("toy", "b", priority={"cpu": 2})
    def b(x, *, options):
        calls.append("b")
        return x + options.get("shift", 1)

    @reg.register("toy", "c", priority={"*": 0})
    def c(x, *, options):
        calls.append("c")
        return x * 10

    @reg.register("toy", "bug")
    def bug(x, *, options):
        raise ValueError("a bug, not a refusal")

    return reg, calls


def test_falls_through_on_unsupported_in_order():
    reg, calls = _toy_registry()
    assert reg.default_order("toy", "cpu") == ("a", "b", "c")
    assert reg.default_order("toy", "gpu") == ("a", "c")
    assert reg.default_order("toy", "tpu") == ("c",)
    assert reg.dispatch("toy", OpChoice(("a", "c")), 2) == 20
    assert calls == ["a", "c"]
    assert reg.dispatch("toy", OpChoice(("a", "b"), (("shift", 5),)), 2) == 7  # options reach the impl


def test_other_errors_propagate():
    reg, calls = _toy_registry()
    with pytest.raises(ValueError, match="a bug"):
        reg.dispatch("toy", OpChoice(("bug", "c")), 1)
    assert calls == []  # c was not tried


def test_explicit_choice_names_every_refusal():
    reg, _ = _toy_registry()
    with pytest.raises(Unsupported, match=r"no toy implementation ran; tried a: a cannot"):
        reg.dispatch("toy", OpChoice(("a",)), 1)
    with pytest.raises(ValueError, match=r"unknown toy implementation\(s\) \['zz'\]; registered: \['a', 'b'"):
        reg.dispatch("toy", OpChoice(("zz",)), 1)


def test_registration_and_missing_backends():
    reg, _ = _toy_registry()
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("toy", "a")(lambda x, *, options: x)
    with pytest.raises(ValueError, match="reserved"):
        reg.register("toy", "pallas")
    broken = Registry(backends=("no_such_backend",))
    with pytest.raises(ModuleNotFoundError, match="no_such_backend"):  # a bug, not a missing kernel
        broken.names("prefill")


def test_default_orders():
    """The measured GPU choices: cuDNN hybrid, then the Triton kernel, then the reference; on CPU
    the CPU backend's prefill and decode, then the reference."""
    assert REGISTRY.default_order("prefill", "gpu") == ("cudnn+triton", "triton", "reference")
    assert REGISTRY.default_order("decode", "gpu") == ("cudnn", "triton", "reference")  # cudnn: dense layout only
    for op in ("append", "page_scores"):
        assert REGISTRY.default_order(op, "gpu") == ("triton", "reference")
    for op in ("prefill", "decode"):
        assert REGISTRY.default_order(op, "cpu") == ("cpu", "reference")
    for op in ("append", "page_scores"):
        assert REGISTRY.default_order(op, "cpu") == ("reference",)


@pytest.mark.skipif(compat.on_gpu(), reason="CPU default order")
def test_auto_on_cpu_runs_no_kernel_and_equals_the_reference():
    ks = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (jax.random.normal(kk, (1, 16, 4, 32)) for kk in ks)
    k, v = k[:, :, :2], v[:, :, :2]
    lens = jnp.asarray([12], jnp.int32)
    kw = dict(num_retrieval=1, sink=2, local=4)
    f = lambda q, k, v, l: ops.prefill_attention(q, k, v, l, **kw)
    assert "pallas_call" not in str(jax.make_jaxpr(f)(q, k, v, lens))
    np.testing.assert_allclose(np.asarray(f(q, k, v, lens)),
                               np.asarray(prefill_attention_reference(q, k, v, lens, **kw)), atol=1e-5, rtol=1e-5)


def test_unsupported_everywhere_lists_each_reason():
    """Every implementation of a choice refuses: the error names each and its reason."""
    q = jnp.zeros((1, 16, 2, 8), jnp.float32)  # head_dim 8: below the Triton dots' 16
    lens = jnp.asarray([16], jnp.int32)
    choice = OpChoice(("cudnn", "triton"))
    with pytest.raises(Unsupported, match=r"tried cudnn: .*streaming heads.*; triton: .*head_dim >= 16"):
        ops.prefill_attention(q, q, q, lens, num_retrieval=0, sink=2, local=4, choice=choice)


def test_triton_needs_a_gpu_unless_interpreted():
    if compat.on_gpu():
        pytest.skip("the GPU compiles Triton kernels")
    q = jnp.zeros((1, 16, 2, 16), jnp.float32)
    with pytest.raises(Unsupported, match="only on a GPU"):
        ops.prefill_attention(q, q, q, jnp.asarray([16], jnp.int32), num_retrieval=1, sink=2, local=4,
                              choice=OpChoice.from_options({"interpret": False}, impls="triton"))


def test_options_reach_the_kernels():
    # decode: the block size names the kernel launch
    b, r, s, g, d, page, n = 1, 1, 1, 2, 16, 16, 4
    args = (jnp.zeros((b, (r + s) * g, d)), jnp.zeros((r, 5, page, d)), jnp.zeros((r, 5, page, d)),
            jnp.zeros((s, b, 32, d)), jnp.zeros((s, b, 32, d)), jnp.ones((b, n), jnp.int32),
            jnp.asarray([50], jnp.int32), jnp.zeros((b, r, n), jnp.int32), jnp.full((b, r), n, jnp.int32))
    for ppb in (1, 2):
        f = lambda *a: ops.decode_attention(*a, mode="kv_head", choice=INTERPRET.choice(pages_per_block=ppb))
        assert f"lserve_sparse_decode_ppb{ppb}_" in str(jax.make_jaxpr(f)(*args))
    # prefill: a block size the kernel rejects, and an option no kernel takes
    q = jnp.zeros((1, 16, 2, 16), jnp.float32)
    kw = dict(num_retrieval=1, sink=2, local=4)
    with pytest.raises(ValueError, match="block_k must be a power of 2"):
        ops.prefill_attention(q, q, q, jnp.asarray([16], jnp.int32), **kw, choice=INTERPRET.choice(block_k=24))
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['block_q'\]"):
        ops.prefill_attention(q, q, q, jnp.asarray([16], jnp.int32), **kw, choice=INTERPRET.choice(block_q=32))


def test_choice_values():
    c = OpChoice.from_options({"num_warps": 8, "block_m": 64}, impls=("pallas", "reference"))
    assert c.impls == ("triton", "reference") and c.options == (("block_m", 64), ("num_warps", 8))
    assert c == OpChoice(("triton", "reference"), (("num_warps", 8), ("block_m", 64)))
    assert hash(c) == hash(OpChoice.from_options({"block_m": 64, "num_warps": 8}, impls=("triton", "reference")))
    assert c.with_options(num_warps=4).kwargs == {"block_m": 64, "num_warps": 4}
    with pytest.raises(ValueError, match="hashable"):
        OpChoice.from_options({"tiles": [1, 2]})
    with pytest.raises(ValueError, match="'auto'"):
        OpChoice(("auto",))


def test_kernels_from_legacy_names_and_options():
    k = Kernels.from_names(prefill="cudnn+pallas", decode="pallas")
    assert k.prefill == OpChoice(("cudnn+triton",))
    assert k.decode == k.append == OpChoice(("triton",))  # the append follows the decode impl
    assert k.page_scores == OpChoice()
    assert Kernels.from_names() == Kernels()  # "auto" everywhere: the default orders
    assert Kernels.from_names(decode="reference", append="auto").append == OpChoice()
    tuned = Kernels().with_options(decode={"pages_per_block": 2}, page_scores={"chunk": 32})
    assert tuned.decode.kwargs == {"pages_per_block": 2} and tuned.decode.impls == ()
    assert tuned.page_scores.kwargs == {"chunk": 32} and tuned.prefill == OpChoice()
    assert len({tuned, Kernels().with_options(decode={"pages_per_block": 2}, page_scores={"chunk": 32})}) == 1
    with pytest.raises(ValueError, match="unknown decode implementation"):
        Kernels.from_names(decode="mosaic")
    cudnn = Kernels.from_names(decode="cudnn")  # decode-only: the append keeps its default order
    assert cudnn.decode.impls == ("cudnn",) and cudnn.append == OpChoice()
    with pytest.raises(ValueError, match="unknown ops"):
        Kernels().with_options(attention={"block_m": 64})
    with pytest.raises(ValueError, match="must be an OpChoice"):
        Kernels(prefill="auto")
