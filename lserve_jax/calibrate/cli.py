"""`python -m lserve_jax.calibrate [CHECKPOINT] ...`: calibrate (or only refine) a checkpoint's
head pattern, write it atomically as a DuoAttention TSV (`<checkpoint>/head_pattern.tsv` or
`--output`) and the run's record (settings, loss curve, gates, refinement, device) as JSON
beside it (or `--curve`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..evals.corpus import haystack_ids, read_text
from ..heads import check_shape, load_pattern, save_pattern
from .config import HAYSTACKS, METHODS, CalibConfig, CalibResult
from .optimize import calibrate
from .refine import refine_boundary

DESCRIPTION = "Head-pattern calibration for any converted checkpoint (DuoAttention-style)."


def write_pattern_atomic(path: str | os.PathLike, alpha: np.ndarray) -> Path:
    """Writes the TSV through a temporary file in the same directory and renames it into place."""
    path = Path(path).expanduser().absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        save_pattern(tmp, alpha)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(",") if x)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lserve_jax.calibrate", description=DESCRIPTION)
    ap.add_argument("checkpoint", nargs="?", help="converted checkpoint directory (default: the default model)")
    d = CalibConfig()
    ap.add_argument("--method", choices=METHODS, default=d.method)
    ap.add_argument("--output", help="pattern TSV path (default: <checkpoint>/head_pattern.tsv)")
    ap.add_argument("--curve", help="JSON of settings, loss curve and gates (default: <output>.json)")
    ap.add_argument("--steps", type=int, default=d.steps, help="optimisation steps / samples (%(default)s)")
    ap.add_argument("--lengths", type=_ints, default=d.lengths, help="sample lengths, comma-separated")
    ap.add_argument("--num-keys", type=int, default=d.num_keys)
    ap.add_argument("--sink", type=int, default=d.sink)
    ap.add_argument("--local", type=int, default=d.local)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--reg", type=float, default=d.reg, help="L1 weight lambda (%(default)s)")
    ap.add_argument("--haystack", choices=HAYSTACKS, default=d.haystack,
                    help="hide the keys in natural text, in tiled filler, or alternately in both (%(default)s)")
    ap.add_argument("--text", help="UTF-8 text file for --haystack text/mixed and the refinement (default: the "
                    "calibration half of the shipped corpus, lserve_jax/data/)")
    ap.add_argument("--text-weight", type=float, default=d.text_weight,
                    help="weight of the MSE over haystack positions past the window (%(default)s)")
    ap.add_argument("--refine-band", type=int, default=d.refine_band,
                    help="boundary refinement: heads on each side of the --refine-sparsity cut re-ranked by "
                    "their measured cost on natural text (%(default)s; 0: off)")
    ap.add_argument("--refine-sparsity", type=float, default=d.refine_sparsity,
                    help="static sparsity whose cut is refined (%(default)s)")
    ap.add_argument("--refine-samples", type=int, default=d.refine_samples, help="text windows (%(default)s)")
    ap.add_argument("--refine-length", type=int, default=None,
                    help=f"tokens per text window (default: {d.refine_length} or the model's context if shorter)")
    ap.add_argument("--refine-local", type=int, default=None, help="local window of the refinement's "
                    "streaming heads (default: --local)")
    ap.add_argument("--from-pattern", help="skip the optimisation: refine the boundary of this pattern TSV")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--max-minutes", type=float, default=None, help="stop the optimisation after the step "
                    "that passes this (the refinement still runs)")
    ap.add_argument("--dtype", default="float32", help="parameter dtype for calibration (%(default)s)")
    args = ap.parse_args(argv)

    from ..api import default_checkpoint
    from ..checkpoint import open_checkpoint
    from ..tokenizer import Tokenizer

    ckpt = open_checkpoint(args.checkpoint or default_checkpoint())
    if not ckpt.tokenizer_file.exists():
        print(f"error: {ckpt.path} has no tokenizer.json (needed to build the samples)", file=sys.stderr)
        return 2
    max_len = ckpt.config.max_position_embeddings
    refine_length = args.refine_length or min(d.refine_length, max_len)
    try:
        cc = CalibConfig(method=args.method, sink=args.sink, local=args.local, lengths=args.lengths,
                         num_keys=args.num_keys, steps=args.steps, lr=args.lr, reg=args.reg, seed=args.seed,
                         haystack=args.haystack, text_weight=args.text_weight, max_minutes=args.max_minutes,
                         refine_band=args.refine_band, refine_sparsity=args.refine_sparsity,
                         refine_samples=args.refine_samples, refine_length=refine_length,
                         refine_local=args.refine_local)
    except ValueError as e:
        ap.error(str(e))
    refine = cc.refines
    if not args.from_pattern and max(cc.lengths) > max_len:
        ap.error(f"--lengths {max(cc.lengths)} exceeds the model context {max_len}")
    if refine and cc.refine_length > max_len:
        ap.error(f"--refine-length {cc.refine_length} exceeds the model context {max_len}")
    if args.from_pattern and not refine:
        ap.error("--from-pattern refines a pattern: it needs --method gradient and --refine-band > 0")
    if args.text and cc.haystack == "filler" and not refine:
        ap.error("--text needs --haystack text or mixed, or the refinement (--refine-band > 0)")
    alpha0 = None
    if args.from_pattern:
        try:
            alpha0 = load_pattern(args.from_pattern)
            check_shape(alpha0, ckpt.config.num_layers, ckpt.config.num_kv_heads)
        except (OSError, ValueError) as e:
            print(f"error: --from-pattern {args.from_pattern}: {e}", file=sys.stderr)
            return 2
    tok = Tokenizer.from_checkpoint_dir(ckpt.path)
    encode = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    haystack = None
    if cc.haystack != "filler" or refine:
        try:
            haystack = encode(read_text(args.text)) if args.text else haystack_ids(encode)
        except (OSError, UnicodeDecodeError) as e:
            print(f"error: cannot read --text {args.text}: {e}", file=sys.stderr)
            return 2
        need = max([*(cc.lengths if cc.haystack != "filler" and alpha0 is None else ()),
                    *((cc.refine_length,) if refine else ())])
        if len(haystack) < need:
            ap.error(f"the haystack text has {len(haystack)} tokens, fewer than the {need} the samples need "
                     f"(--lengths / --refine-length)")
    params = ckpt.load_params(args.dtype)
    print(f"[calibrate] {ckpt.path} ({ckpt.config.num_layers} layers x {ckpt.config.num_kv_heads} KV heads), "
          f"{cc}", flush=True)
    logp = lambda s: print(s, flush=True)  # noqa: E731
    if alpha0 is not None:
        t0 = time.perf_counter()
        alpha, report = refine_boundary(jax.tree.map(jnp.asarray, params), ckpt.config, encode, alpha0, cc,
                                        haystack=haystack, log=logp)
        res = CalibResult(alpha, [], time.perf_counter() - t0, cc, None, report)
    else:
        res = calibrate(params, ckpt.config, encode, cc, haystack=haystack, log=logp)
    out = write_pattern_atomic(args.output or ckpt.path / "head_pattern.tsv", res.alpha)
    curve_path = Path(args.curve) if args.curve else out.with_suffix(".json")
    curve_path.parent.mkdir(parents=True, exist_ok=True)
    dev = jax.devices()[0]
    record = {"checkpoint": str(ckpt.path), "device": "CPU" if dev.platform == "cpu" else dev.device_kind,
              "cpu_cores": os.cpu_count(), **res.to_json()}
    if args.from_pattern:
        record["from_pattern"] = str(Path(args.from_pattern).absolute())
    curve_path.write_text(json.dumps(record, indent=1))
    print(f"[calibrate] wrote {out} and {curve_path} in {res.seconds / 60:.1f} min", flush=True)
    return 0
