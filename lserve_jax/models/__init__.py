"""Model families, one file each, and the registry that picks one from a config.

To add a family: write `models/<family>.py` declaring its `Family` (parameters with their HF
and GGUF names, config defaults), add it to `FAMILIES` below, and add a tiny HF variant to
`tests/hf_models.py` (the parity tests run over every variant). A layer difference beyond the
declared parameters goes into `models/layer.py`, keyed on what the parameters declare.
"""

from __future__ import annotations

from typing import Any

from .base import TOP_PARAMS, Family
from .llama import LLAMA, MISTRAL
from .qwen2 import QWEN2
from .qwen3 import QWEN3

FAMILIES: tuple[Family, ...] = (LLAMA, MISTRAL, QWEN2, QWEN3)
_BY_NAME = {f.name: f for f in FAMILIES}

__all__ = ["FAMILIES", "TOP_PARAMS", "Family", "get", "for_hf", "for_gguf", "hf_architectures"]


def get(name: str) -> Family:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {sorted(_BY_NAME)}") from None


def hf_architectures() -> list[str]:
    return sorted(a for f in FAMILIES for a in f.hf_architectures)


def for_hf(hf: dict[str, Any]) -> Family | None:
    """The family of an HF config: by `architectures`, else by `model_type`; None if unknown."""
    archs = hf.get("architectures") or []
    for a in archs if isinstance(archs, (list, tuple)) else [archs]:
        for f in FAMILIES:
            if a in f.hf_architectures:
                return f
    mt = hf.get("model_type")
    return next((f for f in FAMILIES if mt in f.model_types), None)


def for_gguf(arch: str) -> Family | None:
    """The family of a GGUF `general.architecture` (None if unsupported)."""
    return next((f for f in FAMILIES if f.gguf_architecture == arch), None)


def gguf_architectures() -> tuple[str, ...]:
    return tuple(sorted(f.gguf_architecture for f in FAMILIES if f.gguf_architecture))
