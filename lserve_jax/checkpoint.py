"""Converted checkpoints on disk: an orbax params tree plus config, tokenizer and head pattern.

Layout of a checkpoint directory:

    lserve.json            format version, ModelConfig, dtype, where it came from
    params/                orbax-checkpoint of the Params pytree (HF head order)
    tokenizer.json         HF `tokenizers` file
    tokenizer_config.json  chat template and special tokens (optional)
    head_pattern.tsv       DuoAttention gate matrix [layers, kv_heads] (optional)

Writes go to a sibling temporary directory renamed into place at the end, so an interrupted
write never leaves a directory that looks like a checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from .arrays import Arrays
from .config import ConfigError, ModelConfig
from .heads import load_pattern
from .params import Params, abstract_params
from .quant import MODES, abstract_quantized, cast_params

FORMAT_VERSION = 2  # 2: layers hold only the weights their family declares (1: absent q/k/v biases as None)
READABLE_FORMATS = (1, 2)
_V1_OPTIONAL = ("bq", "bk", "bv")  # format 1 stored these as None when a model had no biases
META_FILE = "lserve.json"
PATTERN_FILE = "head_pattern.tsv"
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}
DEBUG_ENV = "LSERVE_JAX_DEBUG"  # set: errors keep the full text of the library error behind them


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, incomplete or corrupted."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    path: Path
    config: ModelConfig
    dtype: str
    meta: dict[str, Any]

    @property
    def tokenizer_file(self) -> Path:
        return self.path / "tokenizer.json"

    @property
    def pattern_file(self) -> Path | None:
        p = self.path / PATTERN_FILE
        return p if p.exists() else None

    def tokenizer_config(self) -> dict[str, Any]:
        p = self.path / "tokenizer_config.json"
        return json.loads(p.read_text()) if p.exists() else {}

    def head_pattern(self) -> np.ndarray | None:
        p = self.pattern_file
        return None if p is None else load_pattern(p)

    @property
    def weights(self) -> str | None:
        """The 8-bit form of the linear weights ("fp8", "fp8-weight-only", "int8"; `lserve_jax.quant`), or None."""
        return self.meta.get("weights")

    def load_params(self, dtype: str | None = None) -> Params:
        """Restores the params (optionally cast to another dtype)."""
        import orbax.checkpoint as ocp

        target = abstract = abstract_params(self.config, DTYPES[self.dtype])
        if self.weights is not None:
            target = abstract = abstract_quantized(abstract, self.weights)
        legacy = self.meta.get("format") == 1
        if legacy:
            target = target.replace(layers=tuple(
                Arrays({**{n: None for n in _V1_OPTIONAL}, **dict(lp.items())}) for lp in target.layers))
        where = self.path.absolute() / "params"  # orbax takes only absolute paths
        try:
            with ocp.StandardCheckpointer() as ckptr:
                params = ckptr.restore(where, target)
        except Exception as e:  # orbax raises many types for a damaged tree, some with pages of TensorStore spec
            msg = (f"checkpoint {self.path} is damaged: cannot restore the parameters in its params/ "
                   f"directory; convert the model again")
            msg += f"\norbax: {e}" if os.environ.get(DEBUG_ENV) else f" ({DEBUG_ENV}=1 shows orbax's full error)"
            raise CheckpointError(msg) from None
        if legacy:
            params = params.replace(layers=tuple(  # declaration order, as abstract_params makes it
                Arrays({n: lp.get(n) for n in want}) for lp, want in zip(params.layers, abstract.layers)))
        if dtype is not None and dtype != self.dtype:
            params = cast_params(params, DTYPES[dtype])
        return params


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Reads a checkpoint's metadata and checks that its parts are present."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    meta_file = path / META_FILE
    if not meta_file.exists():
        raise CheckpointError(
            f"{path} is not an lserve_jax checkpoint (no {META_FILE}); convert a model first: "
            f"python -m convert <hf-dir-or-gguf> {path}")
    try:
        meta = json.loads(meta_file.read_text())
        config = ModelConfig.from_dict(meta["model"])
        dtype = meta["dtype"]
    except (json.JSONDecodeError, KeyError, TypeError, ConfigError) as e:
        raise CheckpointError(f"corrupted {meta_file}: {e}") from None
    if meta.get("format") not in READABLE_FORMATS:
        raise CheckpointError(f"{path} has checkpoint format {meta.get('format')}, this version reads "
                              f"{READABLE_FORMATS}; convert the model again")
    if dtype not in DTYPES:
        raise CheckpointError(f"{meta_file}: unknown dtype {dtype!r}")
    if meta.get("weights") is not None and meta["weights"] not in MODES:
        raise CheckpointError(f"{meta_file}: unknown weights {meta['weights']!r} (this version reads {sorted(MODES)})")
    for part in ("params",):
        if not (path / part).exists():
            raise CheckpointError(f"checkpoint {path} is incomplete: {part} is missing")
    return Checkpoint(path.absolute(), config, dtype, meta)  # absolute: orbax refuses relative paths


@contextlib.contextmanager
def atomic_directory(dest: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yields a temporary directory that becomes `dest` only if the block completes."""
    dest = Path(dest).expanduser().absolute()
    if dest.exists() and not force:
        raise FileExistsError(f"{dest} already exists (use --force to overwrite)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; a converted model should be readable like any file
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_checkpoint(dest: Path, params: Params, config: ModelConfig, dtype: str, *,
                     tokenizer_files: dict[str, str | bytes] | None = None,
                     pattern: np.ndarray | None = None, extra_meta: dict[str, Any] | None = None) -> None:
    """Writes a checkpoint into `dest` (use inside `atomic_directory`)."""
    import orbax.checkpoint as ocp

    from .heads import save_pattern

    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(Path(dest).absolute() / "params", params)  # orbax takes only absolute paths
        ckptr.wait_until_finished()
    for name, content in (tokenizer_files or {}).items():
        mode = "wb" if isinstance(content, bytes) else "w"
        with open(dest / name, mode) as f:
            f.write(content)
    if pattern is not None:
        save_pattern(dest / PATTERN_FILE, pattern)
    meta = {"format": FORMAT_VERSION, "model": config.to_dict(), "dtype": dtype, **(extra_meta or {})}
    (dest / META_FILE).write_text(json.dumps(meta, indent=2))
