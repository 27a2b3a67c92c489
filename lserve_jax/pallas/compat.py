"""Version shims for Pallas (the ONE place for them).

The CPU machines run jax 0.10.2, the H200 runs jax 0.11.2. Kernels in this package import
what differs between versions from here:

* ``triton_params(num_warps, num_stages)``: the compiler params that select the Pallas
  *Triton* lowering. A ``pallas_call`` without them goes to Mosaic GPU, where Triton-style
  kernels fail, so every GPU kernel here passes them.
* ``platform()``: the default backend ("cpu", "gpu", "tpu"), which picks the kernel registry's
  default order; ``on_gpu()``: whether it is a GPU.
* ``resolve_interpret(interpret)``: ``None`` means "interpret unless on a GPU", so the same
  kernel code runs on the H200 compiled and on CPU in interpret mode.
"""

from __future__ import annotations

import functools

import jax
from jax.experimental.pallas import triton as _pltriton

__all__ = ["on_gpu", "platform", "resolve_interpret", "triton_params"]


def _triton_params_cls():
    # 0.10.x/0.11.x export it as `CompilerParams`; some versions named it
    # `TritonCompilerParams`. Accept either.
    for name in ("CompilerParams", "TritonCompilerParams"):
        cls = getattr(_pltriton, name, None)
        if cls is not None:
            return cls
    raise ImportError(
        "jax.experimental.pallas.triton has no CompilerParams; "
        f"unsupported jax version {jax.__version__}")


def triton_params(num_warps: int, num_stages: int):
    """Compiler params selecting the Pallas Triton lowering."""
    return _triton_params_cls()(num_warps=int(num_warps), num_stages=int(num_stages))


@functools.cache
def platform() -> str:
    """The default JAX backend: "cpu", "gpu" (cuda or rocm) or "tpu"."""
    return jax.default_backend()


def on_gpu() -> bool:
    """True when the default JAX backend is a GPU (cuda or rocm)."""
    return platform() == "gpu"


def resolve_interpret(interpret: bool | None) -> bool:
    """``None`` -> interpret everywhere except on a GPU backend."""
    if interpret is None:
        return not on_gpu()
    return bool(interpret)
