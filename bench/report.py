"""Regenerates BENCHMARKS.md from bench/results/*.json (run from anywhere; no GPU needed).

    python bench/report.py            # writes BENCHMARKS.md at the repo root
"""

from __future__ import annotations

import glob
import json
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")


def _load(pattern: str) -> list[tuple[str, dict]]:
    out = []
    for path in sorted(glob.glob(os.path.join(RESULTS, pattern))):
        with open(path) as f:
            out.append((os.path.basename(path), json.load(f)))
    return out


def _card(device: str) -> str:
    """'h200', 'h100', ... from a device name such as 'NVIDIA H100 80GB HBM3' ('cpu' and others as given)."""
    m = re.search(r"\b([A-Z]\d{2,3})\b", device)
    return m.group(1).lower() if m else (device.split()[0].lower() if device else "unknown")


def _ms(s):
    return "–" if s is None else f"{s * 1e3:,.1f}"


def _x(a, b):
    return "–" if (a is None or b is None or not b) else f"{a / b:.2f}x"


def whole_model_prefill() -> list[str]:
    runs = _load("prefill-*.json")
    if not runs:
        return []
    lines = ["## Whole-model time to first token (llama3-8b shape, batch 1)", "",
             "`python bench/prefill.py`: random bf16 weights (a `+w8a8...` variant: its 8-bit "
             "weights and activations), the real Llama-3-8B-Instruct-Gradient-1048k pattern at "
             "static_sparsity 0.5 (130 of 256 KV heads retrieval), sink 128 / local 8192. TTFT covers every "
             "layer (attention, MLP, cache writes) and the first sampled token. Each row's variant and its "
             "cuDNN dense baseline come from one process (same-run ratio).", "",
             "| T | card | variant | variant (ms) | cuDNN dense bf16 (ms) | speedup | runs | "
             "first call, compile incl. (s) variant / dense | file |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, d in runs:
        card = _card(d.get("env", {}).get("device", "")).upper()
        pts = {(p["t"], p["variant"]): p for p in d.get("points", []) if "median_s" in p}
        for t in sorted({t for t, _ in pts}):
            c = pts.get((t, "dense_cudnn"))
            if not c:
                continue
            variants = sorted((v for tt, v in pts if tt == t and v != "dense_cudnn"), key=lambda v: (v != "sparse", v))
            for variant in variants:
                s = pts[(t, variant)]
                lines.append(f"| {t // 1024}K | {card} | {variant} | {_ms(s['median_s'])} | {_ms(c['median_s'])} | "
                             f"**{_x(c['median_s'], s['median_s'])}** | {s['runs']} / {c['runs']} | "
                             f"{s['first_call_s']:.0f} / {c['first_call_s']:.0f} | `{name}` |")
    return lines + [""]


def attention_prefill() -> list[str]:
    runs = _load("prefill_attn-*.json")
    if not runs:
        return []
    name, d = runs[-1]
    lines = ["## Prefill attention, one layer (llama3-8b heads: 32 q / 8 kv, d=128, bf16, batch 1)", "",
             f"`python bench/prefill_attn.py` (`{name}`). Sparse = `auto` dispatch: retrieval heads through "
             "cuDNN, streaming heads through our Pallas block-sparse kernel, for a layer with 4 of 8 "
             "retrieval heads (the pattern's mean is 4.06). Median of 10 after 3 warm-ups.", "",
             "| T | cuDNN dense (ms) | our kernel, all heads dense (ms, TFLOP/s) | sparse (ms) | speedup vs cuDNN |",
             "|---|---|---|---|---|"]
    for row in d.get("layer_times", []):
        c, pdn, sp = row.get("cudnn_dense", {}), row.get("pallas_dense", {}), row.get("sparse_auto", {})
        if "ms" not in c:
            continue
        lines.append(f"| {row['T'] // 1024}K | {c['ms']:,.2f} | {pdn.get('ms', float('nan')):,.2f} "
                     f"({pdn.get('tflops', float('nan')):.0f}) | {sp.get('ms', float('nan')):,.2f} | "
                     f"**{c['ms'] / sp['ms']:.2f}x** |")
    sweep = d.get("layer_sweep")
    if sweep:
        lines += ["", f"Averaged over all 32 layers' real retrieval counts at {sweep['T'] // 1024}K: "
                      f"{sweep['layer_mean_ms']:.1f} ms per layer."]
    return lines + [""]


def fp8_attention() -> list[str]:
    """cuDNN FP8 flash attention against cuDNN bf16 on one layer's retrieval heads (bench/fp8_attn.py)."""
    lines = []
    for name, d in _load("fp8_attn-*.json"):
        hq, hkv = d["heads"]
        rows = [[f"{p['t'] // 1024}K", p["input"], f"{p['bf16_ms']:.2f}" if "bf16_ms" in p else "-",
                 f"{p['fp8_ms']:.2f}" if "fp8_ms" in p else "-", f"**{p['speedup']:.2f}x**" if "speedup" in p else "-",
                 f"{p['rel_rms']:.4f}" if "rel_rms" in p else p.get("error", "-")[:60]] for p in d["points"]]
        lines += [f"## FP8 prefill attention, one layer's retrieval heads ({_card(d['env']['device']).upper()})", "",
                  f"`python bench/fp8_attn.py` (`{name}`, commit {d['env']['git_commit'][:7]}): Hq {hq} / Hkv {hkv}, "
                  "D 128, causal, batch 1; cuDNN FP8 as prefill impl `cudnn8+triton` runs it (`lserve_jax.ops.attn8`; "
                  "its quantisation inside the timed call) against cuDNN bf16; error: relative RMS of the FP8 output "
                  "against the bf16 one (normal: i.i.d. inputs; peaked: a few dominant keys). "
                  + (d.get("note", "")), ""]
        lines += _table("", ["T", "input", "bf16 ms", "FP8 ms", "speedup", "rel. RMS error"], rows)[2:]
    return lines


def whole_model_decode() -> list[str]:
    runs = _load("decode-*.json")
    if not runs:
        return []
    lines = ["## Whole-model time per output token (llama3-8b shape)", "",
             "`python bench/decode.py --tune` on one GPU (named under each table; newest first): random bf16 weights and a randomly filled KV cache, "
             "the real pattern at sparsity 0.5, budget 4096 tokens, pages 64/16, selector interval 4, ring "
             "128 + 256. All four variants of a point run in one process. *Pipelined*: steps dispatched back to "
             "back (the engine keeps one step in flight), total time / steps; *synced*: mean of steps each "
             "waited for (refresh steps included). The bytes floor is weights + KV read + page statistics "
             "read (amortised over the interval) over the copy bandwidth measured in the same run, against "
             "the pipelined time (dense cuDNN reads faster than that copy, hence > 100%).", ""]
    latest = [(n, d) for n, d in runs if any("pipelined_s" in p for p in d.get("points", []))]
    for name, d in latest[::-1]:
        lines += [f"`{name}` on {d['env'].get('device', '?')}:", "", "| context | batch | variant | ms/token pipelined | vs cuDNN | ms/token synced | vs cuDNN | "
                  "bytes-floor fraction | kernel options |", "|---|---|---|---|---|---|---|---|---|"]
        pts = {(p["ctx"], p["batch"], p["variant"]): p for p in d["points"] if "pipelined_s" in p}
        cudnn_paged = {pt for pt, t in (d.get("tuning_dense") or {}).items()
                       if any(c.get("impl") == "cudnn" and "us" in c for c in t["configs"])}
        for (ctx, b, v), p in pts.items():
            dense = pts.get((ctx, b, "dense_cudnn")) or {}
            ff = p.get("floor_fraction")
            opts = p.get("kernel_options")
            if v == "dense_paged" and f"{ctx}x{b}" in cudnn_paged:
                opts = "cuDNN paged attention (decode `cudnn`)"
            lines.append(f"| {ctx // 1024}K | {b} | {v} | {_ms(p['pipelined_s'])} | "
                         f"{_x(dense.get('pipelined_s'), p['pipelined_s'])} | {_ms(p['mean_s'])} | "
                         f"{_x(dense.get('mean_s'), p['mean_s'])} | {'–' if ff is None else f'{ff:.0%}'} | "
                         f"{'–' if opts is None else (opts or 'defaults')} |")
        bw = d.get("copy_bandwidth_Bps")
        lines.append(f"\n`{name}` (commit {d['env'].get('git_commit', '?')})"
                     + (f": copy bandwidth {bw / 1e12:.2f} TB/s, weights {d['weights_bytes'] / 1e9:.1f} GB." if bw else "."))
        if d.get("summary"):
            lines += ["", "Summary: " + ", ".join(f"`{k}` = {_fmt(v)}" for k, v in d["summary"].items())]
        for key, what in (("tuning", "Tuning"), ("tuning_dense", "Dense paged tuning")):
            for point, t in (d.get(key) or {}).items():
                cfgs = ", ".join(f"{c.get('options') or c.get('impl') or 'defaults'}: {c['us']:.1f}"
                                 for c in t["configs"] if "us" in c)
                lines += ["", f"{what} at {point} (one layer, R={t['retrieval_heads']}, µs per call): {cfgs}; "
                              f"chosen {t['chosen'] or 'defaults'}" + (" (the Triton kernel's options; the dense "
                              "layout's bf16 decode runs `cudnn`, cuDNN's paged attention, first in the default "
                              "order)" if any(c.get("impl") == "cudnn" for c in t["configs"]) else "") + "."]
        lines.append("")
    for name, d in runs:
        if d.get("max_batch"):
            lines += ["", f"Largest batch whose cache fits beside the weights (`python bench/decode.py --max-batch`, "
                          f"`{name}`, {d['env'].get('device', '?')}), confirmed by running decode steps at it:", "",
                      "| context | variant | max batch | GiB per sequence | weights GB |", "|---|---|---|---|---|"]
            lines += [f"| {r['ctx'] // 1024}K | {r['variant']} | "
                      f"{r['max_batch'] if r['max_batch'] else 'none confirmed (tried ' + ', '.join(str(a['batch']) for a in r.get('attempts', [])) + ')'} | "
                      f"{r['per_seq_bytes'] / 2**30:.2f} | {r['weights_bytes'] / 1e9:.1f} |" for r in d["max_batch"]]
    older = [(n, d) for n, d in runs if all(n != m for m, _ in latest) and any("median_s" in p for p in d.get("points", []))]
    for name, d in older:
        lines += ["", f"Earlier run `{name}` (before the fused kernels; median of synced steps, which hides "
                      "the refresh steps):", "", "| context | batch | variant | ms/token |", "|---|---|---|---|"]
        for p in d["points"]:
            if "median_s" in p:
                lines.append(f"| {p['ctx'] // 1024}K | {p['batch']} | {p['variant']} | {_ms(p['median_s'])} |")
    return lines + [""]


def decode_profile() -> list[str]:
    runs = _load("profile_decode-*.json")
    if not runs:
        return []
    lines = ["## Where a decode step's GPU time goes", "",
             "`python bench/profile_decode.py`: a `jax.profiler` trace of 8 steps read back by "
             "`bench/xplane.py`; GPU busy = kernel time summed per step. `no_attention` is the same model "
             "without attention or cache (weights and launches only); `@rows1` runs without padding the "
             "decode projections to 4 rows; `xla-nocb` ran with XLA command buffers off.", "",
             "| file | context | batch | variant | synced ms | pipelined ms | GPU busy ms | kernels/step |",
             "|---|---|---|---|---|---|---|---|"]
    notes = {}
    for name, d in runs:
        if d.get("note"):
            notes.setdefault(d["note"], []).append(name)
        for p in d.get("points", []):
            pr = p.get("profile") or {}
            if "mean_s" not in p:
                continue
            lines.append(f"| `{name.removeprefix('profile_decode-').removesuffix('.json')}` | {p['ctx'] // 1024}K | "
                         f"{p['batch']} | {p['variant']} | {_ms(p['mean_s'])} | {_ms(p['pipelined_s'])} | "
                         f"{_ms(pr.get('gpu_busy_us', 0) / 1e6) if pr else '–'} | "
                         f"{pr.get('kernels_per_step', 0):.0f} |")
    for note, names in notes.items():
        lines += ["", f"{', '.join(f'`{n}`' for n in names)}: {note}."]
    return lines + [""]


def attention_decode() -> list[str]:
    runs = _load("decode_attn-*.json")
    if not runs:
        return []
    name, d = runs[-1]
    lines = ["## Decode attention, one layer (R=4 retrieval + S=4 streaming KV heads)", "",
             f"`python bench/decode_attn.py` (`{name}`), times in µs."]
    if d.get("caveat"):
        lines += ["", f"Caveat recorded with the run: {d['caveat']}"]
    if d.get("note"):
        lines += ["", f"Note recorded with the run: {d['note']}"]
    if d.get("table"):
        lines += ["", "```", d["table"].rstrip(), "```"]
    return lines + [""]


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.5g}"
    if isinstance(v, list):
        return ", ".join(_fmt(x) for x in v)
    return str(v)


def _summary_tables(d: dict, skip: tuple[type, ...]) -> list[str]:
    """An accuracy run's summary metrics (leaving out values of the `skip` types) as a table,
    then the run's own markdown tables."""
    flat = {k: v for k, v in (d.get("summary") or {}).items() if not isinstance(v, skip)}
    lines = ["", "| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in flat.items()] if flat else []
    return lines + (["", d["table_md"].rstrip()] if d.get("table_md") else [])


def accuracy(prefix: str = "accuracy", title: str = "Accuracy on real weights (SmolLM2-135M-Instruct, CPU)",
             how: str = "`python bench/accuracy.py`", runs: int = 1) -> list[str]:
    """The newest `runs` accuracy runs whose JSON names start with `prefix`, under one heading."""
    found = _load(f"{prefix}-*.json")[-runs:]
    if not found:
        return []
    lines = [f"## {title}"]
    for name, d in found:
        lines += ["", f"{how} (`{name}`)."]
        if d.get("knobs"):
            lines += ["", "Sparse knobs: " + ", ".join(f"{k}={v}" for k, v in d["knobs"].items())]
        if d.get("grid", {}).get("trials", 1) > 1:
            lines += ["", f"{d['grid']['trials']} pass keys per cell; a cell passes when every key is found."]
        summary = d.get("summary") or {}
        per = summary.get("per_variant")
        if per:
            twin = any("pass_where_twin_passes" in v for v in per.values())
            mean = any("mean_pass" in v for v in per.values())
            lines += ["", "| variant | cells passed |" + (" keys found |" if mean else "") +
                      " passed where dense passes |" + (" passed where the unquantised twin passes |" if twin else ""),
                      "|---|---|---|" + ("---|" if mean else "") + ("---|" if twin else "")]
            lines += [f"| {k} | {v['cells_pass']} |" + (f" {v.get('mean_pass', 0):.0%} |" if mean else "") +
                      f" {v.get('pass_where_dense_passes', '-')} |" +
                      (f" {v.get('pass_where_twin_passes', '-')} |" if twin else "") for k, v in per.items()]
        lines += _summary_tables(d, skip=(dict,))
        png = os.path.join(RESULTS, os.path.splitext(name)[0] + ".png")
        if os.path.exists(png):
            lines += ["", f"![passkey grid](bench/results/{os.path.basename(png)})"]
    return lines + [""]


def accuracy_8bit() -> list[str]:
    """The pass-key grid with 8-bit weights and KV pages beside the unquantised variants (#18)."""
    return accuracy("accuracy8", "Pass-key grid with 8-bit weights and KV (SmolLM2-135M-Instruct, CPU)",
                    "`python bench/accuracy.py --variants dense,calibrated-s0.5-b256 --skip-ppl`, then the same "
                    "with `--weights int8 --kv-dtype int8 --resume` (INT8 W8A8 with SmoothQuant smoothing, int8 KV "
                    "pages with per-token scales; every 8-bit variant against its unquantised twin of the same run)",
                    runs=3)


def second_model() -> list[str]:
    """The accuracy study on a second model (bench/second_model.sh), newest run."""
    runs = _load("second_model-*.json")
    if not runs:
        return []
    name, d = runs[-1]
    lines = [f"## Accuracy on a second model ({d.get('model', '?')}, {d.get('backend', '?')})", "",
             f"`bench/second_model.sh` (`{name}`). {d.get('note', '')}"]
    lines += _summary_tables(d, skip=(dict, list))
    if d.get("heatmap"):
        lines += ["", f"![passkey grid]({d['heatmap']})"]
    return lines + [""]


def calibration_sweep() -> list[str]:
    """Every calib_sweep run: one row per calibration setting (or mean-of-gates combination)."""
    runs = _load("calib_sweep-*.json")
    if not runs:
        return []
    first = runs[0][1]
    k = first.get("knobs", {})
    lines = ["## Head-pattern calibration settings (SmolLM2-135M-Instruct, H200)", "",
             "`python bench/calib_sweep.py`: each setting is the shipped calibration defaults "
             f"({', '.join(f'{a}={b}' for a, b in first.get('shipped', {}).items() if a in ('haystack', 'sink', 'local', 'lengths', 'steps', 'seed'))}) "
             "with the overrides shown, then the pattern at "
             f"{first.get('sparsity', 0.5):.0%} streaming heads is scored: perplexity at {first.get('ppl_length')} "
             f"tokens over {first.get('ppl_windows')} windows of the corpus's evaluation half, as a ratio to dense, "
             f"with streaming heads seeing the prefill window ({k.get('prefill_sink')}+{k.get('prefill_local')}) and "
             f"the decode window ({k.get('decode_sink')}+{k.get('decode_local')}); and a teacher-forced pass-key "
             "proxy on the accuracy grid's prompts (cells passed where dense passes). `a+b` rows score the mean "
             "of two settings' gates; `X/...` rows re-rank the boundary of pattern X (`refine_boundary`, see each "
             "run's note below). Runs a-d predate the refinement (optimisation only). The shipped pattern is "
             "run f's `base/r4096`: filler samples, seed 0, then the refinement.", "",
             "| run | setting | overrides | ppl ratio, prefill window | ppl ratio, decode window | pass-key proxy |",
             "|---|---|---|---|---|---|"]
    notes = []
    for name, d in runs:
        run = name.removesuffix('.json').removeprefix('calib_sweep-')
        if d.get("note"):
            notes.append(f"* {run}: {d['note']}")
        dense = d.get("dense", {}).get("proxy_pass")
        for v, e in d.get("variants", {}).items():
            if e.get("unscored"):  # optimised only, scored after refinement (--skip-unrefined)
                continue
            over = ", ".join(f"{a}={b}" for a, b in (e.get("overrides") or {}).items())
            if e.get("refined_from"):
                over = f"boundary of {e['refined_from']} re-ranked" + (f" ({e['rule']})" if e.get("rule") else "") \
                    + (f" from {e['windows']} windows" if e.get("windows") else "")
            elif e.get("combo") and len(e["combo"]) == 1:
                over = f"gates of {e['combo'][0]} from an earlier run"
            elif e.get("combo"):
                over = "mean of the gates of " + " and ".join(e["combo"])
            lines.append(f"| {run} | {v} | "
                         f"{over or 'shipped'} | "
                         f"{e['ppl_ratio_prefill']:.4f} | {e['ppl_ratio_decode']:.4f} | "
                         f"{e['proxy_pass_where_dense']}/{dense} |")
    return lines + [""] + notes + ([""] if notes else [])


def _table(caption: str, header: list[str], rows: list[list]) -> list[str]:
    """A captioned markdown table, then a blank line."""
    return [caption, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(map(str, r)) + " |" for r in rows] + [""]


def offset_prefill() -> list[str]:
    """The chunked (offset) form of the prefill kernel vs its plain form (bench/kernel_check.sh)."""
    lines = []
    for path in sorted(glob.glob(os.path.join(RESULTS, "kernel_check-*", "prefill_offset.json"))):
        with open(path) as f:
            d = json.load(f)
        m, sh = d["meta"], d["meta"]["shapes"]
        lines += [f"## Prefill kernel, chunked (offset) form ({m['device']}, jax {m['jax']})", ""]
        lines += _table(f"`bash bench/kernel_check.sh` (`{os.path.relpath(path, ROOT)}`): a {sh['t']}-token chunk "
                        f"whose queries sit at `offset` after the keys already cached (Tk = offset + chunk); "
                        f"Hq {sh['hq']}, Hkv {sh['hkv']}, D {sh['d']}, {sh['dtype']}; streaming heads sink "
                        f"{sh['sink']} / local {sh['local']}.",
                        ["heads", "form", "offset", "Tk", "ms (median)", "TFLOP/s", "finite"],
                        [[r["heads"], r["form"], r["offset"], r["tk"], f"{r['ms_median']:.2f}", f"{r['tflops']:.1f}",
                          r["finite"]] for r in d["rows"]])
    return lines


def fp8_weights_accuracy() -> list[str]:
    """Perplexity with 8-bit linear weights and KV (bench/fp8_accuracy.py), every run, by model."""
    runs = sorted(_load("fp8_accuracy-*.json"), key=lambda r: (r[1]["checkpoint"], r[0]))
    if not runs:
        return []
    lines = ["## 8-bit weights and KV: perplexity (real weights, CPU)", "",
             "`python bench/fp8_accuracy.py`: W8A8 FP8 (`--weights fp8`), W8A16 (`--weights fp8-weight-only`) and "
             "W8A8 INT8 with SmoothQuant smoothing (`--weights int8`) weights, KV read back from 8-bit pages "
             "(`--kv-dtype fp8_e4m3` / `int8`, per-token scales, every position as decode reads the cache) against "
             "the unquantised model, compute in float32; sparse = the calibrated pattern at 50% streaming heads "
             "with the prefill window scaled to the model (as bench/accuracy.py). Attention `fp8` (`--attn8`): the "
             "full heads' prefill attention with FP8 operands as prefill impl `cudnn8+triton` computes it "
             "(`lserve_jax.ops.attn8`, emulated).", ""]
    shown = ("ppl_ratio_kv8_over_bf16", "ppl_ratio_w8a8kv8_over_bf16", "w8a8_format", "ppl_ratio_w8a8fp8kv8_over_bf16",
             "ppl_ratio_w8a8int8kv8_over_bf16", "ppl_ratio_attn8_over_bf16", "ppl_ratio_w8a8fp8kv8attn8_over_bf16",
             "ppl_ratio_w8a8int8kv8attn8_over_bf16")
    for name, d in runs:
        attn = any("attention" in r for r in d["rows"])
        lines += _table(f"{d['checkpoint']}, {d['windows']} window(s) of {d['length']} tokens (`{name}`):",
                        ["weights", "KV"] + ["attention"] * attn + ["layout", "ppl", "ratio"],
                        [[r["weights"], r.get("kv", "-")] + [r.get("attention", "-")] * attn
                         + [r["layout"], f"{r['ppl']:.4f}", f"{r['ratio']:.4f}"] for r in d["rows"]])
        keys = {k: d["summary"][k] for k in shown if k in d.get("summary", {})}
        if keys:
            lines += ["Summary (int8 KV, the worse of dense and sparse): "
                      + ", ".join(f"`{k}` {v:.4f}" if isinstance(v, float) else f"`{k}` {v}" for k, v in keys.items()), ""]
    return lines


def kv8_scales() -> list[str]:
    """Which scales FP8 KV pages need (bench/kv8_scales.py), every run."""
    runs = _load("kv8_scales-*.json")
    if not runs:
        return []
    lines = ["## FP8 KV pages: which scales (real weights, CPU)", "",
             "`python bench/kv8_scales.py`: dense attention reading K (after RoPE) and V through e4m3 the way "
             "each layout would store them; perplexity ratio over the unquantised model. `lserve_jax.kv8` "
             "stores one scale per token and head (`token`).", ""]
    for name, d in runs:
        lines += _table(f"{os.path.basename(str(d['checkpoint']))}, {d['windows']} window(s) of {d['length']} "
                        f"tokens (`{name}`):", ["K, V layout", "ppl", "ratio"],
                        [[r["variant"], f"{r['ppl']:.4f}", f"{r['ratio']:.4f}"] for r in d["rows"]])
    return lines


def peer_hf() -> list[str]:
    """Hugging Face transformers vs lserve_jax on the same model and prompts (bench/peer_hf.py)."""
    runs = _load("peer_hf-*.json")
    if not runs:
        return []
    lines = ["## Against Hugging Face transformers, same machine (bench/peer_hf.py)", "",
             "Same weights, prompts and greedy decoding in one process; TTFT and decode tokens/s are medians "
             "of the repeats; `agree`: greedy tokens equal HF's.", ""]
    for name, d in runs:
        lines += [f"`{name}`: {d.get('model', '?')}, {d.get('dtype', '?')}, {d.get('device', '?')}", "",
                  "| prompt | tokens | engine | TTFT | decode tok/s | TTFT vs HF | decode vs HF | agree |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in d.get("results", []):
            hf = r.get("hf") or {}
            for k, v in r.items():
                if not isinstance(v, dict) or "ttft_median_s" not in v:
                    continue
                ttft, tok = v["ttft_median_s"], v["decode_tok_s_median"]
                rel_t = _x(ttft, hf.get("ttft_median_s")) if k != "hf" else "1x"
                rel_d = _x(tok, hf.get("decode_tok_s_median")) if k != "hf" else "1x"
                lines.append(f"| {r['prompt']} | {r['prompt_tokens']} | {k} | {ttft * 1e3:,.0f} ms | {tok:.1f} | "
                             f"{rel_t} | {rel_d} | {v.get('agree', '–')} |")
        lines.append("")
    return lines


def cpu_gemm_table(points: list[dict]) -> list[str]:
    """bench/cpu_gemm.py's points as a markdown table (its own output and BENCHMARKS.md)."""
    lines = ["| rows | layers | XLA ms (median / best) | torch ms (median / best) | XLA GFLOP/s | torch GFLOP/s | "
             "torch / XLA |", "|---|---|---|---|---|---|---|"]
    for q in points:
        x, t = q["xla"], q["torch"]
        lines.append(f"| {q['rows']} | {q['layers']} | {x['median_s'] * 1e3:,.1f} / {x['min_s'] * 1e3:,.1f} | "
                     f"{t['median_s'] * 1e3:,.1f} / {t['min_s'] * 1e3:,.1f} | {x['gflops_median']:.0f} | "
                     f"{t['gflops_median']:.0f} | {q['torch_over_xla_median']:.2f} |")
    return lines


def cpu_gemm() -> list[str]:
    """The weight GEMMs of a prefill chunk on CPU, XLA against torch (bench/cpu_gemm.py)."""
    runs = _load("cpu_gemm-*.json")
    if not runs:
        return []
    lines = ["## CPU weight GEMMs, XLA against torch (bench/cpu_gemm.py)", "",
             "Every layer's q/k/v, o, gate/up and down products chained over a chunk of `rows` tokens as the model "
             "runs them (float32, same weights, the two chains checked equal first), rounds alternating between "
             "XLA and torch in one process: the part of the CPU time to first token that is neither attention nor "
             "overhead.", ""]
    for name, d in runs:
        lines += [f"`{name}`: {d['shape']} shape, {d['env']['device']}, torch threads {d['torch_threads']}"
                  + (f"; {d['note']}" if d.get("note") else ""), ""]
        lines += cpu_gemm_table(d["points"]) + [""]
    return lines


def long_context() -> list[str]:
    """RULER-style long-context accuracy (bench/long_context.py): each run's own table."""
    runs = _load("long_context-*.json")
    if not runs:
        return []
    lines = ["## Long-context accuracy, RULER-style tasks (bench/long_context.py)", "",
             "Exact-match accuracy (fraction of expected answers, whole words) per task, length and variant, "
             "with 95% Wilson intervals in each JSON; the sparse variants use the knobs listed per run.", ""]
    for name, d in runs:
        lines += [f"### `{name}`: {d.get('model', '?')} on {d.get('device', '?')}, {d.get('samples')} samples a cell", ""]
        if d.get("table_md"):
            lines += [d["table_md"].rstrip(), ""]
        if d.get("plot"):
            lines += [f"![accuracy vs length]({d['plot']})", ""]
    return lines


def long_prompt() -> list[str]:
    """One long prompt served alone with chunked prefill (bench/serve.py --long), every run."""
    rows = []
    for path in sorted(glob.glob(os.path.join(RESULTS, "**", "serve-long-*.json"), recursive=True)):
        with open(path) as f:
            d = json.load(f)
        for r in d["runs"]:
            peak = f"{r['peak_bytes'] / (1 << 30):.1f}" if r.get("peak_bytes") else "–"
            rows.append([d["env"]["device"], r["engine"], f"{r['prompt_tokens']:,}", r.get("prefill_chunk", "–"),
                         f"{r['ttft_s']:.1f}" if r.get("ttft_s") else "–", _ms(r.get("tpot_s")), peak,
                         "yes" if r["served"] else f"no ({r.get('error', '')[:60]})",
                         f"`{os.path.relpath(path, RESULTS)}`"])
    if not rows:
        return []
    return ["## One long prompt, chunked prefill (llama3-8b shape, random bf16 weights)", ""] + _table(
        "`python bench/serve.py --long N --engines sparse|dense` (one engine per process, so the peak is "
        "that engine's): the prompt prefilled in chunks by the serving engine, then 16 tokens decoded; "
        "sparse = the real head pattern at 50% streaming heads. Peak = the device allocator's peak bytes "
        "(weights, KV pools, activations).",
        ["device", "engine", "prompt tokens", "chunk", "TTFT s", "TPOT ms", "peak GiB", "served", "file"], rows)


def fp8_gemm() -> list[str]:
    """8-bit vs bf16 projections (bench/fp8_gemm.py), every run (INT8 columns where the run has them)."""
    lines = []
    for name, d in _load("fp8_gemm-*.json"):
        if not d.get("rows") or d["env"].get("backend") == "cpu":
            continue
        int8 = all("int8" in r for r in d["rows"])
        kernel = any("kernel" in r for r in d["rows"])  # the Triton kernel's columns (decode rows only)
        timing = d.get("note", "one product per call (dispatch included)")
        lines += [f"## 8-bit projections vs bf16 ({d['env']['device']}, jax {d['env']['jax']})", ""]
        head = ["weight", "in x out", "rows", "bf16 ms", "W8A8 ms", "W8A16 ms"] + ["INT8 W8A8 ms"] * int8 \
            + ["kernel FP8 ms", "kernel INT8 ms"] * kernel \
            + ["W8A8 speed-up"] + ["INT8 speed-up"] * int8 + ["kernel FP8 speed-up"] * kernel \
            + ["W8A8 GEMM"] + ["INT8 GEMM"] * int8
        rows = []
        for r in d["rows"]:
            row = [r["weight"], "x".join(map(str, r["shape"])), r["rows"], f"{r['bf16']['ms']:.3f}",
                   f"{r['w8a8']['ms']:.3f}", f"{r['w8a16']['ms']:.3f}"]
            i8 = r.get("int8")
            row += [f"{i8['ms']:.3f}"] if i8 else []
            row += [f"{r[v]['ms']:.3f}" if v in r else "-" for v in ("kernel", "kernel-int8")] if kernel else []
            row += [_x(r["bf16"]["ms"], r["w8a8"]["ms"])] + ([_x(r["bf16"]["ms"], i8["ms"])] if i8 else [])
            row += [_x(r["bf16"]["ms"], r["kernel"]["ms"]) if "kernel" in r else "-"] if kernel else []
            row += [" ".join(r["w8a8"]["gemms"]) or "(none named)"]
            row += [" ".join(i8["gemms"]) or "(none named)"] if i8 else []
            rows.append(row)
        lines += _table(f"`python bench/fp8_gemm.py` (`{name}`): `models.layer.project` at the llama3-8b "
                        "projection shapes; W8A8 = FP8 weights and activations (the GEMM XLA calls is named), "
                        "W8A16 = FP8 weights converted in the product, INT8 W8A8 = smoothed int8 activations "
                        "and weights" + (", kernel = the weight-only Triton kernel (`pallas/qmatmul.py`, what "
                                         "decode runs on the GPU) on the FP8 / INT8 weights" if kernel else "")
                        + f"; timing: {timing}.", head, rows)
    return lines


def serving() -> list[str]:
    """The serving benchmark (bench/serve.py), every run file, in-process and through HTTP."""
    lines = []
    files = [f for f in _load("serve-*.json") if not f[0].startswith("serve-long")]
    for name, d in files:
        lines += [f"## Serving: {d['shape']} shape, {d['env']['device']} ({'HTTP' if d.get('http') else 'in process'})", ""]
        pages = ", ".join(f"{k} {v}" for k, v in d.get("num_pages", {}).items())
        lines += _table(f"`python bench/serve.py{' --http' if d.get('http') else ''}` (`{name}`): random weights, "
                        f"prompt lengths x{d['scale']}, {d.get('pool_bytes', 0) / (1 << 30):.2f} GiB of KV pages per "
                        f"engine ({pages} pages), {d['max_slots']} slots; greedy, EOS ignored.",
                        ["engine", "workload", "rate", "prefix cache", "requests", "out tok/s", "total tok/s",
                         "TTFT p50 s", "TTFT p99 s", "TPOT p50 ms", "TPOT p99 ms", "peak running", "hit tokens"],
                        [[r["engine"], r["workload"], r["rate"] or "offline", r["prefix_cache"], r["requests"],
                          f"{r['output_tok_s']:.2f}", f"{r['total_tok_s']:.1f}", f"{r['ttft_p50_s']:.2f}",
                          f"{r['ttft_p99_s']:.2f}", _ms(r["tpot_p50_s"]), _ms(r["tpot_p99_s"]), r["peak_running"],
                          r["prefix_hit_tokens"]] for r in d["runs"]])
        if d.get("summary"):
            lines += ["Summary: " + ", ".join(f"`{k}` {_fmt(v)}" for k, v in d["summary"].items()), ""]
    pairs = {}
    for name, d in files:
        pairs.setdefault((d["shape"], d["scale"], d["env"]["device"], d["env"]["date"][:10]), {})[bool(d.get("http"))] = d
    for (shape, scale, device, _), both in sorted(pairs.items()):
        if len(both) != 2:
            continue
        rows = []
        for ra in both[False]["runs"]:
            rh = next((r for r in both[True]["runs"] if all(r[k] == ra[k] for k in ("engine", "workload", "rate",
                                                                                      "prefix_cache"))), None)
            if rh:
                rows.append([ra["engine"], ra["workload"], ra["rate"] or "offline", f"{ra['total_tok_s']:.1f}",
                             f"{rh['total_tok_s']:.1f}", f"{rh['total_tok_s'] / ra['total_tok_s']:.3f}"])
        lines += _table(f"HTTP overhead ({shape} shape x{scale}, {device}): total tokens/s through the "
                        "OpenAI-compatible server (streaming calls, the client's clock) over in process.",
                        ["engine", "workload", "rate", "in process", "HTTP", "HTTP / in process"], rows)
    return lines


def prefill_summary() -> dict:
    """The issue's prefill summary, from the latest attention run and every whole-model run."""
    summary, sources = {}, []
    attn = _load("prefill_attn-*.json")
    if attn:
        name, d = attn[-1]
        sources.append(name)
        rows = {r["T"]: r for r in d.get("layer_times", [])}
        for t in (131072, 262144):
            r = rows.get(t)
            if r and "ms" in r.get("sparse_auto", {}):
                summary[f"attn_speedup_vs_cudnn_{t // 1024}k"] = r["cudnn_dense"]["ms"] / r["sparse_auto"]["ms"]
        r = rows.get(32768)
        if r:
            # the dense-head path is what `auto` runs for dense heads: cuDNN (ratio 1 by dispatch);
            # our kernel's own ratio is kept beside it
            summary["dense_tflops_vs_cudnn_32k"] = 1.0
            summary["dense_kernel_tflops_vs_cudnn_32k"] = r["pallas_dense"]["tflops"] / r["cudnn_dense"]["tflops"]
    for name, d in _load("prefill-2*.json"):
        pts = {(p["t"], p["variant"]): p["median_s"] for p in d.get("points", []) if "median_s" in p}
        # the issue's figures are the H200's; another card's keep its name beside them
        card = _card(d["env"].get("device", ""))
        for t in {t for t, _ in pts}:
            if (t, "sparse") in pts and (t, "dense_cudnn") in pts:
                key = f"ttft_speedup_vs_cudnn_{t // 1024}k" + ("" if card == "h200" else f"_{card}")
                summary[key] = pts[(t, "dense_cudnn")] / pts[(t, "sparse")]
                sources.append(name)
    return {"summary": summary, "sources": sorted(set(sources)),
            "note": "ratios of medians from the same process; written by bench/report.py"}


def main() -> None:
    s = prefill_summary()
    if s["summary"]:
        with open(os.path.join(RESULTS, "prefill-summary.json"), "w") as f:
            json.dump(s, f, indent=1)
    parts = ["# Benchmarks", "",
             "Every number below comes from a script in `bench/` and a JSON file in `bench/results/`; this "
             "page is regenerated by `python bench/report.py`. GPU: one NVIDIA H200 (jax 0.11.2, CUDA 13) unless "
             "a section names another card (an H100 was lent when the H200 was not).", ""]
    for section in (whole_model_prefill, attention_prefill, fp8_attention, whole_model_decode, decode_profile, attention_decode,
                    offset_prefill, accuracy, accuracy_8bit, second_model, calibration_sweep, fp8_weights_accuracy, kv8_scales,
                    peer_hf, cpu_gemm, long_context, long_prompt, fp8_gemm, serving):
        parts += section()
    with open(os.path.join(ROOT, "BENCHMARKS.md"), "w") as f:
        f.write("\n".join(parts))
    print("wrote BENCHMARKS.md")


if __name__ == "__main__":
    main()
