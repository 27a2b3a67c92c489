"""Hugging Face checkpoints -> our flat parameter names, with every name and shape checked.

The mapping comes from the model family's declaration (`name_table`: HF tensor name pattern ->
our flat name, transpose?). Linear weights are stored [out, in] by HF and [in, out] by us.
"""

from __future__ import annotations

import json
import os
import re
import struct as _struct
from pathlib import Path
from typing import Callable, Iterator

import ml_dtypes
import numpy as np

from .. import models
from ..config import ConfigError, ModelConfig
from ..params import flat_shapes

IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def name_table(cfg: ModelConfig) -> dict[str, tuple[str, bool]]:
    """HF name (with {i} for the layer index) -> (our flat name, transpose), from the family's
    declaration (lserve_jax/models/<family>.py): every weight this config has."""
    family = models.get(cfg.architecture)
    table = {p.hf: (p.name, p.transpose) for p in models.TOP_PARAMS if p.present(cfg)}
    table.update({f"model.layers.{{i}}.{p.hf}": (f"layers.{{i}}.{p.name}", p.transpose)
                  for p in family.layer_decls(cfg)})
    return table


class ConversionError(ValueError):
    """A source checkpoint that cannot be converted (names, shapes, files)."""


def map_name(hf_name: str, table: dict[str, tuple[str, bool]]) -> tuple[str, bool] | None:
    """Our flat name and transpose flag for an HF tensor name (None if not in `table`)."""
    m = re.match(r"^model\.layers\.(\d+)\.(.+)$", hf_name)
    if m:
        hit = table.get("model.layers.{i}." + m.group(2))
        return None if hit is None else (hit[0].replace("{i}", m.group(1)), hit[1])
    return table.get(hf_name)


# --- readers ---------------------------------------------------------------------------------

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64}


def read_safetensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (name, array) from one .safetensors file, memory-mapped; checks sizes first."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ConversionError(f"{path}: truncated safetensors file (no header)")
        (hlen,) = _struct.unpack("<Q", raw)
        if hlen > size - 8:
            raise ConversionError(f"{path}: truncated safetensors file (header of {hlen} bytes)")
        try:
            header = json.loads(f.read(hlen))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConversionError(f"{path}: corrupted safetensors header: {e}") from None
    header.pop("__metadata__", None)
    data_len = size - 8 - hlen
    for name, info in header.items():
        start, end = info["data_offsets"]
        if end > data_len:
            raise ConversionError(f"{path}: truncated safetensors file ({name} ends past the end of the file)")
        if info["dtype"] not in _ST_DTYPES:
            raise ConversionError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        want = int(np.prod(info["shape"], dtype=np.int64)) * np.dtype(_ST_DTYPES[info["dtype"]]).itemsize
        if not 0 <= start <= end or end - start != want:
            raise ConversionError(f"{path}: corrupted safetensors file: tensor {name} of shape {info['shape']} "
                                  f"({info['dtype']}) needs {want} bytes, the header gives {end - start}")
    mm = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + hlen, shape=(data_len,)) if data_len else None
    for name, info in header.items():
        start, end = info["data_offsets"]
        arr = np.asarray(mm[start:end]).view(_ST_DTYPES[info["dtype"]]) if end > start else np.zeros(0, _ST_DTYPES[info["dtype"]])
        yield name, arr.reshape(info["shape"])


def read_torch_bin(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (name, array) from a pytorch_model*.bin (torch.load with weights_only=True)."""
    try:
        import torch
    except ImportError:
        raise ConversionError(f"{path}: reading .bin checkpoints needs torch (pip install torch)") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConversionError(f"{path}: cannot read the torch checkpoint: {e}") from None
    for name, t in state.items():
        if t.dtype == torch.bfloat16:
            yield name, t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            yield name, t.numpy()


def weight_files(src: Path) -> tuple[list[Path], Callable[[Path], Iterator[tuple[str, np.ndarray]]]]:
    """The weight files of an HF directory (sharded or not) and the reader for them."""
    for index_name, reader in (("model.safetensors.index.json", read_safetensors),
                               ("pytorch_model.bin.index.json", read_torch_bin)):
        index = src / index_name
        if index.exists():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError) as e:
                raise ConversionError(f"{index}: corrupted index: {e}") from None
            missing = [s for s in shards if not (src / s).exists()]
            if missing:
                raise ConversionError(f"{index} names shards that are missing: {missing}")
            return [src / s for s in shards], reader
    st = sorted(src.glob("*.safetensors"))
    if st:
        return st, read_safetensors
    bins = sorted(src.glob("pytorch_model*.bin"))
    if bins:
        return bins, read_torch_bin
    raise ConversionError(f"no weights in {src}: expected *.safetensors or pytorch_model*.bin")


def read_hf_config(src: Path) -> tuple[dict, ModelConfig]:
    cfg_file = src / "config.json"
    if not cfg_file.exists():
        raise ConversionError(f"{src} has no config.json")
    try:
        hf = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{cfg_file}: invalid JSON: {e}") from None
    try:
        return hf, ModelConfig.from_hf(hf)
    except ConfigError as e:
        raise ConversionError(f"{cfg_file}: {e}") from None


def hf_tensors(src: Path) -> Iterator[tuple[str, np.ndarray]]:
    files, reader = weight_files(src)
    for f in files:
        yield from reader(f)


def map_tensors(cfg: ModelConfig, tensors: Iterator[tuple[str, np.ndarray]], dtype,
                on_tensor: Callable[[str], None] | None = None) -> dict[str, np.ndarray]:
    """Renames, transposes, casts and checks every tensor; raises ConversionError naming each
    unexpected, missing or mis-shaped tensor."""
    expected = flat_shapes(cfg)
    table = name_table(cfg)
    out: dict[str, np.ndarray] = {}
    unexpected, bad_shape = [], []
    for name, arr in tensors:
        if on_tensor is not None:
            on_tensor(name)
        if IGNORED.match(name):
            continue
        mapped = map_name(name, table)
        if mapped is None or mapped[0] not in expected:
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue  # some tied checkpoints also store the shared matrix
            unexpected.append(name)
            continue
        ours, transpose = mapped
        arr = arr.T if transpose else arr
        if tuple(arr.shape) != expected[ours]:
            want = expected[ours][::-1] if transpose else expected[ours]
            bad_shape.append(f"{name}: {tuple(arr.shape[::-1] if transpose else arr.shape)} (expected {want})")
            continue
        out[ours] = np.ascontiguousarray(arr.astype(dtype))
    missing = sorted(set(expected) - set(out))
    problems = []
    if bad_shape:
        problems.append("wrong shape: " + "; ".join(bad_shape))
    if missing:
        problems.append("missing: " + ", ".join(_hf_name(m, table) for m in missing))
    if unexpected:
        problems.append("unexpected: " + ", ".join(unexpected))
    if problems:
        raise ConversionError("checkpoint does not match the config: " + " | ".join(problems))
    return out


def _hf_name(ours: str, table: dict[str, tuple[str, bool]]) -> str:
    m = re.match(r"layers\.(\d+)\.(.*)", ours)
    for hf, (name, _) in table.items():
        if m and name == "layers.{i}." + m.group(2):
            return hf.replace("{i}", m.group(1))
        if not m and name == ours:
            return hf
    return ours


def tokenizer_files(src: Path) -> dict[str, str]:
    """Tokenizer files worth keeping next to the converted weights."""
    names = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json")
    return {n: (src / n).read_text() for n in names if (src / n).exists()}


def is_hf_dir(path: os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.json").exists()
