"""`python -m convert SRC DEST`: an HF directory or a GGUF file -> an lserve_jax checkpoint."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ..checkpoint import atomic_directory, write_checkpoint
from ..config import ModelConfig
from ..heads import PatternError, check_shape, load_pattern
from ..quant import MODES
from ..smoothquant import quantize_model
from .hf import (ConversionError, hf_tensors, is_hf_dir, map_tensors, one_line, read_hf_config,
                 tokenizer_files)

DTYPE_CHOICES = ("bfloat16", "float32", "float16")
QUANTIZE_CHOICES = tuple(MODES)
MAX_MESSAGE = 2000  # characters of an error line; the converters' own lists are capped well below


def _np_dtype(name: str):
    import ml_dtypes

    return {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32, "float16": np.float16}[name]


def _progress(total: int | None, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", disable=not enabled, file=sys.stderr, leave=False)


def load_source(src: Path, dtype: str, *, progress: bool = True):
    """Reads an HF directory or a GGUF file: (ModelConfig, {flat name: array}, tokenizer files, meta)."""
    if src.is_file() and src.suffix == ".gguf":
        from .gguf import read_gguf, tokenizer_files_from_gguf

        gm = read_gguf(src)
        try:
            cfg = ModelConfig.from_hf(gm.hf_config)
        except ValueError as e:
            raise ConversionError(f"{src}: {e}") from None
        n = len(gm.tensors)
        with _progress(n, "convert", progress) as bar:
            arrays = map_tensors(cfg, iter(gm.tensors.items()), _np_dtype(dtype), lambda _: bar.update(),
                                 source=src)
        return cfg, arrays, tokenizer_files_from_gguf(gm), {"source": str(src), "source_format": "gguf"}
    if not src.exists():
        raise ConversionError(f"source not found: {src}")
    if not is_hf_dir(src):
        raise ConversionError(f"{src} is neither a Hugging Face model directory (with config.json) nor a .gguf file")
    _, cfg = read_hf_config(src)
    origin: dict[str, Path] = {}  # tensor name -> its file, for error messages
    with _progress(None, "convert", progress) as bar:
        arrays = map_tensors(cfg, hf_tensors(src, origin), _np_dtype(dtype), lambda _: bar.update(),
                             source=src, origin=origin)
    return cfg, arrays, tokenizer_files(src), {"source": str(src), "source_format": "hf"}


def convert(src: str | Path, dest: str | Path, *, dtype: str = "bfloat16", force: bool = False,
            pattern: str | Path | None = None, progress: bool = True, quantize: str | None = None) -> Path:
    """Converts a checkpoint; returns the destination. Nothing is left at `dest` on failure.
    quantize: "fp8" / "fp8-weight-only" stores the layers' linear weights in FP8 with
    per-output-channel scales, "int8" in INT8 smoothed for int8 activations (calibrated on the
    package's text through the model's own tokenizer; `lserve_jax.quant`, `lserve_jax.smoothquant`);
    the rest stays in `dtype`."""
    import jax.numpy as jnp

    from ..params import from_flat

    # absolute: orbax refuses relative paths, and lserve.json records the source for later
    src, dest = Path(src).expanduser().absolute(), Path(dest).expanduser().absolute()
    if dtype not in DTYPE_CHOICES:
        raise ConversionError(f"--dtype must be one of {DTYPE_CHOICES}, got {dtype!r}")
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise ConversionError(f"--quantize must be one of {QUANTIZE_CHOICES}, got {quantize!r}")
    if dest.exists() and not force:
        raise FileExistsError(f"{dest} already exists (use --force to overwrite)")
    cfg, arrays, tok_files, meta = load_source(src, dtype, progress=progress)
    alpha = None
    if pattern is not None:
        alpha = load_pattern(pattern)
        check_shape(alpha, cfg.num_layers, cfg.num_kv_heads)
    params = from_flat(cfg, {k: jnp.asarray(v) for k, v in arrays.items()})
    if quantize is not None:
        params = quantize_model(params, cfg, quantize, _tokenizer(tok_files))
        meta = {**meta, "weights": quantize}
    with atomic_directory(dest, force=force) as tmp:
        write_checkpoint(tmp, params, cfg, dtype, tokenizer_files=tok_files, pattern=alpha, extra_meta=meta)
    return dest


def _tokenizer(tok_files: dict[str, str]):
    """The source's tokenizer (for calibration text), or None when it ships none."""
    import tempfile

    from ..tokenizer import Tokenizer

    if "tokenizer.json" not in tok_files:
        return None
    with tempfile.TemporaryDirectory() as d:
        for name, text in tok_files.items():
            (Path(d) / name).write_text(text)
        return Tokenizer.from_checkpoint_dir(d)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m convert",
        description="Convert a Hugging Face model directory (safetensors, sharded safetensors, "
                    "pytorch_model*.bin) or a GGUF file into an lserve_jax checkpoint "
                    "(orbax params + config + tokenizer).")
    p.add_argument("src", help="HF model directory (with config.json) or a .gguf file")
    p.add_argument("dest", help="output checkpoint directory (must not exist unless --force)")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPE_CHOICES, help="parameter dtype (default: bfloat16)")
    p.add_argument("--pattern", help="DuoAttention head pattern (full_attention_heads.tsv or .npy) to store with the checkpoint")
    p.add_argument("--quantize", choices=QUANTIZE_CHOICES,
                   help="store the layers' linear weights in 8 bits with per-output-channel scales: 'fp8' "
                        "(e4m3) runs them as W8A8 (FP8 activations too), 'fp8-weight-only' as W8A16, 'int8' as "
                        "W8A8 in INT8 with SmoothQuant smoothing (calibrated on the package's text; the most "
                        "accurate W8A8); embeddings, norms and the LM head stay in --dtype")
    p.add_argument("--force", action="store_true", help="overwrite an existing destination")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        dest = convert(args.src, args.dest, dtype=args.dtype, force=args.force, pattern=args.pattern,
                       progress=not args.quiet, quantize=args.quantize)
    except (ConversionError, PatternError, FileExistsError, ValueError, OSError) as e:
        msg = one_line(e)
        if len(msg) > MAX_MESSAGE:
            msg = msg[:MAX_MESSAGE] + f"... ({len(msg) - MAX_MESSAGE} more characters)"
        print(f"error: {msg}", file=sys.stderr)
        return 1
    cfg = json.loads((dest / "lserve.json").read_text())["model"]
    print(f"wrote {dest} ({cfg['architecture']}, {cfg['num_layers']} layers, {args.dtype}"
          f"{', ' + args.quantize + ' linear weights' if args.quantize else ''})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
