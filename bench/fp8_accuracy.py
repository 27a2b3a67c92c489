"""Perplexity with 8-bit linear weights (W8A8 FP8, W8A16 FP8, W8A8 INT8 with SmoothQuant smoothing)
and 8-bit KV pages (e4m3 or int8, per-token scales: KV8, and W8A8+KV8) against the unquantised
model, dense and sparse, on real weights (issue #18's accuracy rows).

The text and the sparse model are bench/accuracy.py's: the first half of the shipped public-domain
text in full windows, the calibrated head pattern at 50% streaming heads with the prefill window
scaled to the model (sink 64, local 256; every position past it sees less than dense). The
weights are quantised as `lserve_jax.load(weights=...)` does (`lserve_jax.quant`); K (after
RoPE) and V go through `lserve_jax.kv8`'s quantiser and back at every position, as decode reads
them from the cache (`calibrate.gated_layer`), with the keys centred as the engine centres them
for 8-bit KV (`kv8.key_centers` over the package's calibration text; --raw-keys adds rows
without); compute in float32, so the ratio isolates the quantisation.

    python bench/fp8_accuracy.py [--checkpoint DIR] [--pattern TSV] [--length 4096] [--windows 2]
                                 [--kv fp8_e4m3,int8] [--raw-keys]

Summary: ppl_ratio_<weights>_over_<dtype> (dense), ppl_ratio_kv8_<kv>[_sparse]_over_<dtype>,
ppl_ratio_w8a8kv8_<kv>[_sparse]_over_<dtype> (FP8 W8A8) and ppl_ratio_w8a8int8kv8_<kv>[_sparse]_over_<dtype>
(INT8 W8A8; centred keys, as the engine runs), and the issue's ppl_ratio_kv8_over_bf16 /
ppl_ratio_w8a8kv8_over_bf16 (the better W8A8 format, named in w8a8_format) / ppl_ratio_w8a8fp8kv8_over_bf16 /
ppl_ratio_w8a8int8kv8_over_bf16 for int8 KV (the engine's accurate 8-bit choice), the worse of dense
and sparse; the reference is the checkpoint's weights with an unquantised cache. INT8 weights are
smoothed with activation maxima over the package's calibration text (`lserve_jax.smoothquant`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from accuracy import WINDOWS  # noqa: E402
from common import environment, log, write_json  # noqa: E402

from lserve_jax.checkpoint import open_checkpoint  # noqa: E402
from lserve_jax.evals import eval_ids  # noqa: E402
from lserve_jax.evals.ppl import perplexity  # noqa: E402
from lserve_jax.heads import binarize, load_pattern  # noqa: E402
from lserve_jax.kv8 import KV_DTYPES, calibration_ids, is_kv8, key_centers, with_key_centers  # noqa: E402
from lserve_jax.quant import MODES, quantize_params  # noqa: E402
from lserve_jax.smoothquant import activation_amax  # noqa: E402
from lserve_jax.tokenizer import Tokenizer  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="converted checkpoint (default: the default model)")
    ap.add_argument("--pattern", help="head pattern TSV (default: the checkpoint's, else the default model's)")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--kv", default="fp8_e4m3,int8", help="8-bit KV dtypes to evaluate ('' for none)")
    ap.add_argument("--raw-keys", action="store_true", help="also KV8 rows without key centres")
    ap.add_argument("--attn8", action="store_true",
                    help="also rows with FP8 attention in the full heads' prefill (prefill impl cudnn8+triton, "
                         "emulated: lserve_jax.ops.attn8): alone, and with each W8A8 format and int8 KV")
    ap.add_argument("--only-attn8", action="store_true", help="with --attn8: the reference row and the FP8 "
                    "attention rows only (the other rows are in earlier files)")
    ap.add_argument("--weights", default=",".join(MODES),
                    help=f"weight quantisations to evaluate, alone and with each KV dtype (default: {','.join(MODES)})")
    ap.add_argument("--name", help="model name in the results (default: the checkpoint folder's, less -lserve)")
    ap.add_argument("--tag", default="", help="suffix of the JSON name")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    if args.only_attn8 and not args.attn8:
        ap.error("--only-attn8 needs --attn8")
    kvs = [k for k in args.kv.split(",") if k]
    modes = [w for w in args.weights.split(",") if w]
    if set(modes) - set(MODES):
        ap.error(f"--weights takes {', '.join(MODES)}, got {args.weights!r}")
    bad = [k for k in kvs if not is_kv8(KV_DTYPES.get(k))]
    if bad:
        ap.error(f"--kv takes 8-bit KV dtypes (fp8_e4m3, int8), got {bad}")
    from lserve_jax.api import DEFAULT_PATTERN, default_checkpoint

    is_default = args.checkpoint is None
    ckpt = open_checkpoint(default_checkpoint() if is_default else args.checkpoint)
    cfg = ckpt.config
    alpha = (load_pattern(args.pattern) if args.pattern else ckpt.head_pattern())
    if alpha is None and is_default:
        alpha = load_pattern(DEFAULT_PATTERN)
    if alpha is None:
        ap.error("no head pattern: pass --pattern")
    tok = Tokenizer.from_checkpoint_dir(ckpt.path)
    ids = eval_ids(lambda s: tok.encode(s, add_special_tokens=False))
    base = ckpt.load_params("float32")
    sink, local = WINDOWS["prefill"]
    gates = binarize(alpha, args.sparsity).astype(np.float32)
    rows = []
    # (weights, kv dtype, centred keys, FP8 attention)
    configs = [(w, None, False, False) for w in (None, *modes)] + [(None, kv, True, False) for kv in kvs] \
        + [(w, kv, True, False) for w in ("fp8", "int8") if w in modes for kv in kvs] \
        + [("fp8-weight-only", "int8", True, False)] * ("int8" in kvs and "fp8-weight-only" in modes) \
        + ([(None, kv, False, False) for kv in kvs] if args.raw_keys else [])
    attn8_rows = [(None, None, False, True)] + [(w, "int8", True, True) for w in ("fp8", "int8")
                                                 if w in modes and "int8" in kvs]
    if args.only_attn8:
        configs = [(None, None, False, False)]
    configs += attn8_rows if args.attn8 else []
    quantized = {}
    calib = calibration_ids(tok, cfg.vocab_size)
    centers = key_centers(base, cfg, calib)
    amax = activation_amax(base, cfg, calib) if "int8" in modes else None
    for weights, kv, centred, attn8 in configs:
        if (weights, centred) not in quantized:
            p = base if weights is None else quantize_params(base, weights, act_amax=amax)
            quantized[weights, centred] = with_key_centers(p, centers) if centred else p
        for layout, g in (("dense", None), (f"sparse-s{args.sparsity:g}", gates)):
            t0 = time.perf_counter()
            r = perplexity(quantized[weights, centred], cfg, ids, args.length, args.windows, g, sink, local,
                           kv_dtype=KV_DTYPES[kv] if kv else None, attn8=attn8)
            kv_name = (kv + ("" if centred else " raw keys")) if kv else ckpt.dtype
            rows.append(dict(weights=weights or ckpt.dtype, kv=kv_name, layout=layout, ppl=r["ppl"],
                             window_ppl=r["window_ppl"], attention="fp8" if attn8 else ckpt.dtype))
            log(f"{weights or ckpt.dtype:16s} kv {kv_name:18s} {layout:12s} attn {'fp8' if attn8 else ckpt.dtype:8s} "
                f"ppl {r['ppl']:.4f} "
                f"({time.perf_counter() - t0:.0f} s)")
    ref = {r["layout"]: r["ppl"] for r in rows
           if r["weights"] == ckpt.dtype and r["kv"] == ckpt.dtype and r["attention"] == ckpt.dtype}
    for r in rows:
        r["ratio"] = r["ppl"] / ref[r["layout"]]
    name = args.name or os.path.basename(str(ckpt.path)).replace("-lserve", "")

    def ratio(weights, kv, layout="dense", attention=ckpt.dtype):  # None where that row was not run
        return next((r["ratio"] for r in rows if r["weights"] == weights and r["kv"] == kv and r["layout"] == layout
                     and r["attention"] == attention), None)

    def worst(weights, kv, attention=ckpt.dtype):  # the worse of dense and sparse
        got = [ratio(weights, kv, lay, attention) for lay in layouts]
        return None if None in got else max(got)

    layouts = ("dense", f"sparse-s{args.sparsity:g}")
    summary = {f"ppl_ratio_{w.replace('-', '_')}_over_{ckpt.dtype}": ratio(w, ckpt.dtype) for w in modes}
    for kv in kvs:
        for lay in layouts:
            tag = "" if lay == "dense" else "_sparse"
            summary[f"ppl_ratio_kv8_{kv}{tag}_over_{ckpt.dtype}"] = ratio(ckpt.dtype, kv, lay)
            summary[f"ppl_ratio_w8a8kv8_{kv}{tag}_over_{ckpt.dtype}"] = ratio("fp8", kv, lay)
            summary[f"ppl_ratio_w8a8int8kv8_{kv}{tag}_over_{ckpt.dtype}"] = ratio("int8", kv, lay)
    if "int8" in kvs:
        summary["ppl_ratio_kv8_over_bf16"] = worst(ckpt.dtype, "int8")
        both = {w: worst(w, "int8") for w in ("fp8", "int8")}
        summary["ppl_ratio_w8a8fp8kv8_over_bf16"], summary["ppl_ratio_w8a8int8kv8_over_bf16"] = both["fp8"], both["int8"]
        both = {w: r for w, r in both.items() if r is not None}
        if both:  # the W8A8 + KV8 row: the more accurate W8A8 format
            summary["w8a8_format"] = min(both, key=both.get)
            summary["ppl_ratio_w8a8kv8_over_bf16"] = min(both.values())
        summary["ppl_ratio_w8a16kv8_over_bf16"] = worst("fp8-weight-only", "int8")
    if args.attn8:  # FP8 attention in the full heads' prefill: alone, and on top of W8A8 + int8 KV
        summary["ppl_ratio_attn8_over_bf16"] = worst(ckpt.dtype, ckpt.dtype, "fp8")
        for w in ("fp8", "int8"):
            summary[f"ppl_ratio_w8a8{w}kv8attn8_over_bf16"] = worst(w, "int8", "fp8")
    summary = {k: v for k, v in summary.items() if v is not None}
    res = dict(env=environment(), checkpoint=name, length=args.length, windows=args.windows,
               sparse_window=dict(sink=sink, local=local), rows=rows, summary=summary)
    path = os.path.join(args.out, f"fp8_accuracy-{name}-{res['env']['date'][:10]}{args.tag}.json")
    write_json(path, res)
    print(f"| weights | KV | attention | layout | ppl@{args.length} | ratio |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['weights']} | {r['kv']} | {r['attention']} | {r['layout']} | {r['ppl']:.4f} | {r['ratio']:.4f} |")
    print("wrote", path)


if __name__ == "__main__":
    main()
