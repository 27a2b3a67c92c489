"""Frozen, hashable configs: the model's shape (`ModelConfig`) and LServe's knobs (`SparseConfig`).

Both are plain frozen dataclasses so they can be static arguments of `jax.jit`. This module must
not import jax: the CLIs parse configs before paying for jax's import.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from typing import Any


class ConfigError(ValueError):
    """A config that this project cannot run (unknown architecture, inconsistent shapes...)."""


_REQUIRED = object()  # `default` of the field readers below: the field must be present


def show(value: Any, limit: int = 60) -> str:
    """A config value as its JSON text (null, true, "abc", [2, null]), cut to `limit` characters."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(v: Any) -> bool:
    """An integer, or a float with an integral value (4096.0); never a bool."""
    if isinstance(v, bool):
        return False
    return isinstance(v, numbers.Integral) or (isinstance(v, float) and v.is_integer())


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def hf_int(d: dict[str, Any], key: str, default: Any = _REQUIRED, *, minimum: int = 1,
           null_is_default: bool = False, where: str = "") -> Any:
    """`d[key]` as an int >= `minimum`, else ConfigError naming `where + key`. An absent field (or
    a null one, with `null_is_default`) gives `default`; without a default it is an error."""
    v = d.get(key)
    if key not in d or (v is None and null_is_default):
        if default is _REQUIRED:
            raise ConfigError(f"the field {where + key!r} is missing")
        return default
    if not _is_int(v) or v < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(f"{where + key} must be {kind}, got {show(v)}")
    return int(v)


def hf_float(d: dict[str, Any], key: str, default: Any = _REQUIRED, *, where: str = "") -> float:
    """`d[key]` as a finite float > 0, else ConfigError naming `where + key` (absent: `default`)."""
    if key not in d:
        if default is _REQUIRED:
            raise ConfigError(f"the field {where + key!r} is missing")
        return default
    v = d[key]
    if not _is_number(v) or not 0 < v < math.inf:
        raise ConfigError(f"{where + key} must be a positive number, got {show(v)}")
    return float(v)


def hf_bool(d: dict[str, Any], key: str, default: bool) -> bool:
    """`d[key]` as a bool: true / false (or 0 / 1); absent or null gives `default`."""
    v = d.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or (_is_int(v) and v in (0, 1)):
        return bool(v)
    raise ConfigError(f"{key} must be true or false, got {show(v)}")


def _token_ids(v: Any, key: str) -> tuple[int, ...]:
    """A token id field (null, an id, or a list of ids) as a tuple of ids."""
    ids = () if v is None else tuple(v) if isinstance(v, (list, tuple)) else (v,)
    if not all(_is_int(i) and i >= 0 for i in ids):
        raise ConfigError(f"{key} must be a token id (an integer >= 0) or a list of them, got {show(v)}")
    return tuple(int(i) for i in ids)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `kind` is "none", "linear", "llama3" or "yarn" (HF `rope_type`).

    The fields after `original_max_position_embeddings` are YaRN's, with transformers' defaults:
    `attention_factor` None means derived from `factor` (and `mscale` / `mscale_all_dim` when
    both are nonzero; 0 means unset, as in transformers where they are tested for truthiness).
    """

    kind: str = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float = 0.0
    mscale_all_dim: float = 0.0
    truncate: bool = True


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-family decoder, built from an HF `config.json` by `from_hf`."""

    architecture: str  # a model family (lserve_jax.models): "llama", "mistral", "qwen2", "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = RopeScaling()
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projection bias (Qwen2; optional elsewhere)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        # Types too: a config is a static jit argument, and a str or None here fails far from here.
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        for name in ("rms_norm_eps", "rope_theta"):
            v = getattr(self, name)
            if not _is_number(v) or not 0 < v < math.inf:
                raise ConfigError(f"{name} must be a positive number, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.bos_token_id is not None and not (_is_int(self.bos_token_id) and self.bos_token_id >= 0):
            raise ConfigError(f"bos_token_id must be a token id or None, got {self.bos_token_id!r}")
        if not isinstance(self.eos_token_ids, tuple) or not all(
                _is_int(i) and i >= 0 for i in self.eos_token_ids):
            raise ConfigError(f"eos_token_ids must be a tuple of token ids, got {self.eos_token_ids!r}")

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA ratio)."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Builds the config from a parsed HF `config.json` dict; raises ConfigError, naming the
        field, for anything unsupported or malformed (a null, a string or a negative size...)."""
        from . import models  # the family registry (pure Python, like this module)

        if not isinstance(hf, dict):
            raise ConfigError(f"expected a JSON object of model fields, got {show(hf)}")
        family = models.for_hf(hf)
        if family is None:
            raise ConfigError(
                f"unsupported architecture {show(hf.get('architectures') or hf.get('model_type'))}; "
                f"supported: {models.hf_architectures()}"
            )
        hf = {**family.hf_defaults, **hf}
        hidden = hf_int(hf, "hidden_size")
        heads = hf_int(hf, "num_attention_heads")
        # null (and, as before, 0) means "not set": MHA, and hidden / heads
        kv_heads = hf_int(hf, "num_key_value_heads", heads, minimum=0, null_is_default=True) or heads
        head_dim = hf_int(hf, "head_dim", 0, minimum=0, null_is_default=True) or hidden // heads
        if head_dim == 0:
            raise ConfigError(f"hidden_size={hidden} is smaller than num_attention_heads={heads} "
                              f"(head_dim = hidden_size // num_attention_heads would be 0)")
        max_pos = hf_int(hf, "max_position_embeddings", 4096)
        rs = hf.get("rope_scaling") or None
        if rs is not None and not isinstance(rs, dict):
            raise ConfigError(f"rope_scaling must be an object or null, got {show(rs)}")
        rope_theta = hf_float(hf, "rope_theta", 10000.0)
        rp = hf.get("rope_parameters")  # transformers >= 5 folds theta and scaling together
        if rp and not isinstance(rp, dict):
            raise ConfigError(f"rope_parameters must be an object or null, got {show(rp)}")
        if isinstance(rp, dict):
            rope_theta = hf_float(rp, "rope_theta", rope_theta, where="rope_parameters.")
            if rs is None and rp.get("rope_type", "default") != "default":
                rs = rp
        window = hf.get("sliding_window")
        if hf_bool(hf, "use_sliding_window", False) and window is not None:
            window = hf_int(hf, "sliding_window")
            if window < max_pos:
                raise ConfigError(
                    f"sliding-window attention (sliding_window={window}) is not supported; models with "
                    f"sliding_window null (e.g. Mistral-7B-v0.2 and later) are")
        return cls(
            architecture=family.name,
            vocab_size=hf_int(hf, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=hf_int(hf, "intermediate_size"),
            num_layers=hf_int(hf, "num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=hf_float(hf, "rms_norm_eps", 1e-5),
            rope_theta=rope_theta,
            rope_scaling=_rope_scaling(rs, hf),
            max_position_embeddings=max_pos,
            tie_word_embeddings=hf_bool(hf, "tie_word_embeddings", False),
            attention_bias=hf_bool(hf, "attention_bias", False),
            bos_token_id=hf_int(hf, "bos_token_id", None, minimum=0, null_is_default=True),
            eos_token_ids=_token_ids(hf.get("eos_token_id"), "eos_token_id"),
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "ModelConfig":
        """`from_hf` of a config.json file; errors name the file."""
        try:
            with open(path, encoding="utf-8") as f:
                hf = json.load(f)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, deep nesting
            raise ConfigError(f"{path}: not valid JSON: {e}") from None
        try:
            return cls.from_hf(hf)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        d["rope_scaling"] = RopeScaling(**d.get("rope_scaling", {}))
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)


def _rope_number(rs: dict[str, Any], key: str, default: Any = None) -> Any:
    """rope_scaling[key] as a float (`default` when absent or null); ConfigError naming the field."""
    v = rs.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"rope_scaling.{key} must be a number, got {show(v)}")
    return float(v)


def _rope_scaling(rs: dict[str, Any] | None, hf: dict[str, Any] | None = None) -> RopeScaling:
    """Parses HF's `rope_scaling` (or transformers 5 `rope_parameters`); `hf` is the whole
    config.json, needed for partial rotary and YaRN's defaults (`max_position_embeddings`)."""
    hf = hf or {}
    rp = hf.get("rope_parameters") if isinstance(hf.get("rope_parameters"), dict) else {}
    for where, d in (("", hf), ("rope_parameters.", rp), ("rope_scaling.", rs or {})):
        prf = d.get("partial_rotary_factor")
        if prf is not None and prf != 1:
            raise ConfigError(f"partial rotary ({where}partial_rotary_factor={prf}) is not supported")
    if not rs:
        return RopeScaling()
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind in (None, "default"):
        return RopeScaling()
    where = "rope_scaling."
    if kind == "linear":
        return RopeScaling(kind="linear", factor=hf_float(rs, "factor", where=where))
    if kind == "llama3":
        low = hf_float(rs, "low_freq_factor", 1.0, where=where)
        high = hf_float(rs, "high_freq_factor", 4.0, where=where)
        if not high > low:  # the smooth blend divides by high - low
            raise ConfigError(f"rope_scaling.high_freq_factor ({high}) must be > rope_scaling.low_freq_factor ({low})")
        return RopeScaling(
            kind="llama3",
            factor=hf_float(rs, "factor", where=where),
            low_freq_factor=low,
            high_freq_factor=high,
            original_max_position_embeddings=hf_int(rs, "original_max_position_embeddings", 8192, where=where),
        )
    if kind == "yarn":
        return _yarn_scaling(rs, hf)
    raise ConfigError(f"unsupported rope scaling {show(kind)}; supported: linear, llama3, yarn")


def _yarn_scaling(rs: dict[str, Any], hf: dict[str, Any]) -> RopeScaling:
    """YaRN with transformers' (5.x) defaulting: `original_max_position_embeddings` defaults to
    `max_position_embeddings`, and a top-level `original_max_position_embeddings` wins over the
    rope dict's; an explicit `factor` is used as is (even when it disagrees with
    max_position_embeddings / original), a null one is that ratio; beta_fast / beta_slow default
    (also when 0) to 32 / 1; `truncate` to true."""
    if "factor" not in rs:
        raise ConfigError("yarn rope_scaling needs 'factor' (rope_scaling.factor)")
    max_pos = hf_int(hf, "max_position_embeddings", 4096)
    orig = hf.get("original_max_position_embeddings")
    if orig is None:
        orig = rs.get("original_max_position_embeddings")
    if orig is None:
        orig = max_pos
    if not _is_int(orig) or orig <= 0:  # _is_int: no bool, no 100.5, no inf or NaN
        raise ConfigError(f"rope_scaling.original_max_position_embeddings must be a positive integer, got {show(orig)}")
    orig = int(orig)
    factor = _rope_number(rs, "factor")
    if factor is None:
        factor = float(max_pos) / orig
    if not factor > 0 or factor == float("inf"):
        raise ConfigError(f"rope_scaling.factor must be > 0, got {factor!r}")
    attention_factor = _rope_number(rs, "attention_factor")
    if attention_factor is not None and not (0 < attention_factor < float("inf")):
        raise ConfigError(f"rope_scaling.attention_factor must be > 0, got {attention_factor!r}")
    beta_fast = _rope_number(rs, "beta_fast") or 32.0  # `or`: transformers treats 0 as unset
    beta_slow = _rope_number(rs, "beta_slow") or 1.0
    for name, v in (("beta_fast", beta_fast), ("beta_slow", beta_slow)):
        if not 0 < v < float("inf"):
            raise ConfigError(f"rope_scaling.{name} must be > 0, got {v!r}")
    if beta_fast < beta_slow:
        raise ConfigError(f"rope_scaling.beta_fast ({beta_fast}) must be >= rope_scaling.beta_slow ({beta_slow})")
    mscale = _rope_number(rs, "mscale", 0.0)
    mscale_all_dim = _rope_number(rs, "mscale_all_dim", 0.0)
    for name, v in (("mscale", mscale), ("mscale_all_dim", mscale_all_dim)):
        if not 0 <= v < float("inf"):
            raise ConfigError(f"rope_scaling.{name} must be >= 0, got {v!r}")
    truncate = rs.get("truncate", True)
    if not isinstance(truncate, bool):
        raise ConfigError(f"rope_scaling.truncate must be true or false, got {show(truncate)}")
    return RopeScaling(
        kind="yarn", factor=factor, original_max_position_embeddings=orig, beta_fast=beta_fast,
        beta_slow=beta_slow, attention_factor=attention_factor, mscale=mscale,
        mscale_all_dim=mscale_all_dim, truncate=truncate,
    )


@dataclasses.dataclass(frozen=True)
class SparseConfig:
    """LServe's knobs (defaults are the paper's). Token counts, not block counts.

    With no head pattern every head is a retrieval head, and with `token_budget` at least the
    context every page is read: that is dense attention through the paged cache.
    """

    static_sparsity: float = 0.5  # fraction of (layer, kv head) pairs that become streaming heads
    prefill_sink: int = 128
    prefill_local: int = 8192
    decode_sink: int = 128
    decode_local: int = 256
    page_size: int = 64  # physical page, tokens
    logical_page_size: int = 16  # key min/max granularity inside a physical page
    token_budget: int = 4096  # tokens of retrieval-head KV read per decode step
    selector_interval: int = 4  # decode steps between page re-selections
    selection_mode: str = "query_head"  # "query_head" (LServe) | "kv_head" (shared by the GQA group)
    sparse_decode: bool = True  # False: retrieval heads read every page (dense paged decode)

    def __post_init__(self):
        if not 0.0 <= self.static_sparsity <= 1.0:
            raise ConfigError(f"static_sparsity must be in [0, 1], got {self.static_sparsity}")
        for name in ("prefill_sink", "decode_sink"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("prefill_local", "decode_local", "page_size", "logical_page_size",
                     "token_budget", "selector_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("page_size", "logical_page_size"):
            v = getattr(self, name)
            if v & (v - 1):
                raise ConfigError(f"{name} must be a power of two (the kernels' tiles are), got {v}")
        if self.page_size % self.logical_page_size:
            raise ConfigError(
                f"page_size={self.page_size} must be a multiple of "
                f"logical_page_size={self.logical_page_size}"
            )
        if self.token_budget < self.page_size:
            raise ConfigError(f"token_budget={self.token_budget} is below one page ({self.page_size})")
        if self.selection_mode not in ("query_head", "kv_head"):
            raise ConfigError(f"selection_mode must be 'query_head' or 'kv_head', got {self.selection_mode!r}")

    @property
    def ring_size(self) -> int:
        """Slots of a streaming head's decode ring: sink tokens then a circular local window."""
        return self.decode_sink + self.decode_local

    @property
    def max_selected_pages(self) -> int:
        return self.token_budget // self.page_size
