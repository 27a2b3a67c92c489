"""The weight GEMMs of a prefill chunk on CPU: XLA (jax) against torch, same process.

    python bench/cpu_gemm.py                          # SmolLM2 shapes, chunks of 512 and 2048 rows
    python bench/cpu_gemm.py --rows 512 --repeats 9 --out bench/results

Issue #17 asks for a CPU time to first token within 1.2x of Hugging Face's at 2K tokens. This
isolates the part of a prefill that is neither attention nor overhead: every layer's fused q/k/v,
o, gate/up and down products chained as the model runs them (a residual stream of `rows` tokens
through all layers, RMS-normalised before each block, SiLU-gated MLP, float32), once as one jitted XLA program and once as torch
ops, with the same weights. Both chains are checked to agree before anything is timed. Rounds
alternate between the two (a machine whose speed drifts weighs on both alike); the table gives
the median and best ms per chain, GFLOP/s, and torch's time over XLA's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import common  # noqa: F401  (repository root on sys.path)
from common import SHAPES, environment, log, write_json
from report import cpu_gemm_table

import jax
import jax.numpy as jnp
import numpy as np


def layer_shapes(shape: dict) -> list[tuple[int, int]]:
    """(in, out) of one layer's products as the engine runs them (q/k/v and gate/up fused)."""
    h, d, i = shape["hidden_size"], shape["head_dim"], shape["intermediate_size"]
    qkv = (shape["num_heads"] + 2 * shape["num_kv_heads"]) * d
    return [(h, qkv), (shape["num_heads"] * d, h), (h, 2 * i), (i, h)]


def flops(shape: dict, rows: int, layers: int) -> int:
    return 2 * rows * layers * sum(a * b for a, b in layer_shapes(shape))


def make_weights(shape: dict, layers: int, seed: int = 0) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [[(rng.standard_normal(s, dtype=np.float32) / np.sqrt(s[0])).astype(np.float32)
             for s in layer_shapes(shape)] for _ in range(layers)]


def jax_chain(shape: dict):
    """jitted (x [rows, hidden], weights) -> x after every layer's products."""
    hq = shape["num_heads"] * shape["head_dim"]
    inter = shape["intermediate_size"]

    @jax.jit
    def run(x, weights):
        def norm(v):
            return v * jax.lax.rsqrt(jnp.mean(v * v, axis=-1, keepdims=True) + 1e-5)

        for wqkv, wo, wgu, wd in weights:
            a = norm(x) @ wqkv
            x = x + jnp.tanh(a[:, :hq]) @ wo  # stands in for attention: the q columns, bounded
            gu = norm(x) @ wgu
            x = x + (jax.nn.silu(gu[:, :inter]) * gu[:, inter:]) @ wd
        return x

    return run


def torch_chain(shape: dict, torch):
    hq = shape["num_heads"] * shape["head_dim"]
    inter = shape["intermediate_size"]
    f = torch.nn.functional

    def norm(v):
        return v * torch.rsqrt(torch.mean(v * v, dim=-1, keepdim=True) + 1e-5)

    def run(x, weights):
        with torch.inference_mode():
            for wqkv, wo, wgu, wd in weights:
                a = norm(x) @ wqkv
                x = x + torch.tanh(a[:, :hq]) @ wo
                gu = norm(x) @ wgu
                x = x + (f.silu(gu[:, :inter]) * gu[:, inter:]) @ wd
            return x

    return run


def measure(shape_name: str, rows: list[int], layers: int | None, repeats: int, threads: int | None) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    shape = SHAPES[shape_name]
    layers = layers or shape["num_layers"]
    w_np = make_weights(shape, layers)
    w_jax = [[jnp.asarray(w) for w in layer] for layer in w_np]
    w_torch = [[torch.from_numpy(w) for w in layer] for layer in w_np]
    run_jax, run_torch = jax_chain(shape), torch_chain(shape, torch)
    points = []
    for n in rows:
        x = np.random.default_rng(1).standard_normal((n, shape["hidden_size"]), dtype=np.float32)
        xj, xt = jnp.asarray(x), torch.from_numpy(x)
        a = np.asarray(run_jax(xj, w_jax))  # compiles
        b = run_torch(xt, w_torch).numpy()
        err = float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))
        if not err < 1e-3:
            raise SystemExit(f"the XLA and torch chains disagree at {n} rows (max relative error {err:.2e})")
        times = {"xla": [], "torch": []}
        for _ in range(repeats):
            t = time.perf_counter()
            run_jax(xj, w_jax).block_until_ready()
            times["xla"].append(time.perf_counter() - t)
            t = time.perf_counter()
            run_torch(xt, w_torch)
            times["torch"].append(time.perf_counter() - t)
        fl = flops(shape, n, layers)
        point = {"rows": n, "layers": layers, "flops": fl, "max_rel_err": err}
        for k, ts in times.items():
            point[k] = {"median_s": statistics.median(ts), "min_s": min(ts), "runs_s": ts,
                        "gflops_median": fl / statistics.median(ts) / 1e9}
        point["torch_over_xla_median"] = point["torch"]["median_s"] / point["xla"]["median_s"]
        log(f"{n} rows: xla {point['xla']['median_s'] * 1e3:.1f} ms, torch {point['torch']['median_s'] * 1e3:.1f} ms "
            f"(torch / xla {point['torch_over_xla_median']:.2f})")
        points.append(point)
    return {"env": environment(), "shape": shape_name, "torch_threads": torch.get_num_threads(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "points": points}


def positive_ints(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        vals = []
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return vals


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES), help="model shape (default: SmolLM2)")
    p.add_argument("--rows", type=positive_ints, default=[512, 2048],
                   help="tokens per chunk, comma-separated (default 512,2048: the CPU prefill chunk and a 2K prompt)")
    p.add_argument("--layers", type=int, help="layers chained (default: the shape's)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per row count (default 5)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--out", help="folder for cpu_gemm-<date>.json (default: print only)")
    p.add_argument("--tag", default="", help="suffix of the JSON name")
    args = p.parse_args(argv)
    for flag in ("layers", "repeats", "threads"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if jax.default_backend() != "cpu":
        log(f"note: jax runs on {jax.default_backend()}, torch on the CPU: run with JAX_PLATFORMS=cpu to compare CPUs")
    res = measure(args.shape, args.rows, args.layers, args.repeats, args.threads)
    if args.out:  # the results first: a closed pipe below loses only the table
        path = os.path.join(args.out, f"cpu_gemm-{res['env']['date'][:10]}{args.tag}.json")
        try:
            write_json(path, res)
        except OSError as e:
            raise SystemExit(f"cpu_gemm: cannot write {path}: {e.strerror or e}") from None
        log(f"wrote {path}")
    try:
        print("\n".join(cpu_gemm_table(res["points"])))
    except BrokenPipeError:  # `... | head`: stop quietly, as the generate CLI does
        from lserve_jax.generate import _silence_stdout

        _silence_stdout()
    return 0


if __name__ == "__main__":
    sys.exit(main())
