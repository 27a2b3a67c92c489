"""One layer of LServe sparse decode attention on the GPU: tuning and timings.

Run (H200, one command):  PYTHONUNBUFFERED=1 python bench/decode_attn.py --out $OUT

llama3-8b head shape (Hq=32, Hkv=8, D=128, bf16), half the KV heads streaming (R=4, S=4),
page 64 / logical page 16, budget 4096 tokens (64 pages), ring 128 + 256. Correctness on the
GPU is a test: `pytest -m gpu tests/test_decode_kernel.py tests/test_selection.py`. Sections
(each guarded by a time budget; the JSON is rewritten after each one):
  1. ceilings: a 2 GiB device copy (read + write bytes / time);
  2. tuning at 128K x B=4 and 256K x B=1: pages per block, num_warps, num_stages, split size
     (retrieval kernel, both modes), page-score chunk, dense paged kernel;
  3. contexts {32K, 64K, 128K, 256K} x batch {1, 4, 16}: selection alone, attention alone,
     selection + attention (both modes), our kernel with every page selected (8 KV heads),
     cuDNN and XLA dense over a contiguous cache. Bytes read / time as a fraction of the copy
     bandwidth. Timing (`bench`): one executable runs the op 8 times on 8 different queries (as
     a model step runs layer after layer); >= 3 warm-ups, then the median of 10 samples, each
     sample = n back-to-back executions ended by block_until_ready, divided by 8n. Host dispatch
     overhead hides behind the device, which it did not with one op per dispatch (~80 us floor).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from lserve_jax.ops import OpChoice  # noqa: E402
from lserve_jax.ops.decode import decode_attention, dense_decode_attention, retrieval_slots  # noqa: E402
from lserve_jax.pallas.decode import paged_decode  # noqa: E402
from lserve_jax.pallas.page_scores import page_scores, page_scores_reference  # noqa: E402
from lserve_jax.selection import select_pages  # noqa: E402

HQ, HKV, D = 32, 8, 128
R, S = 4, 4
G = HQ // HKV
PAGE, LP = 64, 16
BUDGET = 4096
KSEL = BUDGET // PAGE
SINK, LOCAL = 128, 256
W = SINK + LOCAL
DT = jnp.bfloat16
INTERVAL = 4  # selector_interval: selection cost amortised over 4 steps

T0 = time.perf_counter()
RESULTS: dict = {}
OUT = None


def log(*a):
    print(f"[{time.perf_counter() - T0:7.1f}s]", *a, flush=True)


def left(deadline):
    return deadline - (time.perf_counter() - T0)


def save():
    if OUT:
        os.makedirs(OUT, exist_ok=True)
        with open(os.path.join(OUT, "decode_attn.json"), "w") as f:
            json.dump(RESULTS, f, indent=1, default=str)


def bench(fn, args, *, reps=8, warmup=3, samples=10, min_sample_s=5e-3):
    """Median device-side seconds per call of fn(*args).

    One jitted executable runs fn `reps` times on `reps` different first arguments (the query;
    distinct so nothing is CSE'd), as a model step runs one layer after another; executions are
    queued back to back (C++ dispatch path) so host overhead hides behind the device. A sample is
    n executions ended by block_until_ready; per call = sample / (n * reps).
    """
    q0, rest = args[0], tuple(args[1:])
    keys = jax.random.split(jax.random.PRNGKey(99), reps)
    qs = [q0] + [jax.random.normal(k, q0.shape, q0.dtype) if jnp.issubdtype(q0.dtype, jnp.floating)
                 else q0 for k in keys[1:]]
    multi = jax.jit(lambda qs, rest: [fn(q, *rest) for q in qs])
    t = time.perf_counter()
    jax.block_until_ready(multi(qs, rest))
    compile_s = time.perf_counter() - t  # compile + first run
    t = time.perf_counter()
    for _ in range(warmup):
        jax.block_until_ready(multi(qs, rest))
    est = (time.perf_counter() - t) / warmup
    n = int(min(100, max(2, math.ceil(min_sample_s / max(est, 1e-6)))))
    ts = []
    for _ in range(samples):
        t = time.perf_counter()
        for _ in range(n):
            o = multi(qs, rest)
        jax.block_until_ready(o)
        ts.append((time.perf_counter() - t) / (n * reps))
    return dict(us=statistics.median(ts) * 1e6, min_us=min(ts) * 1e6, compile_s=compile_s,
                execs_per_sample=n, reps=reps, samples=samples)


# ----------------------------------------------------------------------------------------------
# Inputs


def make_layer(t, b, *, r=R, s=S, seed=0, dense_r=0):
    """A full cache of t tokens per sequence (lengths t - 5: a partly filled newest page)."""
    n = t // PAGE
    p = b * n + 1  # page 0 is the scratch page
    ks = jax.random.split(jax.random.PRNGKey(seed), 10)
    pt = (1 + jax.random.permutation(ks[0], b * n)).reshape(b, n).astype(jnp.int32)
    lay = dict(
        q=jax.random.normal(ks[1], (b, HQ, D), DT),
        page_table=pt,
        lengths=jnp.full((b,), t - 5, jnp.int32),
        ring_k=jax.random.normal(ks[2], (s, b, W, D), DT),
        ring_v=jax.random.normal(ks[3], (s, b, W, D), DT),
    )
    hr = max(r, dense_r)
    kp = jax.random.normal(ks[4], (hr, p, PAGE, D), DT)
    vp = jax.random.normal(ks[5], (hr, p, PAGE, D), DT)
    if dense_r:
        lay["k_pages8"], lay["v_pages8"] = kp, vp
    lay["k_pages"], lay["v_pages"] = kp[:r], vp[:r]
    kmin = jax.random.normal(ks[6], (r, p, PAGE // LP, D), DT)
    lay["k_min"] = kmin
    lay["k_max"] = (kmin + jnp.abs(jax.random.normal(ks[7], kmin.shape, DT))).astype(DT)
    return jax.block_until_ready(lay)


def selection_for(lay, mode):
    f = jax.jit(functools.partial(select_pages, max_pages=KSEL, mode=mode, page_size=PAGE))
    return jax.block_until_ready(f(lay["q"][:, :R * G], lay["k_min"], lay["k_max"],
                                   lay["page_table"], lay["lengths"]))


def dense_selection(lay, r):
    b, n = lay["page_table"].shape
    sel = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, r, n))
    cnt = jnp.broadcast_to(((lay["lengths"] + PAGE - 1) // PAGE)[:, None], (b, r)).astype(jnp.int32)
    return sel, cnt


# ----------------------------------------------------------------------------------------------
# Variants: functions of arrays only (options closed over)


def f_select(mode, score_opts=None):
    """Selection through the page-score default order, with the kernel's options."""
    def f(q, kmin, kmax, pt, ln):
        return select_pages(q[:, :R * G], kmin, kmax, pt, ln, max_pages=KSEL, mode=mode,
                            page_size=PAGE, choice=OpChoice.from_options(score_opts))
    return f


def f_attn(mode, opts=None):
    """Sparse attention through the Triton kernel with these options."""
    def f(q, kp, vp, rk, rv, pt, ln, sel, cnt):
        return decode_attention(q, kp, vp, rk, rv, pt, ln, sel, cnt, mode=mode,
                                choice=OpChoice.from_options(opts, impls=("triton",)))
    return f


def f_step(mode, opts=None, score_opts=None):
    def f(q, kp, vp, rk, rv, kmin, kmax, pt, ln):
        sel, cnt = f_select(mode, score_opts)(q, kmin, kmax, pt, ln)
        return f_attn(mode, opts)(q, kp, vp, rk, rv, pt, ln, sel, cnt)
    return f


def f_kernel(opts):
    """The retrieval paged_decode call alone (inputs prepared outside)."""
    def f(qh, kp, vp, phys, lg, cnt, ln):
        return paged_decode(qh, kp, vp, phys, lg, cnt, ln, **(opts or {}))
    return f


def kernel_args(lay, mode, sel, cnt):
    qh, phys, lg = retrieval_slots(lay["q"], lay["page_table"], sel, mode=mode, g=G)
    return jax.block_until_ready((qh, lay["k_pages"], lay["v_pages"], phys, lg, cnt, lay["lengths"]))


def attn_args(lay, sel, cnt):
    return (lay["q"], lay["k_pages"], lay["v_pages"], lay["ring_k"], lay["ring_v"],
            lay["page_table"], lay["lengths"], sel, cnt)


def dense_paged_args(lay):
    b = lay["q"].shape[0]
    sel, cnt = dense_selection(lay, HKV)
    ring0 = jnp.zeros((0, b, W, D), DT)
    return (lay["q"], lay["k_pages8"], lay["v_pages8"], ring0, ring0, lay["page_table"],
            lay["lengths"], sel, cnt)


# bytes read by each variant (K and V pages actually loaded; page stats; ring)
def bytes_attn(t, b, mode):
    sel_tokens = min(KSEL, t // PAGE) * PAGE
    heads = R * G if mode == "query_head" else R
    return b * heads * sel_tokens * D * 2 * 2 + b * S * min(W, t) * D * 2 * 2


def bytes_select(t, b):
    return b * R * (t // LP) * D * 2 * 2


def bytes_dense(t, b):
    return b * HKV * t * D * 2 * 2


# ----------------------------------------------------------------------------------------------


def _git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except Exception:  # noqa: BLE001
        return "unknown"


def sec_env(args):
    dev = jax.devices()[0]
    RESULTS["env"] = dict(device=str(dev), device_kind=getattr(dev, "device_kind", "?"),
                          backend=jax.default_backend(), jax=jax.__version__, git_commit=_git_commit(),
                          date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                          knobs=dict(HQ=HQ, HKV=HKV, D=D, R=R, S=S, page=PAGE, logical_page=LP,
                                     budget=BUDGET, sink=SINK, local=LOCAL, dtype="bfloat16",
                                     selector_interval=INTERVAL),
                          argv=sys.argv[1:])
    log("env", RESULTS["env"])


def sec_copy(args):
    """Device bandwidth: a plain 2 GiB copy and an elementwise x + 1 (bytes read + written)."""
    n = (2 ** 30) if not args.quick else 2 ** 20
    x = jax.random.normal(jax.random.PRNGKey(3), (n,), DT)
    out = {}
    for name, fn in (("copy", jnp.copy), ("add", lambda x: x + 1)):
        r = bench(fn, (x,), reps=1)
        out[name] = dict(bytes=2 * x.nbytes, us=r["us"], tb_s=2 * x.nbytes / (r["us"] * 1e-6) / 1e12)
    bw = max(v["tb_s"] for v in out.values()) * 1e12  # the higher: fractions err on the low side
    RESULTS["copy"] = dict(out, reference_tb_s=bw / 1e12)
    log("copy", RESULTS["copy"])
    del x
    return bw


def _tune(key, fn_of_opts, args_, nbytes, deadline, split_trials):
    """Coordinate descent: (pages per block x warps), then stages, then split sizes."""
    rows = []

    def trial(opts):
        if left(deadline) < 20:
            return
        try:
            r = bench(fn_of_opts(opts), args_, samples=5)
            r.update(opts=opts, tb_s=nbytes / (r["us"] * 1e-6) / 1e12)
        except Exception as ex:  # noqa: BLE001
            r = dict(opts=opts, error=f"{type(ex).__name__}: {ex}"[:500])
        rows.append(r)
        log("tune", key, {k: r.get(k) for k in ("us", "tb_s", "opts", "error")})

    def best():
        ok = [r for r in rows if "us" in r]
        return min(ok, key=lambda r: r["us"]) if ok else None

    for ppb in (1, 2, 4):
        for nw in (4, 8):
            trial(dict(pages_per_block=ppb, num_warps=nw, num_stages=2))
    if best() is None:
        return rows, None
    base = best()["opts"]
    for ns in (1, 3, 4):
        trial({**base, "num_stages": ns})
    base = best()["opts"]
    for extra in split_trials:
        trial({**base, **extra})
    return rows, best()


SPARSE_SPLITS = [dict(min_split_tokens=m) for m in (128, 256, 1024)] + [
    dict(min_split_tokens=128, target_programs=t) for t in (528, 1056)]
DENSE_SPLITS = [dict(target_programs=t) for t in (528, 1056, 2112)]


def sec_tune(args, deadline):
    """Returns {key: best options}: T{t}_B{b}_{mode} kernel options, 'dense', 'scores_T.._B..'."""
    res = RESULTS.setdefault("tuning", {})
    best = {}
    configs = [(131072, 4), (262144, 1)] if not args.quick else [(2048, 2)]
    for (t, b) in configs:
        if left(deadline) < 40:
            log("tuning: out of time")
            break
        lay = make_layer(t, b, seed=2)
        for mode in ("query_head", "kv_head"):
            key = f"T{t}_B{b}_{mode}"
            sel, cnt = selection_for(lay, mode)
            ka = kernel_args(lay, mode, sel, cnt)
            nbytes = bytes_attn(t, b, mode) - b * S * min(W, t) * D * 4
            rows, b_row = _tune(key, f_kernel, ka, nbytes, deadline, SPARSE_SPLITS)
            res[key] = dict(rows=rows, best=b_row)
            if b_row:
                best[key] = b_row["opts"]
            save()
        # page-score kernel: chunk x warps vs the jnp scores
        sc_rows = []
        sargs = (lay["q"][:, :R * G], lay["k_min"], lay["k_max"], lay["page_table"], lay["lengths"])
        nb = bytes_select(t, b)
        variants = [("jnp", None)] + [(f"pallas_c{c}_w{w}", dict(chunk=c, num_warps=w))
                                      for c in (8, 16, 32) for w in (4, 8)]
        for name, o in variants:
            if left(deadline) < 20:
                break
            if o is None:
                fn = lambda q, a, b_, pt, ln: page_scores_reference(q, a, b_, pt)
            else:
                fn = functools.partial(lambda q, a, b_, pt, ln, o: page_scores(q, a, b_, pt, ln, page_size=PAGE, **o),
                                       o=o)
            try:
                r = bench(fn, sargs, samples=5)
                r.update(variant=name, opts=o, tb_s=nb / (r["us"] * 1e-6) / 1e12)
            except Exception as ex:  # noqa: BLE001
                r = dict(variant=name, error=f"{type(ex).__name__}: {ex}"[:500])
            sc_rows.append(r)
            log("tune scores", t, b, {k: r.get(k) for k in ("variant", "us", "tb_s", "error")})
        ok = [r for r in sc_rows if "us" in r and r["variant"] != "jnp"]
        b_row = min(ok, key=lambda r: r["us"]) if ok else None
        res[f"T{t}_B{b}_scores"] = dict(rows=sc_rows, best=b_row)
        if b_row:
            best[f"scores_T{t}_B{b}"] = b_row["opts"]
        del lay
        # dense paged kernel (every page, 8 kv heads), only at the first config
        if (t, b) == configs[0] and left(deadline) > 40:
            lay = make_layer(t, b, seed=3, dense_r=HKV)
            sel, cnt = dense_selection(lay, HKV)
            qh, phys, lg = retrieval_slots(lay["q"], lay["page_table"], sel, mode="kv_head", g=G)
            da = (qh, lay["k_pages8"], lay["v_pages8"], phys, lg, cnt, lay["lengths"])
            rows, b_row = _tune("dense", f_kernel, da, bytes_dense(t, b), deadline, DENSE_SPLITS)
            res["dense_paged"] = dict(rows=rows, best=b_row)
            if b_row:
                best["dense"] = b_row["opts"]
            del lay, da
        save()
    return best


def sec_grid(args, deadline, best, copy_bw):
    rows = RESULTS.setdefault("grid", [])
    if args.quick:
        order = [(1024, 1), (2048, 2)]
    else:  # the targets first, then the rest
        order = [(131072, 4), (262144, 1), (32768, 16), (65536, 4), (32768, 1), (65536, 1),
                 (131072, 1), (32768, 4), (65536, 16), (262144, 4), (131072, 16), (262144, 16)]
    for (t, b) in order:
        if left(deadline) < 40:
            log("grid: out of time before", t, b)
            break
        rec = dict(T=t, B=b)
        try:
            lay = make_layer(t, b, seed=4, dense_r=HKV)
        except Exception as ex:  # noqa: BLE001
            rec["error"] = f"alloc: {type(ex).__name__}: {ex}"[:500]
            rows.append(rec)
            continue
        tuned_key = "T262144_B1" if b == 1 else "T131072_B4"

        def run(name, fn, a, nbytes):
            if left(deadline) < 20:
                return
            try:
                r = bench(fn, a)
                r["bytes"] = nbytes
                r["bw_frac"] = nbytes / (r["us"] * 1e-6) / copy_bw
                rec[name] = r
            except Exception as ex:  # noqa: BLE001
                rec[name] = dict(error=f"{type(ex).__name__}: {ex}"[:500])
                traceback.print_exc()

        sargs = (lay["q"], lay["k_min"], lay["k_max"], lay["page_table"], lay["lengths"])
        sopts = best.get(f"scores_{tuned_key}")
        for mode, tag in (("query_head", "qh"), ("kv_head", "kv")):
            opts = best.get(f"{tuned_key}_{mode}")
            sel, cnt = selection_for(lay, mode)
            run(f"sel_{tag}", f_select(mode, score_opts=sopts), sargs, bytes_select(t, b))
            run(f"attn_{tag}", f_attn(mode, opts), attn_args(lay, sel, cnt), bytes_attn(t, b, mode))
            run(f"step_{tag}", f_step(mode, opts, sopts),
                (lay["q"], lay["k_pages"], lay["v_pages"], lay["ring_k"], lay["ring_v"], lay["k_min"],
                 lay["k_max"], lay["page_table"], lay["lengths"]), bytes_attn(t, b, mode) + bytes_select(t, b))
        run("dense_paged", f_attn("kv_head", best.get("dense")), dense_paged_args(lay), bytes_dense(t, b))
        del lay
        ks = jax.random.split(jax.random.PRNGKey(5), 3)
        q = jax.random.normal(ks[0], (b, HQ, D), DT)
        kc = jax.random.normal(ks[1], (b, t, HKV, D), DT)
        vc = jax.random.normal(ks[2], (b, t, HKV, D), DT)
        ln = jnp.full((b,), t - 5, jnp.int32)
        impls = ("cudnn", "xla") if jax.default_backend() == "gpu" else ("xla",)
        for impl in (impls if b * t <= 2 ** 19 else impls[:1]):  # XLA only where it is cheap
            run(impl, functools.partial(dense_decode_attention, implementation=impl), (q, kc, vc, ln),
                bytes_dense(t, b))
        del kc, vc
        # amortised sparse step: attention every step + selection every INTERVAL steps
        for tag in ("qh", "kv"):
            if "us" in rec.get(f"attn_{tag}", {}) and "us" in rec.get(f"sel_{tag}", {}):
                rec[f"amort_{tag}_us"] = rec[f"attn_{tag}"]["us"] + rec[f"sel_{tag}"]["us"] / INTERVAL
                if "us" in rec.get("cudnn", {}):
                    rec[f"speedup_{tag}_vs_cudnn"] = rec["cudnn"]["us"] / rec[f"amort_{tag}_us"]
        rows.append(rec)
        log("grid", json.dumps({k: (v["us"] if isinstance(v, dict) and "us" in v else v) for k, v in rec.items()}))
        save()


def table():
    hdr = ("T", "B", "sel_qh", "sel_kv", "attn_qh", "attn_kv", "step_qh", "step_kv", "amort_qh", "amort_kv",
           "dense_pg", "cudnn", "xla", "x_qh", "x_kv", "bw_att_qh", "bw_att_kv", "bw_dpg", "bw_cudnn")
    lines = [" ".join(f"{h:>9}" for h in hdr)]

    def us(rec, k):
        v = rec.get(k, {})
        return f"{v['us']:9.1f}" if isinstance(v, dict) and "us" in v else f"{'-':>9}"

    def fr(rec, k):
        v = rec.get(k, {})
        return f"{v['bw_frac']:9.2f}" if isinstance(v, dict) and "bw_frac" in v else f"{'-':>9}"

    def num(rec, k, f="9.1f"):
        return format(rec[k], f) if k in rec else f"{'-':>9}"

    for rec in sorted(RESULTS.get("grid", []), key=lambda r: (r["T"], r["B"])):
        lines.append(" ".join([f"{rec['T'] // 1024:>8}K", f"{rec['B']:9d}"]
                              + [us(rec, k) for k in ("sel_qh", "sel_kv", "attn_qh", "attn_kv", "step_qh",
                                                       "step_kv")]
                              + [num(rec, "amort_qh_us"), num(rec, "amort_kv_us")]
                              + [us(rec, k) for k in ("dense_paged", "cudnn", "xla")]
                              + [num(rec, "speedup_qh_vs_cudnn", "9.2f"), num(rec, "speedup_kv_vs_cudnn", "9.2f")]
                              + [fr(rec, k) for k in ("attn_qh", "attn_kv", "dense_paged", "cudnn")]))
    return "\n".join(lines)


def main(argv=None):
    global OUT
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT"), help="folder for decode_attn.json")
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke test)")
    ap.add_argument("--skip-tune", action="store_true")
    args = ap.parse_args(argv)
    OUT = args.out
    sec_env(args)
    copy_bw = sec_copy(args)
    save()
    best = {}
    if not args.skip_tune:
        best = sec_tune(args, deadline=args.budget * 0.42)
    RESULTS["tuned"] = best
    log("tuned", best)
    save()
    sec_grid(args, args.budget, best, copy_bw)
    save()
    tab = table()
    RESULTS["table"] = tab
    save()
    print("\ntimes in us; x_* = cuDNN / amortised sparse (attention + selection/4); bw_* = bytes read / "
          "time / copy bandwidth")
    print(tab)


if __name__ == "__main__":
    main()
