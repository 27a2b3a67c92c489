"""Shared pieces of the whole-model benchmarks: shapes, timing, ceilings, environment, JSON."""

from __future__ import annotations

import datetime
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from unittest import mock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lserve_jax.config import ModelConfig, RopeScaling  # noqa: E402
from lserve_jax.fuse import fuse_projections  # noqa: E402
from lserve_jax.heads import binarize, layout_and_permutation, load_pattern  # noqa: E402
from lserve_jax.models import layer as layer_lib  # noqa: E402
from lserve_jax.ops import OpChoice  # noqa: E402
from lserve_jax.ops.qmatmul import qmatmul as ops_qmatmul  # noqa: E402

T0 = time.perf_counter()

SHAPES = {
    "llama3-8b": dict(architecture="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
                      max_position_embeddings=1 << 20, rms_norm_eps=1e-5),
    "smollm2-135m": dict(architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0,
                         max_position_embeddings=8192, tie_word_embeddings=True),
}
PATTERNS = {"llama3-8b": os.path.join(ROOT, "bench", "patterns", "Llama-3-8B-Instruct-Gradient-1048k.tsv")}


def log(*a) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s]", *a, flush=True)


def add_model_args(p) -> None:
    """The whole-model benchmarks' shared flags: --shape, --sparsity, --tp, --out."""
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--sparsity", type=float, default=0.5, help="static sparsity of the head pattern")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (KV heads over this many GPUs)")
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the JSON results")


def model_config(name: str) -> ModelConfig:
    return ModelConfig(**SHAPES[name], rope_scaling=RopeScaling())


def as_served(params, cfg: ModelConfig, tp: int = 1):
    """`params` as `lserve_jax.load` runs them: q/k/v and gate/up fused (`lserve_jax.fuse`) when
    tp == 1 (the given params are consumed), unchanged for tensor parallelism. Quantise after."""
    return fuse_projections(params, cfg, consume=True) if tp == 1 else params


def sparse_layout(name: str, cfg: ModelConfig, sparsity: float, tp: int = 1):
    """The real head pattern of the shape, binarised by the global-quantile rule (balanced over
    `tp` devices when tp > 1). Random weights need no permutation: only the layout matters."""
    if name in PATTERNS:
        alpha = load_pattern(PATTERNS[name])
    else:  # no published pattern for this shape: a fixed random one (speed does not depend on it)
        alpha = np.random.default_rng(0).random((cfg.num_layers, cfg.num_kv_heads))
    retrieval = binarize(alpha, sparsity)
    if tp > 1:
        from lserve_jax.sharding import balance_retrieval, tp_permutation

        return tp_permutation(balance_retrieval(retrieval, tp, alpha), tp)[0]
    return layout_and_permutation(retrieval)[0]


def timed(fn, *, warmup: int, iters: int, sync=jax.block_until_ready) -> dict:
    """Runs fn() `warmup` times (the first one's time is the compile time), then times `iters`."""
    t = time.perf_counter()
    sync(fn())
    compile_s = time.perf_counter() - t
    for _ in range(warmup - 1):
        sync(fn())
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t)
    return {"median_s": statistics.median(times), "min_s": min(times), "runs": len(times),
            "first_call_s": compile_s, "times_s": times}


def copy_bandwidth(gib: float = 2.0) -> float:
    """Bytes/s of a device copy (read + write counted), the bandwidth ceiling of this run."""
    n = int(gib * (1 << 30) // 4)
    x = jax.random.normal(jax.random.key(0), (n,), jnp.float32)
    f = jax.jit(lambda a: a * 1.0001)
    r = timed(lambda: f(x), warmup=3, iters=10)
    del x
    return 2 * n * 4 / r["median_s"]


def matmul_tflops(n: int = 8192) -> float:
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    f = jax.jit(lambda x: x @ x)
    r = timed(lambda: f(a), warmup=3, iters=10)
    return 2 * n ** 3 / r["median_s"] / 1e12


def environment() -> dict:
    # the device copy of the tree has no .git: pass GIT_COMMIT=$(git rev-parse HEAD) with the command
    commit = os.environ.get("GIT_COMMIT", "")
    if not commit:
        try:
            out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
            commit = out if all(c in "0123456789abcdef" for c in out) and len(out) == 40 else ""
        except OSError:
            pass
    dev = jax.devices()[0]
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": getattr(dev, "device_kind", str(dev)), "backend": jax.default_backend(),
            "jax": jax.__version__, "git_commit": commit or "unknown"}


def write_json(path: str, obj: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=float)


def ratio(a, b):
    return None if (a is None or b is None or b == 0) else a / b


def param_bytes(params) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(params))


def qmatmul_order(order) -> mock._patch:
    """A patch (enter it, or `.start()` it) sending every 8-bit weight product of the decoder layer
    through the qmatmul implementations `order` (e.g. ("triton", "xla")) instead of the registry's
    default: bench/decode.py --qmatmul, bench/profile_decode.py's @tritongemm / @xlagemm."""
    return mock.patch.object(layer_lib, "qmatmul", functools.partial(ops_qmatmul, choice=OpChoice(tuple(order))))
