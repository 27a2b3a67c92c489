"""Sweep head-pattern calibration settings on one model and score each pattern quickly (GPU).

    python bench/calib_sweep.py [--variants base,text,...] [--budget-s 540]

For each calibration variant (a `CalibConfig` override, see VARIANTS), runs
`lserve_jax.calibrate.calibrate`, binarizes the gates at `--sparsity`, and scores the pattern:

* perplexity at `--ppl-length` over `--ppl-windows` windows of the corpus's evaluation half,
  with the prefill window and with the decode window for streaming heads (the same numbers as
  `bench/accuracy.py`), as ratios to dense;
* a teacher-forced passkey proxy on the accuracy grid's prompts (`lserve_jax.evals.passkey_proxy`):
  a cell passes if the greedy argmax at every answer position is the answer token (all-position
  forward, prefill window). The real grid (`bench/accuracy.py`) decodes through the engine; this
  proxy only ranks candidates.

Writes JSON under $OUT (or bench/results/) after every variant, so a cut-off run keeps what it
finished; prints a table last. `--prior JSON --combos a+b` also scores the mean of two
settings' gates (from this run or an earlier one) without calibrating.

On a GPU machine that cannot download the default model: the 98 MB GGUF is over one call's
64 MiB carry limit, so it travels in two halves (`split -b 49181216`), the first copied to /tmp
by one call and joined with the second by the next call while the machine is still warm, into
`$LSERVE_JAX_CACHE/SmolLM2-135M-Instruct.Q4_1.gguf`, with the `gguf` wheel carried too (the
converter needs it). One sweep of 8 settings took about 8 minutes on an H200 (compilation
included); the same calibration takes 14-20 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (ROOT, os.path.join(ROOT, "bench")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import accuracy as acc  # noqa: E402  (bench/accuracy.py: its knobs and windows)
import common  # noqa: E402  (bench/common.py)
from common import log  # noqa: E402

from lserve_jax.api import default_checkpoint  # noqa: E402
from lserve_jax.calibrate import (CalibConfig, boundary_band, calibrate, flip_costs, make_samples,  # noqa: E402
                                  refine_boundary, refine_samples, rerank_band, text_samples)
from lserve_jax.checkpoint import open_checkpoint  # noqa: E402
from lserve_jax.evals import (GRID_DEPTHS, GRID_LENGTHS, eval_ids, grid_prompts, haystack_ids,  # noqa: E402
                              passkey_proxy, perplexity)
from lserve_jax.heads import binarize  # noqa: E402
from lserve_jax.tokenizer import Tokenizer  # noqa: E402

SHIPPED = CalibConfig()
VARIANTS = {  # name -> CalibConfig overrides of the shipped settings (the refinement included:
    # the sweeps of calib_sweep-2026-12-02a-d ran before it existed, i.e. as refine_band 0)
    "base": {},
    "base-norefine": {"refine_band": 0},
    "base-seed1": {"seed": 1},
    "base-seed2": {"seed": 2},
    "base-s48": {"steps": 48},
    "base-s48-seed1": {"steps": 48, "seed": 1},
    "base-s48-seed2": {"steps": 48, "seed": 2},
    "base-s64": {"steps": 64},
    "base-s64-seed1": {"steps": 64, "seed": 1},
    "base-s64-seed2": {"steps": 64, "seed": 2},
    "text": {"haystack": "text"},
    "text-w256": {"haystack": "text", "local": 256},
    "text-tw1": {"haystack": "text", "text_weight": 1.0},
    "text-tw0.1": {"haystack": "text", "text_weight": 0.1},
    "text-w256-tw1": {"haystack": "text", "local": 256, "text_weight": 1.0},
    "text-seed1": {"haystack": "text", "seed": 1},
    "text-long": {"haystack": "text", "lengths": (1024, 2048, 3072)},
    "text-160": {"haystack": "text", "steps": 160},
    "mixed": {"haystack": "mixed"},
    "mixed-seed1": {"haystack": "mixed", "seed": 1},
    "mixed-seed2": {"haystack": "mixed", "seed": 2},
    "mixed-110": {"haystack": "mixed", "steps": 110},
    "mixed-w256": {"haystack": "mixed", "local": 256},
    "mixed-tw1": {"haystack": "mixed", "text_weight": 1.0},
    "mixed-tw5": {"haystack": "mixed", "text_weight": 5.0},
    "mixed-w256-tw1": {"haystack": "mixed", "local": 256, "text_weight": 1.0},
    "mixed-keys5": {"haystack": "mixed", "num_keys": 5},
    "mixed-reg0.1": {"haystack": "mixed", "reg": 0.1},
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="converted checkpoint (default: the default model)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of VARIANTS")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--ppl-length", type=int, default=4096)
    ap.add_argument("--ppl-windows", type=int, default=4)
    ap.add_argument("--steps", type=int, help="override every variant's step count (smoke runs)")
    ap.add_argument("--grid-lengths", type=acc._ints, default=list(GRID_LENGTHS))
    ap.add_argument("--prior", default="", help="previous sweep JSONs (comma-separated) whose patterns "
                    "--combos may name (a later file's name wins)")
    ap.add_argument("--combos", default="", help="comma-separated 'a+b' names: score the mean of the "
                    "gates of variants a and b (from this run or --prior), no calibration")
    ap.add_argument("--refine-band", type=int, default=0, help="also score each pattern after "
                    "`refine_boundary` with this band (0: off)")
    ap.add_argument("--refine-samples", type=int, default=SHIPPED.refine_samples)
    ap.add_argument("--refine-length", type=acc._ints, default=[SHIPPED.refine_length],
                    help="text window length(s), comma-separated: one refined pattern each")
    ap.add_argument("--refine-local", type=int, help="local window of the text cost (default: the "
                    "variant's calibration window)")
    ap.add_argument("--refine-study", action="store_true", help="score several boundary re-rankings "
                    "(text cost at two windows, pass-key cost, mixes) instead of `refine_boundary`'s")
    ap.add_argument("--window-study", type=int, default=0, help="refine each optimised pattern from the "
                    "per-window flip costs of this many text windows (the default recipe's come first) and "
                    "score the refinement that the first k of them give, for each k in --window-subsets")
    ap.add_argument("--window-subsets", type=acc._ints, default=[2, 3, 4], help="window counts k (--window-study)")
    ap.add_argument("--skip-unrefined", action="store_true", help="do not score the optimised patterns themselves")
    ap.add_argument("--budget-s", type=float, default=540, help="start no variant after this many seconds")
    ap.add_argument("--out", help="JSON path (default: $OUT/calib_sweep.json or bench/results/)")
    args = ap.parse_args()
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    env = common.environment()
    out = args.out or os.path.join(os.environ.get("OUT") or os.path.join(ROOT, "bench", "results"),
                                   f"calib_sweep-{env['date'][:10]}.json")

    ckpt = open_checkpoint(args.checkpoint or default_checkpoint())
    cfg = ckpt.config
    tok = Tokenizer.from_checkpoint_dir(ckpt.path)
    encode = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    params = jax.tree.map(jnp.asarray, ckpt.load_params("float32"))
    text_ids = eval_ids(encode)
    cells = [c for row in grid_prompts(encode, args.grid_lengths, GRID_DEPTHS, 1, 0) for d in row for c in d]

    def proxy(gates) -> list[bool]:  # the teacher-forced grid, prefill window: passed per cell
        sink, local = acc.WINDOWS["prefill"]
        return passkey_proxy(params, cfg, cells, gates, sink=sink, local=local)

    res = {**env, "checkpoint": str(ckpt.path), "knobs": acc.KNOBS,
           "sparsity": args.sparsity, "ppl_length": args.ppl_length, "ppl_windows": args.ppl_windows,
           "shipped": dataclasses.asdict(SHIPPED), "variants": {}}

    dense = perplexity(params, cfg, text_ids, args.ppl_length, args.ppl_windows, None, 0, 1)
    dense_ppl = dense["ppl"]
    dense_cells = proxy(None)
    res["dense"] = {"ppl": dense_ppl, "proxy_pass": sum(dense_cells), "cells": dense_cells}
    log(f"dense ppl {dense_ppl:.4f}, proxy {sum(dense_cells)}/{len(cells)}")

    def save():
        common.write_json(out, res)

    alphas = {}
    for path in [p for p in args.prior.split(",") if p]:
        with open(path) as f:
            alphas.update({n: np.asarray(e["alpha"]) for n, e in json.load(f)["variants"].items()})
    haystack = haystack_ids(encode)

    def score(name: str, alpha: np.ndarray, entry: dict) -> None:
        gates = jnp.asarray(binarize(alpha, args.sparsity), jnp.float32)
        for win, (sink, local) in acc.WINDOWS.items():
            p = perplexity(params, cfg, text_ids, args.ppl_length, args.ppl_windows, gates, sink, local)
            entry[f"ppl_ratio_{win}"] = p["ppl"] / dense_ppl
            entry[f"ppl_ratio_{win}_per_window"] = [w / d for w, d in zip(p["window_ppl"], dense["window_ppl"])]
        ok = proxy(gates)
        entry["proxy_pass"] = sum(ok)
        entry["proxy_pass_where_dense"] = sum(a and b for a, b in zip(ok, dense_cells))
        entry["cells"] = ok
        entry["alpha"] = alpha.tolist()
        res["variants"][name] = entry
        save()
        log(f"{name}: ppl prefill {entry['ppl_ratio_prefill']:.4f}, decode {entry['ppl_ratio_decode']:.4f}, "
            f"proxy {entry['proxy_pass_where_dense']}/{sum(dense_cells)}")

    def study(name: str, alpha: np.ndarray, cc: CalibConfig) -> None:
        """Boundary re-rankings of one pattern by several measured costs (`--refine-study`)."""
        rng = np.random.default_rng([cc.seed, 1])
        retrieval, band = boundary_band(alpha, args.sparsity, args.refine_band)
        texts = text_samples(haystack, args.refine_samples, args.refine_length[0], cc.sink + 256, rng)
        keys = [(tokens, span) for length in (1024, 2048)  # keys alternately in filler and text
                for tokens, span, _ in make_samples(encode, dataclasses.replace(cc, lengths=(length,), haystack="mixed"),
                                                    4, haystack, rng)]
        t0 = time.perf_counter()
        costs = {"t256": flip_costs(params, cfg, retrieval, band, texts, sink=cc.sink, local=256)[1],
                 "t128": flip_costs(params, cfg, retrieval, band, texts, sink=cc.sink, local=128)[1],
                 "k": flip_costs(params, cfg, retrieval, band, keys, sink=cc.sink, local=128)[1]}
        log(f"{name}: costs in {time.perf_counter() - t0:.0f}s; key cost max {costs['k'].max():.4f}")
        rules = {"t256": costs["t256"], "t128": costs["t128"], "t256k0.1": costs["t256"] + 0.1 * costs["k"],
                 "t256k1": costs["t256"] + costs["k"],
                 "t256lock": np.where(costs["k"] > 0.02, np.inf, costs["t256"])}
        for rule, cost in rules.items():
            if time.perf_counter() - common.T0 > args.budget_s:
                return
            score(f"{name}/{rule}", rerank_band(alpha, band, np.nan_to_num(cost, posinf=1e9)),
                  {"refined_from": name, "rule": rule, "band": band.tolist(),
                   "costs": {k: v.tolist() for k, v in costs.items()}, "calibrate_s": 0.0})

    scored: dict[bytes, str] = {}  # binary pattern -> the entry that scored it (--window-study)

    def window_study(name: str, alpha: np.ndarray, cc: CalibConfig) -> None:
        """The boundary refinement from the first k of --window-study windows, for each k."""
        rc = dataclasses.replace(cc, refine_band=args.refine_band or SHIPPED.refine_band, refine_sparsity=args.sparsity,
                                 refine_samples=args.window_study, refine_length=args.refine_length[0],
                                 refine_local=args.refine_local)
        retrieval, band = boundary_band(alpha, args.sparsity, rc.refine_band)
        t0 = time.perf_counter()
        _, _, per = flip_costs(params, cfg, retrieval, band, refine_samples(rc, haystack), sink=rc.sink,
                               local=rc.refine_window)
        secs = time.perf_counter() - t0
        log(f"{name}: {args.window_study} windows of flip costs in {secs:.0f}s")
        for k in [k for k in args.window_subsets if k <= args.window_study]:
            if time.perf_counter() - common.T0 > args.budget_s:
                return
            refined = rerank_band(alpha, band, per[:k].mean(0))
            entry = {"refined_from": name, "windows": k, "band": band.tolist(), "window_cost": per.tolist(),
                     "calibrate_s": secs * k / args.window_study}
            key = binarize(refined, args.sparsity).tobytes()
            if key in scored:  # the same binary pattern: the same scores
                same = res["variants"][scored[key]]
                entry.update({m: same[m] for m in same if m.startswith(("ppl_ratio", "proxy", "cells"))},
                             same_pattern_as=scored[key], alpha=refined.tolist())
                res["variants"][f"{name}/w{k}"] = entry
                log(f"{name}/w{k}: same pattern as {scored[key]}")
                continue
            scored[key] = f"{name}/w{k}"
            score(f"{name}/w{k}", refined, entry)

    def score_refined(name: str, alpha: np.ndarray, cc: CalibConfig) -> None:
        if args.window_study:
            return window_study(name, alpha, cc)
        if args.refine_study:
            return study(name, alpha, cc)
        if not args.refine_band:
            return
        for length in args.refine_length:
            if time.perf_counter() - common.T0 > args.budget_s:
                return
            rc = dataclasses.replace(cc, refine_band=args.refine_band, refine_sparsity=args.sparsity,
                                     refine_samples=args.refine_samples, refine_length=length,
                                     refine_local=args.refine_local)
            refined, rep = refine_boundary(params, cfg, encode, alpha, rc, haystack=haystack, log=None)
            rep.pop("alpha_before")
            score(f"{name}/r{length}", refined, {"refined_from": name, "refine": rep, "calibrate_s": rep["seconds"]})

    for name in names:
        if time.perf_counter() - common.T0 > args.budget_s:
            log(f"budget spent: skipping {name} and after")
            break
        cc = dataclasses.replace(SHIPPED, **VARIANTS[name])
        if args.steps:
            cc = dataclasses.replace(cc, steps=args.steps)
        if args.window_study:  # the optimisation alone; window_study refines
            cc = dataclasses.replace(cc, refine_band=0)
        r = calibrate(params, cfg, encode, cc, log=None)
        alphas[name] = r.alpha
        entry = {"overrides": {k2: list(v) if isinstance(v, tuple) else v for k2, v in VARIANTS[name].items()},
                 "calibrate_s": r.seconds, "final_loss": r.curve[-1]["loss"]}
        if args.skip_unrefined:
            res["variants"][name] = {**entry, "alpha": r.alpha.tolist(), "unscored": True}
        else:
            score(name, r.alpha, entry)
        score_refined(name, r.alpha, cc)
    for combo in [c for c in args.combos.split(",") if c]:
        if time.perf_counter() - common.T0 > args.budget_s:
            log(f"budget spent: skipping {combo} and after")
            break
        parts = combo.split("+")
        if not all(p in alphas for p in parts):
            log(f"skipping combo {combo}: needs {[p for p in parts if p not in alphas]}")
            continue
        alpha = np.mean([alphas[p] for p in parts], axis=0)
        score(combo, alpha, {"combo": parts, "calibrate_s": 0.0})
        score_refined(combo, alpha, dataclasses.replace(SHIPPED, **VARIANTS.get(parts[0], {})))

    save()
    print("\n| variant | calib s | ppl ratio (prefill window) | ppl ratio (decode window) | proxy cells (where dense) |")
    print("|---|---|---|---|---|")
    for name, e in res["variants"].items():
        if e.get("unscored"):
            continue
        print(f"| {name} | {e['calibrate_s']:.0f} | {e['ppl_ratio_prefill']:.4f} | {e['ppl_ratio_decode']:.4f} | "
              f"{e['proxy_pass_where_dense']}/{sum(dense_cells)} |")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
