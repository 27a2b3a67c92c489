"""One layer of LServe prefill attention on the GPU: tuning and timings.

Run (H200, one command):  PYTHONUNBUFFERED=1 python bench/prefill_attn.py --out $OUT

Correctness on the GPU is a test: `pytest -m gpu tests/test_prefill_kernel.py`. Sections (each
guarded by a time budget; the JSON is rewritten after each one):
  1. ceilings: bf16 8192^3 matmul, 2 GiB device copy;
  2. tuning: block_m / block_k / num_warps / num_stages on the dense kernel (T=16K) and the
     streaming-only kernel (T=32K), llama3-8b head shape; the winners are the Triton options
     (`OpChoice.options`) of the timed variants that run the kernel on dense / streaming heads;
  3. one layer's attention, llama3-8b shape (Hq=32, Hkv=8, D=128, bf16, B=1), head pattern
     Llama-3-8B-Instruct-Gradient-1048k binarised at static_sparsity 0.5, sink 128 / local
     8192, T in {8K..256K}: sparse (the default order; also cuDNN+Triton and Triton alone), our
     kernel with every head dense, cuDNN dense; median of >= 10 after >= 3 warm-ups;
  4. every layer's retrieval count at 128K and 256K (layer-average sparse time).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import statistics
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from lserve_jax.ops import REGISTRY, OpChoice, prefill_attention  # noqa: E402
from lserve_jax.pallas import prefill as pf  # noqa: E402

PATTERN = os.path.join(ROOT, "bench", "patterns", "Llama-3-8B-Instruct-Gradient-1048k.tsv")
HQ, HKV, D = 32, 8, 128
SINK, LOCAL = 128, 8192

T0 = time.perf_counter()
RESULTS: dict = {}
# Triton options per head kind, {"dense": {...}, "streaming": {...}}: filled by the tuning
# section, empty = the kernel's default tiles
TUNED: dict[str, dict[str, int]] = {"dense": {}, "streaming": {}}


def log(*a):
    print(f"[{time.perf_counter() - T0:7.1f}s]", *a, flush=True)


def time_left(budget):
    return budget - (time.perf_counter() - T0)


def save(out_dir):
    if not out_dir:
        return
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "prefill_attn.json"), "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)


def retrieval_counts(path=PATTERN, sparsity=0.5):
    alpha = np.loadtxt(path)
    thr = np.quantile(alpha, sparsity)  # global quantile over [layers x kv_heads]
    return (alpha >= thr).sum(axis=1).astype(int), float(thr)


def make_inputs(t, b=1, hq=HQ, hkv=HKV, d=D, dtype=jnp.bfloat16, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(ks[0], (b, t, hq, d), dtype)
    k = jax.random.normal(ks[1], (b, t, hkv, d), dtype)
    v = jax.random.normal(ks[2], (b, t, hkv, d), dtype)
    lengths = jnp.full((b,), t, jnp.int32)
    return jax.block_until_ready((q, k, v, lengths))


def bench_fn(fn, args, warmup=3, iters=10):
    """Compile separately, then median of `iters` runs after `warmup` runs."""
    t = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    first_s = time.perf_counter() - t
    for _ in range(max(warmup - 1, 0)):
        jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append((time.perf_counter() - t) * 1e3)
    return dict(ms=statistics.median(times), min_ms=min(times), compile_s=compile_s,
                first_call_s=first_s, iters=iters, warmup=warmup)


def attn(impls, nr, tuned="streaming"):
    """One layer's prefill with these implementations (() = the default order) and the Triton
    options tuned for the head kind the kernel runs on (`tuned`)."""
    choice = OpChoice.from_options(TUNED[tuned], impls=impls)
    return functools.partial(prefill_attention, num_retrieval=nr, sink=SINK, local=LOCAL, choice=choice)


def causal_flops(t, hq=HQ, d=D):
    return 4.0 * t * t / 2 * d * hq


# ------------------------------------------------------------------------------------------

def _jaxlib_version():
    try:
        import jaxlib
        return jaxlib.__version__
    except Exception:  # noqa: BLE001
        return "?"


def sec_env():
    dev = jax.devices()[0]
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=5)
        commit = proc.stdout.strip()
        if proc.returncode != 0 or len(commit) != 40:
            commit = os.environ.get("LSERVE_COMMIT", "unknown (no .git on the device copy)")
    except Exception:  # noqa: BLE001
        commit = "unknown"
    RESULTS["env"] = dict(
        device=str(dev), device_kind=getattr(dev, "device_kind", "?"),
        backend=jax.default_backend(), jax=jax.__version__,
        jaxlib=_jaxlib_version(),
        git_commit=commit, date=datetime.datetime.now(datetime.UTC).isoformat(),
        python=sys.version.split()[0])
    log("env", RESULTS["env"])


def sec_ceilings():
    n = 8192
    a = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.bfloat16)
    bm = jax.random.normal(jax.random.PRNGKey(2), (n, n), jnp.bfloat16)
    r = bench_fn(lambda x, y: x @ y, (a, bm), warmup=3, iters=10)
    mm = 2 * n ** 3 / (r["ms"] * 1e-3) / 1e12
    x = jax.random.normal(jax.random.PRNGKey(3), (2 ** 30,), jnp.bfloat16)  # 2 GiB
    rc = bench_fn(lambda x: x * 2, (x,), warmup=3, iters=10)
    bw = 2 * x.nbytes / (rc["ms"] * 1e-3) / 1e12
    RESULTS["ceilings"] = dict(matmul_8192_tflops=mm, copy_2gib_tb_s=bw)
    log("ceilings", RESULTS["ceilings"])
    del a, bm, x


# Run a (2026-12-01a) swept 11 configs on both modes; 128x128 / 8 warps / 3 stages won both.
# This list refines around it (the dense sweep is short: auto sends dense heads to cuDNN).
TUNE_CONFIGS = {
    "dense": [(128, 128, 8, 3), (128, 64, 8, 3), (256, 64, 8, 3), (128, 128, 8, 4)],
    "streaming": [
        (128, 128, 8, 3), (128, 128, 8, 4), (128, 64, 8, 3), (256, 128, 8, 3),
        (256, 64, 8, 3), (256, 128, 8, 2), (64, 128, 4, 4), (128, 256, 8, 2),
    ],
}


def sec_tune(budget):
    res = {}
    for mode, t, nr in (("dense", 16384, HKV), ("streaming", 32768, 0)):
        q, k, v, lengths = make_inputs(t)
        rows = []
        for (bm, bk, nw, ns) in TUNE_CONFIGS[mode]:
            if time_left(budget) < 60:
                log("tune: out of time")
                break
            cfg = dict(block_m=bm, block_k=bk, num_warps=nw, num_stages=ns)
            fn = functools.partial(pf.prefill_attention_pallas, num_retrieval=nr, sink=SINK,
                                   local=LOCAL, **cfg)
            try:
                r = bench_fn(fn, (q, k, v, lengths), warmup=2, iters=5)
                r.update(cfg)
                if mode == "dense":
                    r["tflops"] = causal_flops(t) / (r["ms"] * 1e-3) / 1e12
            except Exception as ex:  # noqa: BLE001
                r = dict(cfg, error=f"{type(ex).__name__}: {ex}"[:1000])
            log("tune", mode, r)
            rows.append(r)
        ok = [r for r in rows if "ms" in r]
        best = min(ok, key=lambda r: r["ms"]) if ok else None
        res[mode] = dict(T=t, rows=rows, best=best)
        if best:
            TUNED[mode] = {k_: best[k_] for k_ in ("block_m", "block_k", "num_warps", "num_stages")}
        del q, k, v
    RESULTS["tuning"] = res
    RESULTS["block_config_used"] = {m: dict(o) for m, o in TUNED.items()}
    log("tuned", TUNED)


def sec_layer_times(budget, t_list, nr_mean):
    rows = []
    RESULTS["layer_times"] = rows
    for t in t_list:
        dense_est_s = 1.1e-3 * (t / 8192) ** 2 * 1.4  # rough cuDNN-based estimate, our kernel
        if time_left(budget) < 25 * dense_est_s + 30:
            log(f"layer_times: skip T={t} (time)")
            continue
        q, k, v, lengths = make_inputs(t)
        order = REGISTRY.default_order("prefill")
        row = dict(T=t, num_retrieval=nr_mean, auto_choice=order[0], default_order=list(order))
        variants = [  # names kept from earlier records ("pallas" = the Triton kernel)
            ("cudnn_dense", attn(("cudnn",), HKV)),
            ("pallas_dense", attn(("triton",), HKV, tuned="dense")),
            ("sparse_auto", attn((), nr_mean)),
            ("sparse_pallas", attn(("triton",), nr_mean, tuned="dense")),
            ("sparse_cudnn+pallas", attn(("cudnn+triton",), nr_mean)),
            ("streaming_only_pallas", attn(("triton",), 0)),
        ]
        for name, fn in variants:
            if name == "sparse_cudnn+pallas" and row["auto_choice"] == "cudnn+triton":
                continue  # same as sparse_auto
            try:
                r = bench_fn(fn, (q, k, v, lengths))
            except Exception as ex:  # noqa: BLE001
                r = dict(error=f"{type(ex).__name__}: {ex}"[:1000])
                traceback.print_exc()
            row[name] = r
            log("time", t, name, {k_: (round(v_, 3) if isinstance(v_, float) else v_)
                                  for k_, v_ in r.items()})
        c = row.get("cudnn_dense", {}).get("ms")
        if c:
            for name in ("pallas_dense", "sparse_auto", "sparse_pallas", "sparse_cudnn+pallas"):
                if "ms" in row.get(name, {}):
                    row[name]["speedup_vs_cudnn"] = c / row[name]["ms"]
            row["cudnn_dense"]["tflops"] = causal_flops(t) / (c * 1e-3) / 1e12
        if "ms" in row.get("pallas_dense", {}):
            row["pallas_dense"]["tflops"] = causal_flops(t) / (row["pallas_dense"]["ms"] * 1e-3) / 1e12
        rows.append(row)
        del q, k, v


def sec_layer_sweep(budget, t, counts, key="layer_sweep"):
    uniq = sorted(set(int(c) for c in counts))
    q, k, v, lengths = make_inputs(t)
    per = {}
    for c in uniq:
        if time_left(budget) < (20 if t <= 131072 else 30):
            log("sweep: out of time")
            break
        try:
            per[c] = bench_fn(attn((), c), (q, k, v, lengths))["ms"]
        except Exception as ex:  # noqa: BLE001
            per[c] = None
            log("sweep error", c, ex)
        log("sweep", t, c, per[c])
    res = dict(T=t, ms_by_count=per)
    if all(per.get(int(c)) for c in counts):
        res["layer_mean_ms"] = float(np.mean([per[int(c)] for c in counts]))
    c = next((r.get("cudnn_dense", {}).get("ms") for r in RESULTS.get("layer_times", [])
              if r["T"] == t), None)
    if c and res.get("layer_mean_ms"):
        res["cudnn_dense_ms"] = c
        res["layer_mean_speedup_vs_cudnn"] = c / res["layer_mean_ms"]
    RESULTS[key] = res
    del q, k, v


def table():
    lines = ["", "T      | cuDNN dense | Pallas dense (TF/s)   | sparse auto (x cuDNN) | "
             "sparse pallas | sparse cudnn+pallas | streaming-only"]
    for row in RESULTS.get("layer_times", []):
        def g(n, key="ms"):
            r = row.get(n, {})
            return r.get(key) if isinstance(r, dict) else None

        def f(x, fmt="{:9.2f}"):
            return fmt.format(x) if x is not None else "      n/a"
        lines.append(
            f"{row['T']:6d} | {f(g('cudnn_dense'))} ms | {f(g('pallas_dense'))} ms "
            f"({f(g('pallas_dense', 'tflops'), '{:5.0f}')}) | {f(g('sparse_auto'))} ms "
            f"({f(g('sparse_auto', 'speedup_vs_cudnn'), '{:4.2f}')}x) | {f(g('sparse_pallas'))} | "
            f"{f(g('sparse_cudnn+pallas'))} | {f(g('streaming_only_pallas'))}")
    for key in ("layer_sweep", "layer_sweep_256k"):
        sw = RESULTS.get(key)
        if sw:
            per = {c: round(m, 1) for c, m in sw["ms_by_count"].items() if m}
            lines.append(f"layer sweep T={sw['T']}: ms by retrieval count {per}, layer mean "
                         f"{sw.get('layer_mean_ms')} ms, x cuDNN {sw.get('layer_mean_speedup_vs_cudnn')}")
    tu = RESULTS.get("tuning", {})
    for mode, r in tu.items():
        if r.get("best"):
            b = r["best"]
            lines.append(f"tuned {mode} (T={r['T']}): block_m={b['block_m']} block_k={b['block_k']} "
                         f"warps={b['num_warps']} stages={b['num_stages']} -> {b['ms']:.2f} ms")
    print("\n".join(lines), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", ""))
    ap.add_argument("--budget", type=float, default=470.0, help="seconds for the whole run")
    ap.add_argument("--t", default="8192,16384,32768,65536,131072,262144")
    ap.add_argument("--skip", default="", help="comma list: ceilings,tune,times,sweep,sweep256")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    counts, thr = retrieval_counts()
    nr_mean = int(round(counts.mean()))
    RESULTS["knobs"] = dict(Hq=HQ, Hkv=HKV, D=D, dtype="bfloat16", batch=1, sink=SINK,
                            local=LOCAL, static_sparsity=0.5, threshold=thr,
                            retrieval_counts=counts.tolist(), mean_count=float(counts.mean()),
                            timed_count=nr_mean, pattern=os.path.basename(PATTERN))
    sections = [
        ("env", sec_env),
        ("ceilings", sec_ceilings),
        ("tune", lambda: sec_tune(args.budget)),
        ("times", lambda: sec_layer_times(args.budget, [int(x) for x in args.t.split(",")],
                                          nr_mean)),
        ("sweep", lambda: sec_layer_sweep(args.budget, 131072, counts)),
        ("sweep256", lambda: sec_layer_sweep(args.budget, 262144, counts, key="layer_sweep_256k")),
    ]
    for name, fn in sections:
        if name in skip:
            continue
        try:
            fn()
        except Exception as ex:  # noqa: BLE001
            RESULTS.setdefault("errors", []).append(f"{name}: {type(ex).__name__}: {ex}"[:2000])
            traceback.print_exc()
        save(args.out)
    RESULTS["total_s"] = time.perf_counter() - T0
    save(args.out)
    table()


if __name__ == "__main__":
    main()
