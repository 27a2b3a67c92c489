"""Long-context accuracy on real weights, dense vs sparse: a passkey grid and perplexity.

    python bench/accuracy.py                      # SmolLM2-135M-Instruct, the calibrated pattern
    python bench/accuracy.py --quick              # two grid cells, one short perplexity window

* Passkey grid (context length x needle depth), token-exact prompts (`lserve_jax.evals.grid_prompts`),
  the same prompts for every variant, greedy decoding through `Engine.generate` (sparse prefill,
  streaming rings and page selection in decode; `evals.run_grid`). A cell passes if the key is in the output.
* Perplexity on the first half of a long public-domain text shipped in lserve_jax/data/ (full windows of each
  length; `evals.perplexity`), all-position logits from the sparse prefill model (`calibrate.gated_hidden`
  with binary gates: the `prefill_attention` semantics, checked against it in tests/test_calibrate.py)
  with the prefill window and, separately, with the narrower decode window for streaming heads.
* Variants: dense; the calibrated pattern at several static sparsities and token budgets; a
  random pattern and the attention-mass pattern at the same sparsity and knobs.
* 8-bit (`--weights int8|fp8|fp8-weight-only`, `--kv-dtype int8|fp8_e4m3`): the grid's variants
  with quantised linear weights and/or 8-bit KV pages, named `<variant>+<weights>+kv-<dtype>`;
  `--resume` into the file of an unquantised run keeps its variants beside them, and each 8-bit
  variant is scored against its unquantised twin (cells the twin passes that it fails).
  Perplexity with 8-bit weights and KV is bench/fp8_accuracy.py's (this needs --skip-ppl).

    python bench/accuracy.py --variants dense,calibrated-s0.5-b256 --skip-ppl --out bench/results/accuracy8-DATE.json
    python bench/accuracy.py --variants dense,calibrated-s0.5-b256 --skip-ppl --out bench/results/accuracy8-DATE.json \
        --resume --weights int8 --kv-dtype int8

Writes bench/results/accuracy-<date>.json and a heatmap PNG beside it; prints markdown tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from lserve_jax.config import SparseConfig  # noqa: E402
from lserve_jax.evals import (GRID_DEPTHS, GRID_LENGTHS, TEXT_PATH, eval_ids, grid_prompts,  # noqa: E402
                              perplexity, random_pattern, run_grid)
from lserve_jax.heads import binarize, load_pattern  # noqa: E402

T0 = time.perf_counter()
REPO_PATTERN = os.path.join(ROOT, "lserve_jax", "patterns", "SmolLM2-135M-Instruct.tsv")

# Sparse knobs scaled to SmolLM2's 8K context so that sparsity bites at 256-2K tokens.
KNOBS = dict(prefill_sink=64, prefill_local=256, decode_sink=64, decode_local=128, page_size=16,
             logical_page_size=4, selector_interval=4)
# 8-bit options of the grid's engine (lserve_jax.load's weights= and kv_dtype=)
QUANT_WEIGHTS = ("int8", "fp8", "fp8-weight-only")
QUANT_KV = ("int8", "fp8_e4m3")


def quant_suffix(weights: str, kv_dtype: str) -> str:
    """The grid-variant name suffix of an 8-bit run ('' for weights as stored and compute-dtype KV)."""
    return ("" if weights == "checkpoint" else f"+{weights}") + ("" if kv_dtype == "auto" else f"+kv-{kv_dtype}")


def lost_to_twin(grid: dict, name: str) -> tuple[int, int] | None:
    """(cells the unquantised twin passes that `name` passes, cells the twin passes), or None when
    `name` is not an 8-bit variant or its twin is not in the grid."""
    twin = grid[name].get("twin")
    if not twin or twin not in grid:
        return None
    p, t = (np.asarray(grid[k]["pass"]) >= 1.0 for k in (name, twin))
    return int((p & t).sum()), int(t.sum())


# (sink, local) that streaming heads see in the all-position perplexity forward
WINDOWS = {"prefill": (KNOBS["prefill_sink"], KNOBS["prefill_local"]),
           "decode": (KNOBS["decode_sink"], KNOBS["decode_local"])}


def log(*a) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s]", *a, file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    pattern: str | None  # "calibrated" | "random" | "attention-mass" | None (dense)
    sparsity: float = 0.0
    budget: int | None = None  # None: dense decode over every page
    selection_mode: str = "query_head"  # page selection per query head (LServe) or per KV head

    def sparse_config(self, max_len: int) -> SparseConfig:
        if self.pattern is None:
            return SparseConfig(static_sparsity=0.0, token_budget=max_len, sparse_decode=False, **KNOBS)
        return SparseConfig(static_sparsity=self.sparsity, token_budget=self.budget,
                            selection_mode=self.selection_mode, **KNOBS)


# ------------------------------------------------------------------------------------------
# --resume.
# ------------------------------------------------------------------------------------------


def same_patterns(old: dict, patterns: dict) -> set[str]:
    """Patterns whose --resume entries may be reused: the old run stored the same gates (to its
    6 decimals). A re-calibrated pattern under the same name is run again, never kept."""
    stored = old.get("patterns", {}).get("alpha", {})
    return {p for p, a in patterns.items()
            if p in stored and np.array_equal(np.round(np.asarray(a, np.float64), 6), np.asarray(stored[p]))}


def _kept(entry: dict | None, length: int, windows: int) -> bool:
    """A perplexity entry from --resume is reused only if it covers the same windows."""
    return bool(entry) and entry.get("tokens") == windows * (length - 1)


# ------------------------------------------------------------------------------------------
# Output.
# ------------------------------------------------------------------------------------------


def heatmap(path: str, grid: dict, lengths, depths) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(grid)
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        m = np.asarray(grid[name]["pass"], float).T  # [depth, length]
        ax.imshow(m, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths], fontsize=7)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("context tokens", fontsize=7)
        ax.set_ylabel("needle depth", fontsize=7)
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, f"{v:.0%}" if 0 < v < 1 else ("✓" if v else "✗"), ha="center", va="center", fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle("passkey retrieval (green: pass)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def tables(res: dict) -> str:
    g = res["grid"]
    lengths = g["lengths"]
    dense = np.asarray(g["variants"]["dense"]["pass"]) >= 1.0 if "dense" in g["variants"] else None
    out = ["| variant | sparsity | budget | cells passed | passed where dense passes | "
           "passed where the unquantised twin passes | " + " | ".join(f"{n}" for n in lengths) + " |",
           "|---|---|---|---|---|---|" + "---|" * len(lengths)]
    for name, v in g["variants"].items():
        p = np.asarray(v["pass"]) >= 1.0
        per_len = [f"{int(p[i].sum())}/{p.shape[1]}" for i in range(len(lengths))]
        twin = lost_to_twin(g["variants"], name)
        out.append(f"| {name} | {v['sparsity']} | {v['budget'] or '-'} | {int(p.sum())}/{p.size} | "
                   f"{'%d/%d' % ((p & dense).sum(), dense.sum()) if dense is not None else '-'} | {'%d/%d' % twin if twin else '-'} | "
                   + " | ".join(per_len) + " |")
    pp = res["perplexity"]
    out += ["", "| variant | window | " + " | ".join(f"ppl@{n}" for n in pp["lengths"]) +
            " | " + " | ".join(f"tail ppl@{n}" for n in pp["lengths"]) + " |",
            "|---|---|" + "---|" * (2 * len(pp["lengths"]))]
    for name, by_win in pp["variants"].items():
        for win, r in by_win.items():
            cells = [f"{r[str(n)]['ppl']:.3f}" for n in pp["lengths"]]
            tails = [f"{r[str(n)]['ppl_tail']:.3f}" if r[str(n)]["ppl_tail"] else "-" for n in pp["lengths"]]
            out.append(f"| {name} | {win} | " + " | ".join(cells) + " | " + " | ".join(tails) + " |")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------


def _floats(s):
    return [float(x) for x in s.split(",") if x]


def _ints(s):
    return [int(x) for x in s.split(",") if x]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="converted checkpoint (default: the default model)")
    ap.add_argument("--pattern", help="calibrated TSV (default: <checkpoint>/head_pattern.tsv, else the repo's)")
    ap.add_argument("--mass-pattern", help="attention-mass TSV to compare (optional)")
    ap.add_argument("--lengths", type=_ints, default=list(GRID_LENGTHS))
    ap.add_argument("--depths", type=_floats, default=list(GRID_DEPTHS))
    ap.add_argument("--trials", type=int, default=1, help="pass keys per cell (batched)")
    ap.add_argument("--sparsities", type=_floats, default=[0.5, 0.75])
    ap.add_argument("--budgets", type=_ints, default=[256, 512])
    ap.add_argument("--random-seed", type=int, default=0)
    ap.add_argument("--ppl-lengths", type=_ints, default=[1024, 2048, 4096])
    ap.add_argument("--ppl-windows", type=int, default=4,
                    help="non-overlapping windows per perplexity length, pooled (%(default)s)")
    ap.add_argument("--ppl-sparsities", type=_floats, default=[0.25, 0.5, 0.75])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 cells, one short ppl window")
    ap.add_argument("--skip-grid", action="store_true")
    ap.add_argument("--skip-ppl", action="store_true")
    ap.add_argument("--out", help="JSON path (default bench/results/accuracy-<date>.json)")
    ap.add_argument("--selection-modes", type=lambda x: x.split(","), default=["query_head", "kv_head"],
                    help="page selection modes in the grid; modes other than query_head run as extra variants "
                         "at the headline knobs (%(default)s)")
    ap.add_argument("--resume", action="store_true", help="keep the variants already in --out, run the rest")
    ap.add_argument("--variants", type=lambda x: [v for v in x.split(",") if v],
                    help="run only these variants of the grid (names as in the tables, without an 8-bit suffix)")
    ap.add_argument("--weights", default="checkpoint", choices=["checkpoint", *QUANT_WEIGHTS],
                    help="the grid's linear weights: as stored (default), or quantised on load (lserve_jax.load)")
    ap.add_argument("--kv-dtype", default="auto", choices=["auto", *QUANT_KV],
                    help="the grid's KV pages: the compute dtype (default) or 8-bit with per-token scales")
    args = ap.parse_args(argv)
    suffix = quant_suffix(args.weights, args.kv_dtype)
    if suffix and not args.skip_ppl:
        ap.error("perplexity with 8-bit weights or KV is bench/fp8_accuracy.py's: add --skip-ppl")
    if args.quick:
        args.lengths, args.depths, args.sparsities, args.budgets = [256], [0.0, 1.0], [0.5], [256]
        args.ppl_lengths, args.ppl_windows, args.ppl_sparsities = [512], 1, [0.5]

    import lserve_jax
    from lserve_jax.checkpoint import open_checkpoint

    ckpt = open_checkpoint(args.checkpoint or lserve_jax.default_checkpoint())
    cfg = ckpt.config
    pattern_path = args.pattern or (str(ckpt.pattern_file) if ckpt.pattern_file else REPO_PATTERN)
    alpha = load_pattern(pattern_path)
    patterns = {"calibrated": alpha, "random": random_pattern(alpha.shape, args.random_seed)}
    if args.mass_pattern:
        patterns["attention-mass"] = load_pattern(args.mass_pattern)
    calib_json = os.path.splitext(pattern_path)[0] + ".json"
    calib_minutes = calib_device = calib_cpu = None
    if os.path.exists(calib_json):
        with open(calib_json) as f:
            record = json.load(f)
        calib_minutes, calib_device = record.get("minutes"), record.get("device", "CPU")
        calib_cpu = record.get("cpu_minutes", calib_minutes if calib_device == "CPU" else None)

    variants = [Variant("dense", None)]
    for s in args.sparsities:
        for b in args.budgets:
            variants.append(Variant(f"calibrated-s{s:g}-b{b}", "calibrated", s, b))
    s0, b0 = args.sparsities[0], min(args.budgets)  # the controls run at the headline's knobs
    variants += [Variant(f"{p}-s{s0:g}-b{b0}", p, s0, b0) for p in patterns if p != "calibrated"]
    # the other selection mode, at the headline's knobs (the grid only: perplexity runs prefill)
    variants += [Variant(f"calibrated-s{s0:g}-b{b0}-{m}", "calibrated", s0, b0, m)
                 for m in args.selection_modes if m != "query_head"]
    headline = f"calibrated-s{s0:g}-b{min(args.budgets)}"
    if args.variants is not None:
        if not args.variants:
            ap.error("--variants names no variant (comma-separated names, e.g. dense,calibrated-s0.5-b256)")
        unknown = sorted(set(args.variants) - {v.name for v in variants})
        if unknown:
            ap.error(f"--variants: unknown {unknown}; these runs have {[v.name for v in variants]}")
        variants = [v for v in variants if v.name in args.variants]

    date = datetime.date.today().isoformat()
    out = args.out or os.path.join(ROOT, "bench", "results", f"accuracy-{date}{'-quick' if args.quick else ''}.json")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    old = {}
    if args.resume and os.path.exists(out):
        try:
            with open(out) as f:
                old = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            ap.error(f"--resume: cannot read {out}: {e}")

    same = same_patterns(old, patterns)
    if old:
        log(f"--resume: entries of patterns {sorted(same)} (and dense) may be kept; the others run again")

    def reusable(pattern: str | None) -> bool:
        return pattern is None or pattern in same

    def save():  # after every variant, so a long run can be resumed
        with open(out, "w") as f:
            json.dump(res, f, indent=1)

    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "model": os.path.basename(str(ckpt.path)), "checkpoint": str(ckpt.path),
           "backend": jax.default_backend(), "jax": jax.__version__,
           "knobs": {**KNOBS, "budgets": args.budgets, "sparsities": args.sparsities,
                     "note": "prefill: streaming heads see sink+local of the prefill knobs; decode: ring of "
                             "decode_sink+decode_local; retrieval heads read token_budget tokens of pages"},
           "patterns": {"calibrated": pattern_path, "random_seed": args.random_seed,
                        "attention-mass": args.mass_pattern,
                        "alpha": {k: np.round(a, 6).tolist() for k, a in patterns.items()}}}

    # -- passkey grid ----------------------------------------------------------------------
    max_len = max(args.lengths) + 16
    if not args.skip_grid:
        grid = {k: e for k, e in old.get("grid", {}).get("variants", {}).items() if reusable(e.get("pattern"))}
        prompts = None
        for v in variants:
            name = v.name + suffix
            if name in grid:
                log(f"grid: {name} (kept from {out})")
                continue
            log(f"grid: {name}")
            sp = v.sparse_config(max_len)
            pat = None if v.pattern is None else _tmp_tsv(patterns[v.pattern], v.pattern)
            # weights as stored (float32) unless --weights quantises them: unquantised grids stay
            # comparable across sessions
            engine = lserve_jax.load(ckpt.path, pattern=pat, sparse=sp, max_seq_len=max_len, progress=False,
                                     weights=args.weights, kv_dtype=args.kv_dtype)
            if prompts is None:
                encode = (lambda s: engine.tokenizer.encode(s, add_special_tokens=False))
                prompts = grid_prompts(encode, args.lengths, args.depths, args.trials, args.seed)
            t = time.perf_counter()
            frac, outs = run_grid(engine, prompts, log=log)
            layout = engine.spec.layout
            grid[name] = {"pattern": v.pattern, "sparsity": v.sparsity, "budget": v.budget, "pass": frac,
                            "outputs": outs, "seconds": time.perf_counter() - t,
                            "weights": args.weights, "kv_dtype": args.kv_dtype, "twin": v.name if suffix else None,
                            "retrieval_heads": int(sum(layout.num_retrieval)),
                            "kv_heads": cfg.num_layers * cfg.num_kv_heads}
            del engine
            res["grid"] = {"lengths": args.lengths, "depths": args.depths, "trials": args.trials,
                           "keys": [[[p.keys[0] for p in c] for c in r] for r in prompts], "variants": grid}
            save()
        if "grid" not in res:
            res["grid"] = old["grid"]

    # -- perplexity ------------------------------------------------------------------------
    if not args.skip_ppl:
        from lserve_jax.tokenizer import Tokenizer

        tok = Tokenizer.from_checkpoint_dir(ckpt.path)
        text_ids = eval_ids(lambda s: tok.encode(s, add_special_tokens=False))
        params = ckpt.load_params("float32")
        pv = {"dense": None}
        for s in args.ppl_sparsities:
            pv[f"calibrated-s{s:g}"] = binarize(alpha, s)
        for p in patterns:
            if p != "calibrated":
                pv[f"{p}-s{s0:g}"] = binarize(patterns[p], s0)
        ppl = {k: e for k, e in old.get("perplexity", {}).get("variants", {}).items()
               if k == "dense" or reusable(k.rsplit("-s", 1)[0])}
        res["perplexity"] = {"text": os.path.relpath(TEXT_PATH, ROOT) + " (first half)",
                             "text_tokens": len(text_ids),
                             "lengths": args.ppl_lengths, "windows_per_length": args.ppl_windows,
                             "variants": ppl}
        for name, mask in pv.items():
            ppl.setdefault(name, {})
            for win, (sink, local) in WINDOWS.items():
                if mask is None and win == "decode":
                    continue
                ppl[name].setdefault(win, {})
                for n in args.ppl_lengths:
                    if _kept(ppl[name][win].get(str(n)), n, args.ppl_windows):
                        continue
                    r = perplexity(params, cfg, text_ids, n, args.ppl_windows,
                                   None if mask is None else mask.astype(np.float32), sink, local)
                    ppl[name][win][str(n)] = r
                    log(f"ppl {name} {win} @{n}: {r['ppl']:.4f} (tail {r['ppl_tail']})")
                    save()

    if args.skip_grid and "grid" in old:
        res["grid"] = old["grid"]
    if args.skip_ppl and "perplexity" in old:
        res["perplexity"] = old["perplexity"]
    res["summary"] = summary(res, headline, s0, calib_minutes, calib_device, calib_cpu)
    if "grid" in res:
        png = os.path.splitext(out)[0] + ".png"
        heatmap(png, res["grid"]["variants"], args.lengths, args.depths)
        res["heatmap"] = os.path.relpath(png, ROOT) if png.startswith(ROOT) else png
    if "grid" in res and "perplexity" in res:
        res["table_md"] = tables(res)  # rendered into BENCHMARKS.md by bench/report.py
        print(res["table_md"])
    save()
    print(json.dumps(res["summary"], indent=1))
    log(f"wrote {out}")
    return 0


def summary(res: dict, headline: str, s0: float, calib_minutes, calib_device=None, calib_cpu=None) -> dict:
    out: dict = {"headline_variant": headline, "calibrate_minutes": calib_minutes, "calibrate_device": calib_device,
                 "calibrate_minutes_cpu": calib_cpu}
    if "grid" in res:
        g = res["grid"]["variants"]
        first = np.asarray(next(iter(g.values()))["pass"])
        dense = np.asarray(g["dense"]["pass"]) >= 1.0 if "dense" in g else None
        out["cells_total"] = int(first.size)
        if dense is not None:
            out["cells_dense_pass"] = int(dense.sum())
        per, lost = {}, None
        for name, v in g.items():
            p = np.asarray(v["pass"]) >= 1.0
            per[name] = {"cells_pass": int(p.sum()), "mean_pass": round(float(np.mean(v["pass"])), 4)}
            if dense is not None:
                per[name]["pass_where_dense_passes"] = int((p & dense).sum())
            twin = lost_to_twin(g, name)
            if twin:
                per[name]["pass_where_twin_passes"] = twin[0]
                lost = (lost or 0) + twin[1] - twin[0]
        out["per_variant"] = per
        if lost is not None:  # #18: the 8-bit grid passes every cell its unquantised twin passes
            out["passkey_cells_lost_8bit"] = lost
        if headline in per and dense is not None:
            out["cells_sparse_pass_where_dense_passes"] = per[headline]["pass_where_dense_passes"]
        rnd = [n for n in per if n.startswith("random")]
        if rnd and dense is not None:
            out["cells_random_pass_where_dense_passes"] = per[rnd[0]]["pass_where_dense_passes"]
    if "perplexity" in res:
        pp = res["perplexity"]
        n = str(max(pp["lengths"]))
        dense = pp["variants"]["dense"]["prefill"][n]["ppl"]
        out["ppl_length"] = int(n)
        out["ppl_windows"] = pp["variants"]["dense"]["prefill"][n].get("windows", pp.get("windows_per_length"))
        out["ppl_dense"] = dense
        for key, name in (("sparse", f"calibrated-s{s0:g}"), ("random", f"random-s{s0:g}"),
                          ("attention_mass", f"attention-mass-s{s0:g}")):
            v = pp["variants"].get(name)
            if v:
                out[f"ppl_ratio_{key}_over_dense"] = v["prefill"][n]["ppl"] / dense
                dw, vw = pp["variants"]["dense"]["prefill"][n].get("window_ppl"), v["prefill"][n].get("window_ppl")
                if dw and vw and len(dw) == len(vw):  # the spread over windows
                    out[f"ppl_ratio_{key}_over_dense_per_window"] = [a / b for a, b in zip(vw, dw)]
                out[f"ppl_ratio_{key}_over_dense_decode_window"] = v["decode"][n]["ppl"] / dense
    return out


def _tmp_tsv(alpha: np.ndarray, name: str) -> str:
    import tempfile

    from lserve_jax.heads import save_pattern

    path = os.path.join(tempfile.gettempdir(), f"lserve-accuracy-{os.getpid()}-{name}.tsv")
    save_pattern(path, alpha)
    return path


if __name__ == "__main__":
    sys.exit(main())
