"""Frozen, hashable configs: the model's shape (`ModelConfig`) and LServe's knobs (`SparseConfig`).

Both are plain frozen dataclasses so they can be static arguments of `jax.jit`. This module must
not import jax: the CLIs parse configs before paying for jax's import.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


class ConfigError(ValueError):
    """A config that this project cannot run (unknown architecture, inconsistent shapes...)."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `kind` is "none", "linear" or "llama3" (HF `rope_type`)."""

    kind: str = "none"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-family decoder, built from an HF `config.json` by `from_hf`."""

    architecture: str  # "llama" | "mistral" | "qwen2"
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
    attention_bias: bool = False  # q/k/v projection bias (Qwen2)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "head_dim"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA ratio)."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Builds the config from a parsed HF `config.json` dict; raises ConfigError if unsupported."""
        archs = hf.get("architectures") or []
        arch = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            model_type = hf.get("model_type")
            if model_type in ("llama", "mistral", "qwen2"):
                arch = model_type
            else:
                raise ConfigError(
                    f"unsupported architecture {archs or model_type!r}; supported: "
                    f"{sorted(SUPPORTED_ARCHITECTURES)}"
                )
        try:
            hidden = int(hf["hidden_size"])
            heads = int(hf["num_attention_heads"])
            kv_heads = int(hf.get("num_key_value_heads") or heads)
            head_dim = int(hf.get("head_dim") or hidden // heads)
            rs = hf.get("rope_scaling") or None
            rope_theta = float(hf.get("rope_theta", 10000.0))
            rp = hf.get("rope_parameters")  # transformers >= 5 folds theta and scaling together
            if isinstance(rp, dict):
                rope_theta = float(rp.get("rope_theta", rope_theta))
                if rs is None and rp.get("rope_type", "default") != "default":
                    rs = rp
            window = hf.get("sliding_window")
            if (hf.get("use_sliding_window", arch == "mistral") and window is not None
                    and int(window) < int(hf.get("max_position_embeddings", 4096))):
                raise ConfigError(
                    f"sliding-window attention (sliding_window={window}) is not supported; models with "
                    f"sliding_window null (e.g. Mistral-7B-v0.2 and later) are")
            eos = hf.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
            return cls(
                architecture=arch,
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(hf["intermediate_size"]),
                num_layers=int(hf["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=kv_heads,
                head_dim=head_dim,
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
                rope_theta=rope_theta,
                rope_scaling=_rope_scaling(rs),
                max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                attention_bias=bool(hf.get("attention_bias", arch == "qwen2")),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_ids=tuple(int(e) for e in eos_ids),
            )
        except KeyError as e:
            raise ConfigError(f"config.json lacks the field {e.args[0]!r}") from None

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "ModelConfig":
        with open(path) as f:
            return cls.from_hf(json.load(f))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        d["rope_scaling"] = RopeScaling(**d.get("rope_scaling", {}))
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)


def _rope_scaling(rs: dict[str, Any] | None) -> RopeScaling:
    if not rs:
        return RopeScaling()
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind in (None, "default"):
        return RopeScaling()
    if kind == "linear":
        return RopeScaling(kind="linear", factor=float(rs["factor"]))
    if kind == "llama3":
        return RopeScaling(
            kind="llama3",
            factor=float(rs["factor"]),
            low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(rs.get("original_max_position_embeddings", 8192)),
        )
    raise ConfigError(f"unsupported rope scaling {kind!r}; supported: linear, llama3")


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
