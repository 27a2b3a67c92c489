"""Long-context accuracy on real weights: RULER-style tasks, dense vs LServe sparse, one process.

    python bench/long_context.py                                   # the default model, every task and length that fits
    python bench/long_context.py --checkpoint ~/.cache/lserve_jax/Qwen2.5-Coder-0.5B-Instruct-Q4_K_M-lserve \
        --pattern bench/patterns/Qwen2.5-Coder-0.5B-Instruct.tsv --tag qwen2.5-coder-0.5b-h100
    python bench/long_context.py --lengths 2048 --samples 5 --tasks niah_single_number,vt --variants dense,sparse

Tasks (`lserve_jax.evals.ruler`, generated offline with --seed, the same prompts for every variant):
single needle (number, word, UUID), multi-key needle with 3 distractors, multi-value, multi-query,
variable tracking, common-words extraction; the haystack is the public-domain text shipped in
lserve_jax/data/ (cycled when a context needs more). A length L counts the prompt and the
generation budget (RULER's convention): each prompt is exactly L - max_new_tokens tokens, chat
template, question and answer prefix included. The queried needle of sample i of n sits at depth
i/(n-1). Score: the fraction of expected answers found in the greedy output (exact, whole-token
matches); per cell the mean over samples with a 95% Wilson interval, per length the mean over
tasks with a stratified bootstrap interval.

Variants (--variants, every engine built with `lserve_jax.load`, greedy decoding through
`Engine.generate`, prompts batched --batch at a time):

  dense        every head dense, every page read in decode
  sparse       LServe's default knobs (lserve_jax.config.SparseConfig, unscaled) with the head pattern
  sparse-kv    the same with page selection shared by each KV head's query group (selection_mode=kv_head)
  random       a random pattern at the same static sparsity (the same fraction of streaming heads)
  decode-only  dense prefill (streaming heads' prefill window covers the prompt), sparse decode
  budget2048   the default knobs with a decode token budget of 2048 (--tight-budget)

--custom NAME:knob=value,... adds a variant: the default knobs with those SparseConfig fields
changed (e.g. --custom ring1k:decode_local=1024 --custom page16:page_size=16,logical_page_size=4);
--knob key=value changes a knob of every sparse variant (e.g. --knob static_sparsity=0.75).

Writes bench/results/long_context-<tag>.json (per variant, length and task: accuracy, interval,
scores and outputs; the averages; summary keys long_ctx_avg_{dense,sparse,random}_32k when 32768
is among the lengths), a PNG of accuracy vs length per variant beside it (with matplotlib), and a
markdown table on stdout. --resume keeps the cells of a previous run with the same prompts and knobs.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (ROOT, os.path.join(ROOT, "bench")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import numpy as np  # noqa: E402

from accuracy import REPO_PATTERN, _tmp_tsv, log  # noqa: E402  (bench/accuracy.py)
from common import environment, write_json  # noqa: E402  (bench/common.py)
from lserve_jax.config import ConfigError, SparseConfig  # noqa: E402
from lserve_jax.evals import random_pattern, ruler  # noqa: E402

BASE_VARIANTS = ("dense", "sparse", "sparse-kv", "random", "decode-only", "budget2048")
KNOB_FIELDS = {f.name: f.type for f in dataclasses.fields(SparseConfig)}


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    pattern: str | None  # "given" | "random" | None (dense)
    knobs: tuple[tuple[str, object], ...] = ()  # SparseConfig fields changed from the defaults
    note: str = ""

    def sparse_config(self, max_len: int) -> SparseConfig:
        if self.pattern is None:
            return SparseConfig(static_sparsity=0.0, token_budget=max(max_len, SparseConfig.token_budget),
                                sparse_decode=False)
        return SparseConfig(**dict(self.knobs))

    def record(self, max_len: int) -> dict:
        return {"pattern": self.pattern, "note": self.note, "knobs": dataclasses.asdict(self.sparse_config(max_len))}


def _knob_value(key: str, value: str):
    if key not in KNOB_FIELDS:
        raise argparse.ArgumentTypeError(f"unknown knob {key!r}; SparseConfig has {', '.join(KNOB_FIELDS)}")
    default = getattr(SparseConfig(), key)
    try:
        if isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return value.lower() in ("true", "1")
        return type(default)(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"knob {key}={value!r}: expected a {type(default).__name__}") from None


def _knobs(text: str) -> tuple[tuple[str, object], ...]:
    out = []
    for item in filter(None, text.split(",")):
        if "=" not in item:
            raise argparse.ArgumentTypeError(f"expected knob=value, got {item!r}")
        k, v = item.split("=", 1)
        out.append((k.strip(), _knob_value(k.strip(), v.strip())))
    return tuple(out)


def _custom(text: str) -> tuple[str, tuple]:
    name, sep, knobs = text.partition(":")
    if not sep or not name or name in BASE_VARIANTS:
        raise argparse.ArgumentTypeError(f"--custom wants NAME:knob=value,... with a new NAME, got {text!r}")
    return name, _knobs(knobs)


def _tasks(text: str) -> list[str]:
    names = list(ruler.TASKS) if text == "all" else [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in ruler.TASKS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown task(s) {bad or text!r}; known: {', '.join(ruler.TASKS)} (or 'all')")
    return names


def _lengths(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"lengths are comma-separated token counts, got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"lengths must be positive token counts, got {text!r}")
    return sorted(set(out))


def _variant_names(text: str) -> list[str]:
    if text.strip() == "none":
        return []  # --custom variants only
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in names if v not in BASE_VARIANTS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {bad or text!r}; known: {', '.join(BASE_VARIANTS)} "
                                         "(add others with --custom)")
    return names


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def build_variants(names, custom, shared, tight_budget: int) -> list[Variant]:
    out = []
    for n in names:
        if n == "dense":
            out.append(Variant("dense", None, note="every head dense, every page read in decode"))
        elif n == "sparse":
            out.append(Variant("sparse", "given", shared, "default knobs, the head pattern"))
        elif n == "sparse-kv":
            out.append(Variant("sparse-kv", "given", shared + (("selection_mode", "kv_head"),),
                               "default knobs, page selection per KV head"))
        elif n == "random":
            out.append(Variant("random", "random", shared, "a random pattern at the same static sparsity"))
        elif n == "decode-only":
            out.append(Variant("decode-only", "given", shared + (("prefill_local", 0),),  # 0: set to the length
                               "dense prefill (the streaming heads' prefill window covers the prompt), sparse decode"))
        elif n == "budget2048":
            out.append(Variant(f"budget{tight_budget}", "given", shared + (("token_budget", tight_budget),),
                               f"decode token budget {tight_budget}"))
    for name, knobs in custom:
        out.append(Variant(name, "given", shared + knobs, "default knobs with " +
                           ", ".join(f"{k}={v}" for k, v in knobs)))
    return out


def _resolve(v: Variant, max_len: int) -> Variant:
    """decode-only's prefill window: the longest prompt."""
    return dataclasses.replace(v, knobs=tuple((k, max_len if (k == "prefill_local" and val == 0) else val)
                                              for k, val in v.knobs))


# ------------------------------------------------------------------------------------------------
# Output.
# ------------------------------------------------------------------------------------------------


def _fmt(cell: dict) -> str:
    lo, hi = cell["ci95"]
    return f"{cell['acc']:.2f} [{lo:.2f},{hi:.2f}]"


def table(res: dict) -> str:
    lengths = [str(n) for n in res["lengths"]]
    out = ["| task | variant | " + " | ".join(lengths) + " |", "|---|---|" + "---|" * len(lengths)]
    for task in res["tasks"] + ["average"]:
        for name, by_len in res["results"].items():
            src = res["averages"][name] if task == "average" else by_len
            cells = [(_fmt(src[n]) if task == "average" else _fmt(src[n][task])) if n in src and
                     (task == "average" or task in src[n]) else "-" for n in lengths]
            out.append(f"| {task} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot(path: str, res: dict) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ["average"] + res["tasks"]
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, task in zip(axes.flat, panels):
        for name in res["results"]:
            src = (res["averages"][name] if task == "average"
                   else {n: c.get(task) for n, c in res["results"][name].items()})
            xs = [n for n in res["lengths"] if src.get(str(n))]
            ys = [src[str(n)]["acc"] for n in xs]
            err = np.array([[y - src[str(n)]["ci95"][0], src[str(n)]["ci95"][1] - y] for n, y in zip(xs, ys)]).T
            ax.errorbar(xs, ys, yerr=err if task == "average" and len(xs) else None, marker="o", ms=3,
                        capsize=2, label=name)
        ax.set_xscale("log", base=2)
        ax.set_xticks(res["lengths"], [f"{n // 1024}K" if n >= 1024 else str(n) for n in res["lengths"]], fontsize=7)
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("context tokens", fontsize=7)
        ax.set_ylabel("accuracy", fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"RULER-style accuracy, {res['model']} (95% intervals on the average)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def averages(results: dict, tasks: list[str], seed: int) -> dict:
    out = {}
    for name, by_len in results.items():
        out[name] = {}
        for n, cells in by_len.items():
            if all(t in cells for t in tasks):
                groups = [cells[t]["scores"] for t in tasks]
                out[name][n] = {"acc": float(np.mean([np.mean(g) for g in groups])),
                                "ci95": list(ruler.bootstrap_ci(groups, seed=seed)), "tasks": len(tasks)}
    return out


def summary(res: dict) -> dict:
    avg = res["averages"]
    out: dict = {"long_ctx_avg": {v: {n: a["acc"] for n, a in by.items()} for v, by in avg.items()}}
    top = str(max(res["lengths"]))
    for v in avg:
        if "dense" in avg and top in avg[v] and top in avg["dense"]:
            out.setdefault(f"delta_vs_dense_at_{top}", {})[v] = avg[v][top]["acc"] - avg["dense"][top]["acc"]
    if "32768" in {str(n) for n in res["lengths"]}:
        for key in ("dense", "sparse", "random"):
            if "32768" in avg.get(key, {}):
                out[f"long_ctx_avg_{key}_32k"] = avg[key]["32768"]["acc"]
    return out


# ------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="converted checkpoint directory (default: the default model, "
                                         "SmolLM2-135M-Instruct, fetched and converted on first use)")
    ap.add_argument("--pattern", help="head pattern TSV/.npy for the sparse variants (default: the checkpoint's "
                                      "head_pattern, else the repo's SmolLM2 pattern for the default model)")
    ap.add_argument("--tasks", type=_tasks, default=list(ruler.TASKS),
                    help=f"comma-separated, or 'all' (default): {', '.join(ruler.TASKS)}")
    ap.add_argument("--lengths", type=_lengths, default=None,
                    help="comma-separated lengths in tokens of the model's tokenizer, prompt + generation "
                         f"budget (default: {','.join(map(str, ruler.DEFAULT_LENGTHS))}, those within the model's "
                         "context; a given length beyond it is an error)")
    ap.add_argument("--samples", type=_positive, default=ruler.DEFAULT_SAMPLES,
                    help="samples per task and length, needle depths evenly from 0 to 1 (%(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="prompt generation seed (%(default)s)")
    ap.add_argument("--variants", type=_variant_names, default=list(BASE_VARIANTS),
                    help=f"comma-separated, from {', '.join(BASE_VARIANTS)} (default: all; 'none': --custom only)")
    ap.add_argument("--custom", type=_custom, action="append", default=[], metavar="NAME:KNOB=V,...",
                    help="an extra sparse variant: the default knobs with these SparseConfig fields changed")
    ap.add_argument("--knob", type=_knobs, action="append", default=[], metavar="KNOB=V,...",
                    help="change a SparseConfig knob of every sparse variant (default: LServe's defaults)")
    ap.add_argument("--tight-budget", type=_positive, default=2048, help="budget2048's token budget (%(default)s)")
    ap.add_argument("--random-seed", type=int, default=0, help="seed of the random pattern (%(default)s)")
    ap.add_argument("--batch", type=_positive, default=8, help="prompts per Engine.generate call (%(default)s)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="weights dtype (default: stored)")
    ap.add_argument("--no-chat", action="store_true",
                    help="plain prompts, without the chat template (the default for a model without one)")
    ap.add_argument("--no-snap", action="store_true", help="needles at the exact depth, not the nearest sentence start")
    ap.add_argument("--text", help="haystack text file (default: the shipped lserve_jax/data/eb1911_shakespeare.txt)")
    ap.add_argument("--tag", help="name of the results (default: <model>-<date>)")
    ap.add_argument("--out", help="JSON path (default: bench/results/long_context-<tag>.json)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the cells --out already has for the same prompts and knobs")
    ap.add_argument("--no-outputs", action="store_true", help="do not store the generated texts in the JSON")
    args = ap.parse_args(argv)

    import lserve_jax
    from lserve_jax.checkpoint import CheckpointError, open_checkpoint
    from lserve_jax.heads import check_shape, load_pattern
    from lserve_jax.sampling import SamplingParams
    from lserve_jax.tokenizer import Tokenizer, TokenizerError

    shared = tuple(kv for group in args.knob for kv in group)
    try:
        variants = build_variants(args.variants, args.custom, shared, args.tight_budget)
        for v in variants:
            _resolve(v, 1 << 20).sparse_config(1 << 20)  # knob values checked before any work
    except (ConfigError, TypeError) as e:
        ap.error(f"invalid knobs: {e}")
    if len({v.name for v in variants}) < len(variants):
        ap.error("two variants have the same name")
    if not variants:
        ap.error("no variant to run: --variants none needs --custom")

    try:
        ckpt = open_checkpoint(args.checkpoint or lserve_jax.default_checkpoint())
    except (CheckpointError, OSError) as e:
        ap.error(str(e))
    cfg = ckpt.config
    if not ckpt.tokenizer_file.exists():
        ap.error(f"{ckpt.path} has no tokenizer.json: the tasks are built from text")
    tok = Tokenizer.from_checkpoint_dir(ckpt.path, cfg.eos_token_ids)
    encode = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    context = cfg.max_position_embeddings
    if args.lengths is None:
        lengths = [n for n in ruler.DEFAULT_LENGTHS if n <= context]
        if len(lengths) < len(ruler.DEFAULT_LENGTHS):
            log(f"the model's context is {context} tokens: lengths {[n for n in ruler.DEFAULT_LENGTHS if n > context]} "
                "are left out")
        if not lengths:
            ap.error(f"no default length fits the model's context ({context} tokens): pass --lengths")
    else:
        lengths = args.lengths
        too_long = [n for n in lengths if n > context]
        if too_long:
            ap.error(f"lengths {too_long} exceed the model's context ({context} tokens, max_position_embeddings "
                     f"of {ckpt.path})")

    alpha = None
    if any(v.pattern for v in variants):
        path = args.pattern or (str(ckpt.pattern_file) if ckpt.pattern_file else None)
        if path is None and args.checkpoint is None:
            path = REPO_PATTERN
        if path is None:
            ap.error(f"{ckpt.path} has no head pattern: pass --pattern (a DuoAttention TSV), or --variants dense")
        try:
            alpha = load_pattern(path)
            check_shape(alpha, cfg.num_layers, cfg.num_kv_heads)
        except (OSError, ValueError) as e:
            ap.error(f"pattern {path}: {e}")
        pattern_path = path

    frame = ruler.Frame.plain(encode)
    if not args.no_chat:
        if not tok.chat_template:
            log(f"{ckpt.path} has no chat template: plain prompts")
        else:
            try:
                frame = ruler.Frame.chat_template(tok)
            except (TokenizerError, ValueError) as e:
                ap.error(f"chat template: {e} (pass --no-chat for plain prompts)")
    try:
        if args.text:
            with open(args.text, encoding="utf-8") as f:
                haystack = ruler.Haystack.from_text(encode, f.read())
        else:
            haystack = ruler.Haystack.from_text(encode, ruler.corpus.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        ap.error(f"haystack text: {e}")

    t = time.perf_counter()
    prompts: dict[int, dict[str, list[ruler.RulerSample]]] = {}
    try:
        for n in lengths:
            prompts[n] = {task: [dataclasses.replace(s, ids=np.asarray(s.ids, np.int32))  # compact: 4 bytes a token
                                 for s in ruler.make_samples(task, encode, n, args.samples, seed=args.seed,
                                                             frame=frame, haystack=haystack, snap=not args.no_snap)]
                          for task in args.tasks}
    except ValueError as e:
        ap.error(str(e))
    log(f"{len(args.tasks)} tasks x {len(lengths)} lengths x {args.samples} samples built in "
        f"{time.perf_counter() - t:.1f} s (haystack: {len(haystack)} tokens, {len(haystack.starts)} sentences)")
    max_len = max(lengths)

    model = os.path.basename(os.path.normpath(str(ckpt.path))).removesuffix("-lserve")
    env = environment()
    tag = args.tag or f"{model}-{env['date'][:10]}"
    out = args.out or os.path.join(ROOT, "bench", "results", f"long_context-{tag}.json")
    fingerprint = {"checkpoint": os.path.abspath(str(ckpt.path)), "seed": args.seed, "samples": args.samples,
                   "chat": frame.chat, "snap": not args.no_snap, "text": args.text or "shipped",
                   "dtype": args.dtype}
    old = {}
    if args.resume and os.path.exists(out):
        with open(out) as f:
            old = json.load(f)
        if old.get("fingerprint") != fingerprint:
            log(f"--resume: {out} was made with other prompts or weights; nothing kept")
            old = {}
    res = {**env, "model": model, "fingerprint": fingerprint, "context": context, "tasks": args.tasks,
           "lengths": lengths, "samples": args.samples,
           "task_descriptions": {t: ruler.TASKS[t].description for t in args.tasks},
           "defaults": dataclasses.asdict(SparseConfig()), "variants": {},
           "max_new_tokens": {t: prompts[lengths[0]][t][0].max_new_tokens for t in args.tasks},
           "prompts": {str(n): {t: [{"answers": s.answers, "depth": s.depth, "needle_depths": s.needle_depths,
                                     "prompt_tokens": s.prompt_tokens} for s in ss] for t, ss in by.items()}
                       for n, by in prompts.items()},
           "results": {}}

    def save():
        res["averages"] = averages(res["results"], args.tasks, args.seed)
        res["summary"] = summary(res)
        write_json(out, res)

    patterns = {} if alpha is None else {"given": alpha, "random": random_pattern(alpha.shape, args.random_seed)}
    cells_total = len(variants) * len(lengths) * len(args.tasks)
    done = ran = 0
    t_run = time.perf_counter()
    for vi, v in enumerate(variants):
        v = _resolve(v, max_len)
        sp = v.sparse_config(max_len)
        rec = v.record(max_len)
        if v.pattern is not None:  # what the pattern is (a --resume keeps cells of the same gates only)
            rec.update(pattern_file=os.path.abspath(pattern_path),
                       alpha_digest=hashlib.sha256(np.round(patterns[v.pattern], 6).tobytes()).hexdigest()[:16],
                       **({"random_seed": args.random_seed} if v.pattern == "random" else {}))
        kept = old.get("results", {}).get(v.name, {}) if old.get("variants", {}).get(v.name) == rec else {}
        res["variants"][v.name] = rec
        res["results"][v.name] = by_len = {}
        engine = None
        for n in lengths:
            by_len[str(n)] = cells = {}
            for task in args.tasks:
                done += 1
                if task in kept.get(str(n), {}):
                    cells[task] = kept[str(n)][task]
                    log(f"[{done}/{cells_total}] {v.name} {n} {task}: {_fmt(cells[task])} (kept)")
                    continue
                if engine is None:
                    pat = None if v.pattern is None else _tmp_tsv(patterns[v.pattern], v.pattern)
                    engine = lserve_jax.load(ckpt.path, pattern=pat, sparse=sp, max_seq_len=max_len, dtype=args.dtype,
                                             progress=False, max_slots=args.batch, weights="checkpoint")
                    log(f"variant {v.name}: {int(sum(engine.spec.layout.num_retrieval))} of "
                        f"{cfg.num_layers * cfg.num_kv_heads} KV heads retrieval; {v.note}")
                samples = prompts[n][task]
                sampling = SamplingParams(max_new_tokens=samples[0].max_new_tokens, temperature=0.0)
                t = time.perf_counter()
                texts = []
                for b in range(0, len(samples), args.batch):
                    gens = engine.generate([s.ids for s in samples[b:b + args.batch]], sampling)
                    texts += [g.text for g in gens]
                scores = [s.score(x) for s, x in zip(samples, texts)]
                acc = float(np.mean(scores))
                cells[task] = {"acc": acc, "ci95": list(ruler.wilson(acc, len(scores))), "n": len(scores),
                               "scores": scores, "seconds": time.perf_counter() - t,
                               **({} if args.no_outputs else {"outputs": texts})}
                ran += 1
                el = time.perf_counter() - t_run
                log(f"[{done}/{cells_total}] {v.name} {n} {task}: {_fmt(cells[task])} "
                    f"({cells[task]['seconds']:.1f} s; {el / 60:.1f} min so far, about "
                    f"{el / ran * (cells_total - done) / 60:.0f} min to go)")
                save()
        del engine
    save()
    png = os.path.splitext(out)[0] + ".png"
    if plot(png, res):
        res["plot"] = os.path.relpath(png, ROOT) if png.startswith(ROOT) else png
    res["table_md"] = table(res)
    write_json(out, res)
    print(res["table_md"])
    print(json.dumps({k: v for k, v in res["summary"].items()}, indent=1))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
