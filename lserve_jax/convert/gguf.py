"""Read a GGUF checkpoint (llama.cpp format) into Hugging Face naming, shapes and config.

``read_gguf`` dequantises every tensor to float32 with the ``gguf`` package (numpy only, no
torch), renames it to the HF ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` layout, undoes the
q/k row permutation llama.cpp applies to Llama attention weights, and rebuilds the config
and tokenizer.  ``write_hf_dir`` writes a directory transformers can load with
``AutoModelForCausalLM`` / ``AutoTokenizer``.

CLI:  python -m lserve_jax.convert.gguf MODEL.gguf OUT_DIR
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

import gguf as _gguf  # the PyPI package (absolute import; this module is lserve_jax.convert.gguf)

from lserve_jax.convert.gguf_tokenizer import (TokenizerConversionError, build_tokenizer,
                                               tokenizer_config)

log = logging.getLogger(__name__)


from lserve_jax import models  # noqa: E402
from lserve_jax.config import ConfigError, ModelConfig, show  # noqa: E402
from lserve_jax.convert.hf import (ConversionError, all_finite, listing,  # noqa: E402  (one error type
                                   one_line)  # for every source format)
from lserve_jax.decl import axis_sizes  # noqa: E402


_LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")
# Tensors that carry no weights of their own in HF form: rope_freqs becomes config
# (rope_scaling), the others are precomputed rotary tables from old converters.
_NON_WEIGHT_TENSORS = {"rope_freqs.weight"}
_IGNORED_LAYER_TENSORS = {"attn_rot_embd"}


@dataclasses.dataclass
class GGUFModel:
    """A GGUF checkpoint in Hugging Face form (see module docstring)."""

    hf_config: dict
    tensors: dict[str, np.ndarray]      # HF names -> float32 arrays in HF shapes
    tokenizer_json: str
    tokenizer_config: dict              # tokenizer_config.json contents
    chat_template: str | None
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    unk_token_id: int | None
    architecture: str                   # GGUF general.architecture
    metadata: dict[str, Any]            # scalar GGUF key/values (large arrays dropped)
    tensor_types: dict[str, str]        # HF name -> GGUF storage type ("Q4_1", "F32", ...)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Llama q/k permutation (it interleaves the two rotary halves of
    each head so ggml's adjacent-pair RoPE works; HF uses rotate-half).  Rows = out dim."""
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ConversionError(f"cannot un-permute {rows} rows into {n_heads} heads")
    rest = w.shape[1:]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's forward permutation (HF -> GGUF); the inverse of :func:`unpermute_qk`."""
    rows = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *rest).swapaxes(1, 2).reshape(w.shape)


def _field_value(field) -> Any:
    v = field.contents()
    if isinstance(v, np.generic):
        v = v.item()
    return v


def _nice_float(x: float) -> float:
    # GGUF stores float32; 9.999999747e-06 -> 1e-05 so configs look like the originals.
    return float(f"{float(x):.7g}")


def _open(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        return _gguf.GGUFReader(str(path), "r")
    except Exception as e:  # the reader raises ValueError/IndexError/struct errors alike
        raise ConversionError(f"{path}: not a readable GGUF file (truncated or corrupt?): {one_line(e)}") from None


def _check_layout(reader) -> None:
    """llama.cpp's rule (ggml/src/gguf.cpp): the tensors' data lie in the order of their infos,
    each at the previous one's end rounded up to the alignment, and inside the file; and nothing
    follows the last one but its padding. A corrupted type, shape or offset then shows as a
    misplaced tensor instead of reading its neighbour's bytes."""
    def desc(t) -> str:
        return f"{t.name} ({t.tensor_type.name}, dims {[int(d) for d in t.shape]})"

    size, pos, prev = len(reader.data), 0, None
    for t in reader.tensors:
        offset = int(t.data_offset) - int(reader.data_offset)
        if offset != pos:
            before = f"tensor {desc(prev)} ends at {pos}" if prev is not None else "the data starts at 0"
            raise ConversionError(
                f"tensor {desc(t)} has data offset {offset} but {before}: the type, dims or offset of "
                f"one of them is corrupted")
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise ConversionError(f"tensor {desc(t)} ends at byte {end}, past the end of the file "
                                  f"({size} bytes; truncated?)")
        pos += -(-int(t.n_bytes) // reader.alignment) * reader.alignment
        prev = t
    # Writers pad every tensor, the last too (or leave the last unpadded): more is unexplained,
    # e.g. a last tensor whose type or dims shrank.
    extra = size - int(reader.data_offset) - pos
    if prev is not None and extra > 0:
        raise ConversionError(f"{extra} bytes after the last tensor {desc(prev)} belong to no tensor: its type "
                              f"or dims are corrupted")


def _number(kv: dict, key: str) -> float | None:
    """A positive finite number from the metadata (None when absent); ConversionError naming the key."""
    v = kv.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
        raise ConversionError(f"GGUF metadata '{key}' must be a positive number, got {show(v)}")
    return float(v)


def _llama3_rope_scaling(freq_factors: np.ndarray, theta: float, head_dim: int,
                         orig_ctx: int | None) -> dict | None:
    """Recover HF's llama3 rope_scaling from llama.cpp's per-frequency ``rope_freqs``.

    llama.cpp stores the resulting divisors, not the parameters; we try the standard
    parameter sets and accept one only if it reproduces the stored factors.
    """
    f = np.asarray(freq_factors, np.float64).ravel()
    if np.allclose(f, 1.0):
        return None
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if f.shape != inv_freq.shape:
        raise ConversionError(f"rope_freqs has {f.size} entries, expected {inv_freq.size}")
    factor = float(f.max())
    wavelen = 2 * math.pi / inv_freq
    for orig in [o for o in (orig_ctx, 8192) if o]:
        for low, high in ((1.0, 4.0),):
            smooth = np.clip((orig / wavelen - low) / (high - low), 0.0, 1.0)
            scaled = (1 - smooth) * inv_freq / factor + smooth * inv_freq
            if np.allclose(inv_freq / scaled, f, rtol=1e-3):
                return {"rope_type": "llama3", "factor": _nice_float(factor),
                        "low_freq_factor": low, "high_freq_factor": high,
                        "original_max_position_embeddings": int(orig)}
    raise ConversionError("rope_freqs (Llama-3 style rope scaling) does not match the standard "
                          "llama3 parameters; cannot express it as an HF rope_scaling")


def _yarn_rope_scaling(arch: str, kv: dict, sfactor, orig_ctx) -> dict:
    """HF's yarn rope_scaling from llama.cpp's keys: the inverse of convert_hf_to_gguf.py, which
    writes factor, original_context_length and (when the HF config has them) attention_factor,
    beta_fast and beta_slow as rope.scaling.yarn_attn_factor / yarn_beta_fast / yarn_beta_slow.
    A missing original_context_length means context_length in llama.cpp and
    max_position_embeddings in transformers: the same number, so it is left out."""
    rs: dict[str, Any] = {"rope_type": "yarn", "factor": _nice_float(sfactor or 1.0)}
    if orig_ctx:
        rs["original_max_position_embeddings"] = int(orig_ctx)
    for gguf_key, hf_key in (("yarn_attn_factor", "attention_factor"), ("yarn_beta_fast", "beta_fast"),
                             ("yarn_beta_slow", "beta_slow")):
        v = _number(kv, f"{arch}.rope.scaling.{gguf_key}")
        if v is not None:
            rs[hf_key] = _nice_float(v)
    # Knobs with no transformers equivalent (or, for these architectures, no agreed meaning).
    for gguf_key, neutral in (("yarn_ext_factor", 1.0), ("yarn_log_multiplier", 0.0), ("attn_factor", 1.0)):
        v = kv.get(f"{arch}.rope.scaling.{gguf_key}")
        if v is not None and v != neutral:
            raise ConversionError(f"'{arch}.rope.scaling.{gguf_key}' = {v} (yarn) is not supported; "
                                  f"only {neutral} maps to a transformers rope_scaling")
    return rs


def _build_config(arch: str, family: models.Family, kv: dict, embed_shape, rope_freqs,
                  tied: bool, tok) -> dict:
    def get(key, default=None):
        v = kv.get(f"{arch}.{key}", default)
        if v is None:
            raise ConversionError(f"GGUF metadata key '{arch}.{key}' is missing")
        if isinstance(v, list):
            raise ConversionError(f"'{arch}.{key}' varies per layer; not supported")
        return v

    def count(key, default=None) -> int:
        v = get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConversionError(f"GGUF metadata '{arch}.{key}' must be a positive integer, got {show(v)}")
        return v

    def number(key, default=None) -> float:
        get(key, default)  # missing / per-layer
        return default if f"{arch}.{key}" not in kv else _number(kv, f"{arch}.{key}")

    hidden = count("embedding_length")
    if len(embed_shape) != 2 or embed_shape[1] != hidden:
        raise ConversionError(f"'{arch}.embedding_length' is {hidden} but token_embd.weight has shape "
                              f"{embed_shape}, expected (vocab, {hidden})")
    n_heads = count("attention.head_count")
    n_kv = count("attention.head_count_kv", n_heads)
    if f"{arch}.attention.key_length" not in kv and hidden % n_heads:
        raise ConversionError(f"'{arch}.embedding_length' ({hidden}) is not a multiple of "
                              f"'{arch}.attention.head_count' ({n_heads}) and no key_length is given")
    head_dim = count("attention.key_length", hidden // n_heads)
    if count("attention.value_length", head_dim) != head_dim:
        raise ConversionError("key_length != value_length is not supported")
    rope_dim = count("rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise ConversionError(f"partial rotary ('{arch}.rope.dimension_count' = {rope_dim}, head dim "
                              f"{head_dim}) is not supported")
    if n_heads % n_kv:
        raise ConversionError(f"head_count {n_heads} is not a multiple of head_count_kv {n_kv}")
    vocab = int(embed_shape[0])
    if kv.get(f"{arch}.vocab_size") not in (None, vocab):
        raise ConversionError(f"{arch}.vocab_size={show(kv[f'{arch}.vocab_size'])} but token_embd has {vocab} rows")
    theta = _nice_float(number("rope.freq_base", 10000.0))
    ctx = count("context_length")

    rope_scaling = None
    stype = kv.get(f"{arch}.rope.scaling.type")
    sfactor = _number(kv, f"{arch}.rope.scaling.factor")
    if sfactor is None:
        sfactor = _number(kv, f"{arch}.rope.scale_linear")
    orig_ctx = kv.get(f"{arch}.rope.scaling.original_context_length")
    if orig_ctx is not None and (isinstance(orig_ctx, bool) or not isinstance(orig_ctx, int) or orig_ctx < 1):
        raise ConversionError(f"GGUF metadata '{arch}.rope.scaling.original_context_length' must be a "
                              f"positive integer, got {show(orig_ctx)}")
    if stype in (None, "none") and sfactor not in (None, 1.0) and f"{arch}.rope.scale_linear" in kv:
        stype = "linear"
    if stype == "linear" and sfactor not in (None, 1.0):
        rope_scaling = {"rope_type": "linear", "factor": _nice_float(sfactor)}
    elif stype == "yarn":
        rope_scaling = _yarn_rope_scaling(arch, kv, sfactor, orig_ctx)
    elif stype not in (None, "none", "linear"):
        raise ConversionError(f"rope scaling type {show(stype)} ('{arch}.rope.scaling.type') is not supported")
    if rope_freqs is not None:
        if rope_scaling is not None:
            raise ConversionError("both rope_freqs and rope.scaling.type are set; ambiguous")
        rope_scaling = _llama3_rope_scaling(rope_freqs, theta, head_dim, orig_ctx)

    cfg: dict[str, Any] = {
        "architectures": [family.hf_architectures[0]],
        "model_type": family.model_types[0],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": count("feed_forward_length"),
        "num_hidden_layers": count("block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _nice_float(number("attention.layer_norm_rms_epsilon")),
        "rope_theta": theta,
        "max_position_embeddings": ctx,
        "tie_word_embeddings": tied,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "torch_dtype": "float32",
        "use_cache": True,
        "initializer_range": 0.02,
    }
    if tok.pad_token_id is not None:
        cfg["pad_token_id"] = tok.pad_token_id
    if rope_scaling is not None:
        cfg["rope_scaling"] = rope_scaling
    cfg.update(family.gguf_hf_config)
    return cfg


def _hf_names(family: models.Family) -> tuple[dict[str, str], dict[str, str]]:
    """GGUF -> HF names of the family's declared weights: (top-level, per layer after blk.{i}.)."""
    top = {p.gguf: p.hf for p in models.TOP_PARAMS}
    layer = {p.gguf: p.hf for p in family.layer_params if p.gguf}
    return top, layer


def _expected_shapes(cfg: dict, family: models.Family) -> dict[str, tuple[int, ...]]:
    """HF name -> HF shape of every weight the config needs, from the family's declaration."""
    try:
        mc = ModelConfig.from_hf(cfg)
    except ConfigError as e:
        raise ConversionError(str(e)) from None
    sizes = axis_sizes(mc)

    def hf_shape(p):
        shape = p.decl(sizes).shape
        return shape[::-1] if p.transpose else shape

    shapes = {p.hf: hf_shape(p) for p in models.TOP_PARAMS if p.present(mc)}
    for n in range(mc.num_layers):
        shapes.update({f"model.layers.{n}.{p.hf}": hf_shape(p) for p in family.layer_decls(mc)})
    return shapes


def _hf_name(gguf_name: str, n_layers: int, family: models.Family) -> str | None:
    top, layer_names = _hf_names(family)
    if gguf_name in top:
        return top[gguf_name]
    m = _LAYER_RE.match(gguf_name)
    if m:
        layer, rest = int(m.group(1)), m.group(2)
        if rest.rsplit(".", 1)[0] in _IGNORED_LAYER_TENSORS:
            return None
        if rest in layer_names and layer < n_layers:
            return f"model.layers.{layer}.{layer_names[rest]}"
    raise ConversionError(f"unexpected tensor {gguf_name!r}; this converter handles the dense decoders "
                          f"of {', '.join(models.gguf_architectures())} only")


def _gguf_name(hf_name: str, family: models.Family) -> str:
    """HF name -> GGUF name, for error messages that point into the file."""
    top, layer_names = _hf_names(family)
    for g, h in top.items():
        if h == hf_name:
            return g
    m = re.match(r"^model\.layers\.(\d+)\.(.+)$", hf_name)
    if m:
        for g, h in layer_names.items():
            if h == m.group(2):
                return f"blk.{m.group(1)}.{g}"
    return hf_name


def _dequantize(t) -> np.ndarray:
    # ggml lists dims fastest-first ([in, out] for a linear); numpy/HF order is the reverse.
    shape = tuple(int(d) for d in reversed(t.shape))
    try:
        with np.errstate(all="ignore"):  # NaN scales warn; the finiteness check below reports them
            arr = _gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
    except NotImplementedError as e:
        raise ConversionError(f"tensor {t.name}: cannot dequantise type {t.tensor_type.name}: {e}") from e
    except (ValueError, TypeError, IndexError) as e:  # the dequantisers' own shape checks
        raise ConversionError(f"tensor {t.name} ({t.tensor_type.name}): cannot dequantise: {one_line(e)}") from None
    arr = np.asarray(arr, dtype=np.float32)
    if arr.size != math.prod(shape):
        raise ConversionError(f"tensor {t.name}: {arr.size} values for shape {shape} (truncated file?)")
    if not all_finite(arr):
        n = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        raise ConversionError(f"tensor {t.name} ({t.tensor_type.name}) has {n} NaN or infinite values")
    return np.ascontiguousarray(arr.reshape(shape))  # copy: detach from the memory map


def read_gguf(path: str | os.PathLike, *, load_tensors: bool = True) -> GGUFModel:
    """Parse ``path`` into a :class:`GGUFModel`.  ``load_tensors=False`` reads metadata only
    (config and tokenizer), leaving ``tensors`` empty.  Raises :class:`ConversionError`, whose
    message starts with ``path``."""
    path = Path(path)
    reader = _open(path)
    try:
        return _read(reader, path, load_tensors)
    except ConversionError as e:
        msg = one_line(e)
        raise ConversionError(msg if msg.startswith(f"{path}:") else f"{path}: {msg}") from None


def _read(reader, path: Path, load_tensors: bool) -> GGUFModel:
    kv: dict[str, Any] = {}
    for key, field in reader.fields.items():
        try:
            kv[key] = _field_value(field)
        except Exception as e:
            raise ConversionError(f"cannot decode metadata field {key!r}: {one_line(e)}") from None
    _check_layout(reader)

    arch = kv.get("general.architecture")
    family = models.for_gguf(arch) if isinstance(arch, str) else None
    if family is None:
        raise ConversionError(f"unsupported architecture {show(arch)} (general.architecture); "
                              f"supported: {', '.join(models.gguf_architectures())}")
    try:
        tok = build_tokenizer(kv)
    except TokenizerConversionError as e:
        raise ConversionError(str(e)) from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:  # mistyped tokenizer.* values
        raise ConversionError(f"malformed tokenizer metadata (tokenizer.ggml.*): {type(e).__name__}: "
                              f"{one_line(e)}") from None

    by_name = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in by_name:
        raise ConversionError("tensor 'token_embd.weight' is missing")
    embed_shape = tuple(int(d) for d in reversed(by_name["token_embd.weight"].shape))
    rope_freqs = _dequantize(by_name["rope_freqs.weight"]) if "rope_freqs.weight" in by_name else None
    tied = "output.weight" not in by_name
    cfg = _build_config(arch, family, kv, embed_shape, rope_freqs, tied, tok)
    # before listing the expected tensors: a block_count of 10^9 must not build 10^9 names
    blocks = [m.group(1) for m in map(_LAYER_RE.match, by_name) if m]
    n_blocks = 1 + max((int(b) for b in blocks if b.isascii()), default=-1)
    if cfg["num_hidden_layers"] != n_blocks:
        raise ConversionError(f"'{arch}.block_count' is {cfg['num_hidden_layers']} but the file has tensors "
                              f"for {n_blocks} blocks (blk.N.*)")
    expected = _expected_shapes(cfg, family)

    names: dict[str, str] = {}  # HF -> GGUF
    for gname in by_name:
        if gname in _NON_WEIGHT_TENSORS:
            continue
        hname = _hf_name(gname, cfg["num_hidden_layers"], family)
        if hname is None:
            continue
        if hname not in expected:
            raise ConversionError(f"tensor {gname!r} ({hname}) is not expected for {arch}")
        names[hname] = gname
    missing = [_gguf_name(n, family) for n in expected if n not in names]
    if missing:
        raise ConversionError(f"{len(missing)} required tensor(s) missing for {arch}: {listing(missing)}")

    tensors: dict[str, np.ndarray] = {}
    types = {h: by_name[g].tensor_type.name for h, g in names.items()}
    for hname, gname in (names.items() if load_tensors else ()):
        t = by_name[gname]
        shape = tuple(int(d) for d in reversed(t.shape))
        if shape != expected[hname]:
            raise ConversionError(f"tensor {gname} has shape {shape}, expected "
                                  f"{expected[hname]} for {hname}")
        arr = _dequantize(t)
        if family.gguf_permuted_qk and hname.endswith("q_proj.weight"):
            arr = unpermute_qk(arr, cfg["num_attention_heads"])
        elif family.gguf_permuted_qk and hname.endswith("k_proj.weight"):
            arr = unpermute_qk(arr, cfg["num_key_value_heads"])
        tensors[hname] = arr

    chat_template = kv.get("tokenizer.chat_template")
    metadata = {k: v for k, v in kv.items()
                if not (isinstance(v, list) and len(v) > 64) and k != "tokenizer.chat_template"}
    return GGUFModel(
        hf_config=cfg, tensors=tensors, tokenizer_json=tok.tokenizer_json,
        tokenizer_config=tokenizer_config(tok, chat_template, cfg["max_position_embeddings"]),
        chat_template=chat_template, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, unk_token_id=tok.unk_token_id, architecture=arch,
        metadata=metadata, tensor_types=types)


def tokenizer_files_from_gguf(model: GGUFModel) -> dict[str, str]:
    """{file name: text} for the tokenizer-side HF files (tokenizer.json,
    tokenizer_config.json, generation_config.json) to store next to converted weights."""
    gen = {"bos_token_id": model.bos_token_id, "eos_token_id": model.eos_token_id}
    if model.pad_token_id is not None:
        gen["pad_token_id"] = model.pad_token_id

    def js(obj) -> str:
        return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"

    return {"tokenizer.json": model.tokenizer_json,
            "tokenizer_config.json": js(model.tokenizer_config),
            "generation_config.json": js(gen)}


def write_hf_dir(model: GGUFModel, out_dir: str | os.PathLike, *, dtype: str = "float32") -> Path:
    """Write ``model`` as an HF model directory (config.json, model.safetensors,
    tokenizer.json, tokenizer_config.json, generation_config.json).  ``dtype`` is
    "float32" or "float16" for the stored weights.  Returns the directory."""
    from safetensors.numpy import save_file

    if dtype not in ("float32", "float16"):
        raise ConversionError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
    if not model.tensors:
        raise ConversionError("model has no tensors (read with load_tensors=False?)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    np_dtype = np.dtype(dtype)
    cfg = dict(model.hf_config, torch_dtype=dtype)

    # Write weights to a temporary name first so a crash never leaves a half-written
    # model.safetensors that looks valid.
    tmp = out / "model.safetensors.tmp"
    save_file({k: np.ascontiguousarray(v.astype(np_dtype, copy=False)) for k, v in model.tensors.items()},
              str(tmp), metadata={"format": "pt"})
    _umask = os.umask(0)
    os.umask(_umask)
    os.chmod(tmp, 0o666 & ~_umask)  # the writer creates 0600 files; use normal permissions
    os.replace(tmp, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    for name, text in tokenizer_files_from_gguf(model).items():
        (out / name).write_text(text, encoding="utf-8")
    return out


def convert_gguf_to_hf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                       dtype: str = "float32") -> Path:
    """``write_hf_dir(read_gguf(gguf_path), out_dir)``."""
    return write_hf_dir(read_gguf(gguf_path), out_dir, dtype=dtype)


def _main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Convert a GGUF file to a Hugging Face model directory")
    ap.add_argument("gguf")
    ap.add_argument("out_dir")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    args = ap.parse_args(argv)
    try:
        out = convert_gguf_to_hf(args.gguf, args.out_dir, dtype=args.dtype)
    except (ConversionError, OSError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
