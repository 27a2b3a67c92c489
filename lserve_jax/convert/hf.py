"""Hugging Face checkpoints -> our flat parameter names, with every name and shape checked.

The mapping comes from the model family's declaration (`name_table`: HF tensor name pattern ->
our flat name, transpose?). Linear weights are stored [out, in] by HF and [in, out] by us.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import struct as _struct
from collections.abc import Mapping
from pathlib import Path
from typing import Callable, Iterator

import ml_dtypes
import numpy as np

from .. import models
from ..config import ConfigError, ModelConfig, show
from ..decl import axis_sizes

IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
LIST_LIMIT = 8  # names an error lists before "... and N more"


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


def one_line(text: object) -> str:
    """An error message on one line: newlines, tabs and terminal colour codes collapsed."""
    return " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(text)).split())


def listing(names: list[str], total: int | None = None, sep: str = ", ") -> str:
    """The first LIST_LIMIT of `names` then "... and N more" (`total`: the full count)."""
    total = len(names) if total is None else total
    more = total - min(len(names), LIST_LIMIT)
    return sep.join(names[:LIST_LIMIT]) + (f" ... and {more} more" if more > 0 else "")


def map_name(hf_name: str, table: dict[str, tuple[str, bool]]) -> tuple[str, bool] | None:
    """Our flat name and transpose flag for an HF tensor name (None if not in `table`)."""
    m = re.match(r"^model\.layers\.(\d+)\.(.+)$", hf_name)
    if m:
        hit = table.get("model.layers.{i}." + m.group(2))
        return None if hit is None else (hit[0].replace("{i}", m.group(1)), hit[1])
    return table.get(hf_name)


# --- readers ---------------------------------------------------------------------------------

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64}
_FLOAT_DTYPES = frozenset(np.dtype(t) for t in _ST_DTYPES.values())
_MAX_HEADER = 100_000_000  # the safetensors library's limit on the JSON header


def _is_uint(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def safetensors_header(path: Path) -> tuple[int, dict[str, tuple[str, tuple[int, ...], int, int]]]:
    """(byte where the data starts, {name: (dtype, shape, begin, end)}) of a .safetensors file,
    checked as the safetensors library checks it: every entry is {dtype, shape, data_offsets} of
    matching size, and the entries' byte ranges tile the data exactly (no gap, no overlap, no
    trailing bytes). Raises ConversionError naming the file, the tensor and the field."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ConversionError(f"{path}: truncated safetensors file (no header)")
        (hlen,) = _struct.unpack("<Q", raw)
        if hlen > size - 8:
            raise ConversionError(f"{path}: truncated safetensors file (header of {hlen} bytes)")
        if hlen > _MAX_HEADER:
            raise ConversionError(f"{path}: corrupted safetensors file (header of {hlen} bytes; the limit is 100 MB)")
        try:
            header = json.loads(f.read(hlen))
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, deep nesting
            raise ConversionError(f"{path}: corrupted safetensors header: {one_line(e)}") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{path}: corrupted safetensors header: not a JSON object but {show(header)}")
    data_len = size - 8 - hlen
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        what = f"{path}: corrupted safetensors header: tensor {show(name)}"
        if not isinstance(info, dict):
            raise ConversionError(f"{what} is {show(info)}, not an object with dtype, shape and data_offsets")
        for field in ("dtype", "shape", "data_offsets"):
            if field not in info:
                raise ConversionError(f"{what} has no {field!r}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str):
            raise ConversionError(f"{what}: dtype must be a string, got {show(dtype)}")
        if dtype not in _ST_DTYPES:
            raise ConversionError(f"{path}: tensor {show(name)} has unsupported dtype {show(dtype)} "
                                  f"(supported: {', '.join(_ST_DTYPES)})")
        if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
            raise ConversionError(f"{what}: shape must be a list of integers >= 0, got {show(shape)}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_uint(o) for o in offsets)):
            raise ConversionError(f"{what}: data_offsets must be [begin, end] (integers >= 0), got {show(offsets)}")
        start, end = offsets
        if end > data_len:
            raise ConversionError(f"{path}: truncated safetensors file ({name} ends past the end of the file)")
        want = int(np.prod(shape, dtype=object)) * np.dtype(_ST_DTYPES[dtype]).itemsize
        if not start <= end or end - start != want:
            raise ConversionError(f"{path}: corrupted safetensors file: tensor {name} of shape {shape} "
                                  f"({dtype}) needs {want} bytes, the header gives {end - start} (data_offsets)")
        entries[name] = (dtype, tuple(shape), start, end)
    pos, prev = 0, None
    for name, (_, _, start, end) in sorted(entries.items(), key=lambda e: e[1][2:]):
        if start < pos:
            raise ConversionError(f"{path}: corrupted safetensors header: the data_offsets of {name} "
                                  f"[{start}, {end}] overlap those of {prev} (which end at {pos})")
        if start > pos:
            raise ConversionError(f"{path}: corrupted safetensors header: bytes [{pos}, {start}) of the data "
                                  f"belong to no tensor (gap before {name}'s data_offsets)")
        pos, prev = end, name
    if pos != data_len:
        raise ConversionError(f"{path}: corrupted safetensors file: the last {data_len - pos} bytes of the "
                              f"data belong to no tensor (data_offsets end at {pos} of {data_len})")
    return 8 + hlen, entries


def read_safetensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (name, array) from one .safetensors file, memory-mapped; checks the header first."""
    offset, entries = safetensors_header(path)
    data_len = path.stat().st_size - offset
    mm = np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=(data_len,)) if data_len else None
    for name, (dtype, shape, start, end) in entries.items():
        arr = np.asarray(mm[start:end]).view(_ST_DTYPES[dtype]) if end > start else np.zeros(0, _ST_DTYPES[dtype])
        yield name, arr.reshape(shape)


def _torch_error(e: Exception) -> str:
    """torch.load's (multi-line) complaint in one line; for a pickle that weights_only refuses,
    the WeightsUnpickler's reason alone."""
    text = one_line(e)
    m = re.search(r"WeightsUnpickler error: (.*?)(?: Please use|$)", text)
    if m:
        return (f"torch.load(weights_only=True) refuses its pickle ({m.group(1)}); only plain state dicts "
                f"of tensors are read")
    return text


def read_torch_bin(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (name, array) from a pytorch_model*.bin (torch.load with weights_only=True)."""
    try:
        import torch
    except ImportError:
        raise ConversionError(f"{path}: reading .bin checkpoints needs torch (pip install torch)") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConversionError(f"{path}: cannot read the torch checkpoint: {_torch_error(e)}") from None
    if not isinstance(state, Mapping):
        raise ConversionError(f"{path}: not a state dict: it holds a {type(state).__name__}, "
                              f"not a dict of tensors")
    floats = {torch.float32, torch.float16, torch.bfloat16, torch.float64}
    for name, t in state.items():
        if not isinstance(name, str):
            raise ConversionError(f"{path}: state dict key {show(name)} is not a tensor name")
        if not isinstance(t, torch.Tensor):
            nested = "; a nested state dict?" if isinstance(t, Mapping) else ""
            raise ConversionError(f"{path}: entry {name} is not a tensor (type {type(t).__name__}{nested})")
        if t.layout != torch.strided or t.is_quantized or t.dtype not in floats:
            raise ConversionError(f"{path}: tensor {name} has unsupported type {t.dtype} ({t.layout}); "
                                  f"expected dense float32, float16, bfloat16 or float64")
        if t.dtype == torch.bfloat16:
            yield name, t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            yield name, t.numpy()


def _read_index(index: Path) -> list[str]:
    """The shard file names of a sharded checkpoint's index (its `weight_map` values)."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, deep nesting
        raise ConversionError(f"{index}: corrupted index: {one_line(e)}") from None
    if not isinstance(data, dict) or "weight_map" not in data:
        raise ConversionError(f"{index}: corrupted index: no 'weight_map'")
    wm = data["weight_map"]
    if not isinstance(wm, dict) or not all(isinstance(v, str) and v for v in wm.values()):
        raise ConversionError(f"{index}: corrupted index: weight_map must map tensor names to shard "
                              f"file names, got {show(wm)}")
    return sorted(set(wm.values()))


def weight_files(src: Path) -> tuple[list[Path], Callable[[Path], Iterator[tuple[str, np.ndarray]]]]:
    """The weight files of an HF directory (sharded or not) and the reader for them."""
    for index_name, reader in (("model.safetensors.index.json", read_safetensors),
                               ("pytorch_model.bin.index.json", read_torch_bin)):
        index = src / index_name
        if index.exists():
            shards = _read_index(index)
            missing = [s for s in shards if not (src / s).is_file()]
            if missing:
                raise ConversionError(f"{index} names shards that are missing: {listing(missing)}")
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
        hf = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, deep nesting
        raise ConversionError(f"{cfg_file}: invalid JSON: {one_line(e)}") from None
    try:
        return hf, ModelConfig.from_hf(hf)
    except ConfigError as e:
        raise ConversionError(f"{cfg_file}: {e}") from None


def hf_tensors(src: Path, origin: dict[str, Path] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Every (name, array) of an HF directory's weight files; `origin` records each name's file."""
    files, reader = weight_files(src)
    for f in files:
        for name, arr in reader(f):
            if origin is not None:
                origin[name] = f  # map_tensors reads it before the next tensor comes
            yield name, arr


_OUR_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def all_finite(arr: np.ndarray) -> bool:
    """No NaN or inf in `arr` (float16, bfloat16 or float32). One pass and no temporary as large
    as `arr`: a float64 sum of such values cannot overflow, so it is finite exactly when every
    element is."""
    with np.errstate(all="ignore"):  # inf - inf warns; the answer is what matters
        return bool(np.isfinite(arr.sum(dtype=np.float64)))


def map_tensors(cfg: ModelConfig, tensors: Iterator[tuple[str, np.ndarray]], dtype,
                on_tensor: Callable[[str], None] | None = None, *, source: str | os.PathLike | None = None,
                origin: Mapping[str, Path] | None = None) -> dict[str, np.ndarray]:
    """Renames, transposes, casts and checks every tensor; raises one ConversionError (prefixed
    with `source`) naming the unexpected, missing, duplicated, mis-shaped, non-float and
    non-finite tensors, at most LIST_LIMIT of each. `origin`: the file of each name, for messages.

    The expected names are not listed up front: a config claiming 10^9 layers must fail fast."""
    family = models.get(cfg.architecture)
    sizes = axis_sizes(cfg)
    top = {p.name: p.decl(sizes).shape for p in models.TOP_PARAMS if p.present(cfg)}
    per_layer = {p.name: p.decl(sizes).shape for p in family.layer_decls(cfg)}
    table = name_table(cfg)

    def expected_shape(ours: str) -> tuple[int, ...] | None:
        m = _OUR_LAYER.match(ours)
        if m is None:
            return top.get(ours)
        i = m.group(1)
        ok = i.isascii() and str(int(i)) == i and int(i) < cfg.num_layers  # "07" is not layer 7
        return per_layer.get(m.group(2)) if ok else None

    def where(name: str) -> str:
        f = (origin or {}).get(name)
        return f" in {Path(f).name}" if f is not None else ""

    out: dict[str, np.ndarray] = {}
    seen: dict[str, str] = {}  # our names met so far, good or bad -> where the first one was
    unexpected, duplicated, bad_shape, bad_dtype, non_finite = [], [], [], [], []
    hf_layers: set[int] = set()
    for name, arr in tensors:
        if on_tensor is not None:
            on_tensor(name)
        if IGNORED.match(name):
            continue
        m = _HF_LAYER.match(name)
        if m and m.group(1).isascii():
            hf_layers.add(int(m.group(1)))
        mapped = map_name(name, table)
        want = None if mapped is None else expected_shape(mapped[0])
        if want is None:
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue  # some tied checkpoints also store the shared matrix
            unexpected.append(name)
            continue
        ours, transpose = mapped
        if ours in seen:
            duplicated.append(f"{name}{seen[ours]} and{where(name)}" if seen[ours] else name)
            continue
        seen[ours] = where(name)
        if np.dtype(arr.dtype) not in _FLOAT_DTYPES:
            bad_dtype.append(f"{name}{where(name)}: {arr.dtype}")
            continue
        arr = arr.T if transpose else arr
        if tuple(arr.shape) != want:
            shown = want[::-1] if transpose else want
            bad_shape.append(f"{name}: {tuple(arr.shape[::-1] if transpose else arr.shape)} (expected {shown})")
            continue
        with np.errstate(over="ignore"):  # an overflowing cast is reported just below
            cast = np.ascontiguousarray(arr.astype(dtype))
        if not all_finite(cast):
            n = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            non_finite.append(f"{name}{where(name)}: " + (f"{n} NaN or infinite values" if n else
                                                           f"values overflow {np.dtype(dtype).name}"))
            continue
        out[ours] = cast

    def missing_names() -> Iterator[str]:  # lazily, in order: stops after LIST_LIMIT
        yield from (n for n in top if n not in seen)
        for i in range(cfg.num_layers):
            yield from (f"layers.{i}.{n}" for n in per_layer if f"layers.{i}.{n}" not in seen)

    n_missing = len(top) + cfg.num_layers * len(per_layer) - len(seen)
    problems = []
    if hf_layers and max(hf_layers) + 1 != cfg.num_layers:
        problems.append(f"num_hidden_layers in config.json is {cfg.num_layers} but the weights hold "
                        f"{max(hf_layers) + 1} layers")
    if non_finite:
        problems.append("non-finite values: " + listing(non_finite))
    if bad_dtype:
        problems.append("not a float tensor: " + listing(bad_dtype))
    if bad_shape:
        problems.append("wrong shape: " + listing(bad_shape, sep="; "))
    if duplicated:
        problems.append("stored twice: " + listing(duplicated))
    if n_missing:
        first = [_hf_name(n, table) for n in itertools.islice(missing_names(), LIST_LIMIT)]
        problems.append("missing: " + listing(first, n_missing))
    if unexpected:
        problems.append("unexpected: " + listing(unexpected))
    if problems:
        prefix = f"{source}: " if source is not None else ""
        raise ConversionError(prefix + "checkpoint does not match the config: " + " | ".join(problems))
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
