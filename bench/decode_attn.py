"""One layer of LServe sparse decode attention on the GPU: correctness, tuning, timings.

Run (H200, one command):  PYTHONUNBUFFERED=1 python bench/decode_attn.py --out $OUT

llama3-8b head shape (Hq=32, Hkv=8, D=128, bf16), half the KV heads streaming (R=4, S=4),
page 64 / logical page 16, budget 4096 tokens (64 pages), ring 128 + 256. Sections (each
guarded by a time budget; the JSON is rewritten after each one):
  1. ceilings: a 2 GiB device copy (read + write bytes / time);
  2. correctness on the GPU: kernels vs their jnp references (both modes, ring, split-K),
     dense paged decode vs cuDNN over the same tokens, Pallas page scores vs jnp;
  3. tuning at 128K x B=4 and 256K x B=1: pages per block, num_warps, num_stages, split size
     (retrieval kernel, both modes), page-score chunk, dense paged kernel;
  4. contexts {32K, 64K, 128K, 256K} x batch {1, 4, 16}: selection alone, attention alone,
     selection + attention (both modes), our kernel with every page selected (8 KV heads),
     cuDNN and XLA dense over a contiguous cache. Bytes read / time as a fraction of the copy
     bandwidth. Timing: compile separately, >= 3 warm-ups, then the median of 10 samples, each
     sample = n back-to-back calls ended by block_until_ready, divided by n (n so that a sample
     lasts >= 2 ms: dispatch overhead hidden for these 10-100 us ops).
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

import numpy as np  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from lserve_jax.attention.decode import (  # noqa: E402
    _retrieval_args, decode_attention, dense_decode_attention)
from lserve_jax.pallas.decode import paged_decode  # noqa: E402
from lserve_jax.pallas.page_scores import page_scores  # noqa: E402
from lserve_jax.selection import page_scores_reference, select_pages  # noqa: E402

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


def rel_err(out, ref):
    out = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    ref = np.asarray(jnp.asarray(ref, jnp.float32), np.float64)
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def bench(fn, args, *, warmup=3, samples=10, min_sample_s=2e-3):
    """Compile separately; median seconds per call (see module docstring)."""
    t = time.perf_counter()
    comp = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(warmup):
        jax.block_until_ready(comp(*args))
    est = (time.perf_counter() - t) / warmup
    n = int(min(200, max(1, math.ceil(min_sample_s / max(est, 1e-6)))))
    ts = []
    for _ in range(samples):
        t = time.perf_counter()
        for _ in range(n):
            o = comp(*args)
        jax.block_until_ready(o)
        ts.append((time.perf_counter() - t) / n)
    return dict(us=statistics.median(ts) * 1e6, min_us=min(ts) * 1e6, compile_s=compile_s, inner=n,
                samples=samples)


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


def f_select(mode, impl="auto", **score_opts):
    def f(q, kmin, kmax, pt, ln):
        return select_pages(q[:, :R * G], kmin, kmax, pt, ln, max_pages=KSEL, mode=mode,
                            page_size=PAGE, impl=impl)
    if score_opts:  # a tuned Pallas scoring kernel followed by the same top-k
        from lserve_jax.selection import topk_pages

        def f(q, kmin, kmax, pt, ln):  # noqa: F811
            sc = page_scores(q[:, :R * G], kmin, kmax, pt, ln, page_size=PAGE, **score_opts)
            b = q.shape[0]
            sc = sc.max(axis=2) if mode == "kv_head" else sc.reshape(b, R * G, -1)
            return topk_pages(sc, ln, page_size=PAGE, max_pages=KSEL)
    return f


def f_attn(mode, opts=None, impl="pallas"):
    def f(q, kp, vp, rk, rv, pt, ln, sel, cnt):
        return decode_attention(q, kp, vp, rk, rv, pt, ln, sel, cnt, mode=mode, impl=impl,
                                kernel_options=opts)
    return f


def f_step(mode, opts=None):
    def f(q, kp, vp, rk, rv, kmin, kmax, pt, ln):
        sel, cnt = select_pages(q[:, :R * G], kmin, kmax, pt, ln, max_pages=KSEL, mode=mode,
                                page_size=PAGE)
        return decode_attention(q, kp, vp, rk, rv, pt, ln, sel, cnt, mode=mode, impl="pallas",
                                kernel_options=opts)
    return f


def f_kernel(opts):
    """The retrieval paged_decode call alone (inputs prepared outside)."""
    def f(qh, kp, vp, phys, lg, cnt, ln):
        return paged_decode(qh, kp, vp, phys, lg, cnt, ln, **(opts or {}))
    return f


def kernel_args(lay, mode, sel, cnt):
    qh, phys, lg = _retrieval_args(lay["q"], lay["page_table"], sel, mode=mode, r=R, g=G)
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
    n = (2 ** 30) if not args.quick else 2 ** 20
    x = jax.random.normal(jax.random.PRNGKey(3), (n,), DT)
    r = bench(lambda x: x + 1, (x,))
    bw = 2 * x.nbytes / (r["us"] * 1e-6)
    RESULTS["copy"] = dict(bytes=2 * x.nbytes, us=r["us"], tb_s=bw / 1e12)
    log("copy", RESULTS["copy"])
    return bw


def sec_correctness(args):
    out = []
    t = 8192 if not args.quick else 1024
    lay = make_layer(t, 2, seed=1, dense_r=HKV)
    lay["lengths"] = jnp.asarray([t - 5, t // 2 + 7], jnp.int32)  # second seq: ring wrapped, pages unused

    def check(name, fn, ref_fn, tol=1e-2):
        rec = dict(case=name)
        try:
            o = jax.block_until_ready(fn())
            ref = jax.block_until_ready(ref_fn())
            e = rel_err(o, ref)
            rec.update(rel_err=e, ok=bool(e <= tol), finite=bool(jnp.all(jnp.isfinite(o.astype(jnp.float32)))))
        except Exception as ex:  # noqa: BLE001
            rec.update(ok=False, error=f"{type(ex).__name__}: {ex}"[:3000])
            traceback.print_exc()
        log("check", rec)
        out.append(rec)

    for mode in ("query_head", "kv_head"):
        sel, cnt = selection_for(lay, mode)
        a = attn_args(lay, sel, cnt)
        for opts in (None, dict(pages_per_split=8, pages_per_block=2), dict(pages_per_block=4, num_warps=8)):
            check(f"sparse-{mode}-{opts}", lambda: jax.jit(f_attn(mode, opts))(*a),
                  lambda: jax.jit(f_attn(mode, impl="reference"))(*a))
    # dense paged (every page, 8 kv heads) vs cuDNN / XLA over the same tokens gathered contiguous
    a = dense_paged_args(lay)
    b, n = lay["page_table"].shape

    def contiguous(pages):  # [8, P, page, D] -> [B, T, 8, D]
        x = pages[:, lay["page_table"]]  # [8, B, n, page, D]
        return x.transpose(1, 2, 3, 0, 4).reshape(b, n * PAGE, HKV, D)

    kc, vc = contiguous(lay["k_pages8"]), contiguous(lay["v_pages8"])
    for opts in (None, dict(pages_per_split=16)):
        for impl in ("cudnn", "xla"):
            if impl == "cudnn" and jax.default_backend() != "gpu":
                continue
            check(f"dense-paged-{opts}-vs-{impl}", lambda: jax.jit(f_attn("kv_head", opts))(*a),
                  lambda: jax.jit(functools.partial(dense_decode_attention, implementation=impl))(
                      lay["q"], kc, vc, lay["lengths"]))
    # page scores: Pallas vs jnp; the selections they produce
    qr = lay["q"][:, :R * G]
    check("page-scores", lambda: page_scores(qr, lay["k_min"], lay["k_max"], lay["page_table"]),
          lambda: jax.jit(page_scores_reference)(qr, lay["k_min"], lay["k_max"], lay["page_table"]),
          tol=1e-3)
    for mode in ("query_head", "kv_head"):
        rec = dict(case=f"selection-pallas-vs-jnp-{mode}")
        try:
            fa = jax.jit(f_select(mode, "pallas"))
            fb = jax.jit(f_select(mode, "reference"))
            args_ = (lay["q"], lay["k_min"], lay["k_max"], lay["page_table"], lay["lengths"])
            (sa, ca), (sb, cb) = fa(*args_), fb(*args_)
            sa, sb = np.asarray(sa), np.asarray(sb)
            ov = np.mean([len(set(sa[i, h, :ca[i, h]]) & set(sb[i, h, :cb[i, h]])) / max(int(cb[i, h]), 1)
                          for i in range(sa.shape[0]) for h in range(sa.shape[1])])
            rec.update(overlap=float(ov), counts_equal=bool(jnp.all(ca == cb)), ok=bool(ov > 0.95))
        except Exception as ex:  # noqa: BLE001
            rec.update(ok=False, error=f"{type(ex).__name__}: {ex}"[:3000])
            traceback.print_exc()
        log("check", rec)
        out.append(rec)
    RESULTS["correctness"] = out
    del lay


def sec_tune(args, deadline):
    """Returns {(config, mode): best kernel options}."""
    res = RESULTS.setdefault("tuning", {})
    best = {}
    configs = [(131072, 4), (262144, 1)] if not args.quick else [(2048, 2)]
    for (t, b) in configs:
        if left(deadline) < 60:
            log("tuning: out of time")
            break
        lay = make_layer(t, b, seed=2)
        for mode in ("query_head", "kv_head"):
            key = f"T{t}_B{b}_{mode}"
            sel, cnt = selection_for(lay, mode)
            ka = kernel_args(lay, mode, sel, cnt)
            nbytes = bytes_attn(t, b, mode) - b * S * min(W, t) * D * 4
            rows = []

            def trial(opts):
                if left(deadline) < 30:
                    return None
                try:
                    r = bench(f_kernel(opts), ka, samples=5)
                    r.update(opts=opts, tb_s=nbytes / (r["us"] * 1e-6) / 1e12)
                except Exception as ex:  # noqa: BLE001
                    r = dict(opts=opts, error=f"{type(ex).__name__}: {ex}"[:500])
                rows.append(r)
                log("tune", key, r)
                return r

            for ppb in (1, 2, 4):
                for nw in (4, 8):
                    trial(dict(pages_per_block=ppb, num_warps=nw, num_stages=2))
            ok = [r for r in rows if "us" in r]
            if not ok:
                continue
            base = min(ok, key=lambda r: r["us"])["opts"]
            for ns in (1, 3, 4):
                trial({**base, "num_stages": ns})
            base = min([r for r in rows if "us" in r], key=lambda r: r["us"])["opts"]
            for mst in (128, 256, 1024, 2048):
                trial({**base, "min_split_tokens": mst})
            best_row = min([r for r in rows if "us" in r], key=lambda r: r["us"])
            best[key] = best_row["opts"]
            res[key] = dict(rows=rows, best=best_row)
            save()
        # page-score kernel: chunk x warps vs the jnp scores
        sc_rows = []
        sargs = (lay["q"][:, :R * G], lay["k_min"], lay["k_max"], lay["page_table"], lay["lengths"])
        nb = bytes_select(t, b)
        for fn_name, fn in [("jnp", lambda q, a, b_, pt, ln: page_scores_reference(q, a, b_, pt))] + [
                (f"pallas_c{c}_w{w}", functools.partial(
                    lambda q, a, b_, pt, ln, c, w: page_scores(q, a, b_, pt, ln, page_size=PAGE, chunk=c,
                                                               num_warps=w), c=c, w=w))
                for c in (8, 16, 32) for w in (4, 8)]:
            if left(deadline) < 30:
                break
            try:
                r = bench(fn, sargs, samples=5)
                r.update(variant=fn_name, tb_s=nb / (r["us"] * 1e-6) / 1e12)
            except Exception as ex:  # noqa: BLE001
                r = dict(variant=fn_name, error=f"{type(ex).__name__}: {ex}"[:500])
            sc_rows.append(r)
            log("tune scores", t, b, r)
        ok = [r for r in sc_rows if "us" in r and r["variant"] != "jnp"]
        res[f"T{t}_B{b}_scores"] = dict(rows=sc_rows, best=min(ok, key=lambda r: r["us"]) if ok else None)
        # dense paged kernel (every page, 8 kv heads), only at the first config
        if (t, b) == configs[0] and left(deadline) > 60:
            del lay
            lay = make_layer(t, b, seed=3, dense_r=HKV)
            sel, cnt = dense_selection(lay, HKV)
            qh, phys, lg = _retrieval_args(lay["q"], lay["page_table"], sel, mode="kv_head", r=HKV, g=G)
            da = (qh, lay["k_pages8"], lay["v_pages8"], phys, lg, cnt, lay["lengths"])
            drows = []
            for ppb in (2, 4):
                for nw in (4, 8):
                    for ns in (2, 3):
                        if left(deadline) < 30:
                            break
                        opts = dict(pages_per_block=ppb, num_warps=nw, num_stages=ns)
                        try:
                            r = bench(f_kernel(opts), da, samples=5)
                            r.update(opts=opts, tb_s=bytes_dense(t, b) / (r["us"] * 1e-6) / 1e12)
                        except Exception as ex:  # noqa: BLE001
                            r = dict(opts=opts, error=f"{type(ex).__name__}: {ex}"[:500])
                        drows.append(r)
                        log("tune dense", r)
            ok = [r for r in drows if "us" in r]
            res["dense_paged"] = dict(rows=drows, best=min(ok, key=lambda r: r["us"]) if ok else None)
            if ok:
                best["dense"] = res["dense_paged"]["best"]["opts"]
        del lay
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
        for mode, tag in (("query_head", "qh"), ("kv_head", "kv")):
            opts = best.get(f"{tuned_key}_{mode}")
            sel, cnt = selection_for(lay, mode)
            run(f"sel_{tag}", f_select(mode), sargs, bytes_select(t, b))
            run(f"attn_{tag}", f_attn(mode, opts), attn_args(lay, sel, cnt), bytes_attn(t, b, mode))
            run(f"step_{tag}", f_step(mode, opts),
                (lay["q"], lay["k_pages"], lay["v_pages"], lay["ring_k"], lay["ring_v"], lay["k_min"],
                 lay["k_max"], lay["page_table"], lay["lengths"]), bytes_attn(t, b, mode) + bytes_select(t, b))
        run("dense_paged", f_attn("kv_head", best.get("dense")), dense_paged_args(lay), bytes_dense(t, b))
        del lay
        ks = jax.random.split(jax.random.PRNGKey(5), 3)
        q = jax.random.normal(ks[0], (b, HQ, D), DT)
        kc = jax.random.normal(ks[1], (b, t, HKV, D), DT)
        vc = jax.random.normal(ks[2], (b, t, HKV, D), DT)
        ln = jnp.full((b,), t - 5, jnp.int32)
        for impl in (("cudnn", "xla") if jax.default_backend() == "gpu" else ("xla",)):
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
    sec_correctness(args)
    save()
    best = {}
    if not args.skip_tune:
        best = sec_tune(args, deadline=args.budget * 0.45)
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
