"""The kernel test base: every kernel case runs interpreted on CPU and compiled on a GPU.

A kernel test takes a `runner` (with `kernel_cases` or `RUNNERS`): `INTERPRET` runs the Pallas
kernel with interpret=True (anywhere, the CPU suite), `COMPILED` runs it with interpret=False
under the `gpu` marker, with its own tolerances; without a GPU those cases skip with a reason.
Cases only the GPU can afford (llama3-8b heads, T up to 4K) are passed as `gpu_cases`.

    pytest -m gpu tests/       # on the H200: the kernels' GPU correctness check
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lserve_jax.ops import OpChoice

ON_GPU = jax.default_backend() == "gpu"
GPU_MARKS = (pytest.mark.gpu,
             pytest.mark.skipif(not ON_GPU, reason=f"gpu case: needs a GPU to run the kernel compiled "
                                                   f"(default backend is {jax.default_backend()!r}); "
                                                   f"run `pytest -m gpu tests/` on a GPU machine"))


def gpu_only(fn):
    """Marks a test (function or class) as a GPU case."""
    for mark in reversed(GPU_MARKS):
        fn = mark(fn)
    return fn


@dataclasses.dataclass(frozen=True)
class Runner:
    """How a case runs its kernel: interpreted or compiled, and the relative error it allows
    against a float32 reference (‖out − ref‖ / ‖ref‖)."""

    name: str
    interpret: bool
    f32_tol: float
    half_tol: float

    def tol(self, dtype) -> float:
        return self.f32_tol if jnp.dtype(dtype) == jnp.float32 else self.half_tol

    @property
    def kw(self) -> dict:
        """Keyword arguments for a kernel wrapper (prefill_attention_pallas, paged_decode, ...)."""
        return {"interpret": self.interpret}

    def choice(self, impl: str = "triton", **options) -> OpChoice:
        """An ops-API choice of exactly `impl` running the way this runner runs kernels."""
        if impl == "reference":
            return OpChoice.from_options(options, impls=(impl,))
        return OpChoice.from_options({"interpret": self.interpret, **options}, impls=(impl,))


INTERPRET = Runner("interpret", interpret=True, f32_tol=1e-5, half_tol=1e-2)
# compiled: f32 dots run as IEEE (Precision.HIGHEST) but exp2 and the accumulation order differ
COMPILED = Runner("gpu", interpret=False, f32_tol=1e-4, half_tol=1e-2)

RUNNERS = [pytest.param(INTERPRET, id="interpret"), pytest.param(COMPILED, id="gpu", marks=GPU_MARKS)]


def kernel_cases(cases, gpu_cases=(), ids=None) -> list:
    """pytest params (runner, case): every case interpreted and compiled, `gpu_cases` compiled only.

    ids: a function of a case giving its id (default: its index)."""
    name = ids or (lambda c: None)
    out = []
    for i, c in enumerate(cases):
        cid = name(c) or str(i)
        out.append(pytest.param(INTERPRET, c, id=f"interpret-{cid}"))
        out.append(pytest.param(COMPILED, c, id=f"gpu-{cid}", marks=GPU_MARKS))
    for i, c in enumerate(gpu_cases):
        cid = name(c) or f"big{i}"
        out.append(pytest.param(COMPILED, c, id=f"gpu-{cid}", marks=GPU_MARKS))
    return out


def rel_err(out, ref) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (any input dtype)."""
    out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))
