"""Array declarations: every parameter and cache array is declared once, here-shaped.

An `ArrayDecl` names an array's logical axes; its shape comes from the sizes of those axes for
one model (`axis_sizes`), and everything else is derived from the declaration: random init,
abstract shapes for checkpoint restore, the checkpoint converters' shape checks and the
tensor-parallel shardings (`lserve_jax.sharding.RULES` maps logical axes to the mesh).

Pure Python (no jax): the model-family files and the configs import it before jax is loaded.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

# Logical axis names used in declarations:
#   vocab, embed (hidden size), q_heads (num_heads * head_dim, heads major), kv_heads
#   (num_kv_heads * head_dim), ffn (intermediate), head_dim; cache axes: heads (a head dim
#   of a cache array), batch, pages, page, lpages, slots, sel (selection slots).


@dataclasses.dataclass(frozen=True)
class ArrayDecl:
    """One array: its logical axes, shape, dtype (None: the caller's) and how to init it."""

    axes: tuple[str | None, ...]
    shape: tuple[int, ...]
    dtype: Any = None
    init: str = "normal"  # "normal" | "ones" | "zeros"

    def __post_init__(self):
        if len(self.axes) != len(self.shape):
            raise ValueError(f"declaration axes {self.axes} do not match shape {self.shape}")
        if self.init not in ("normal", "ones", "zeros"):
            raise ValueError(f"unknown init {self.init!r}")


@dataclasses.dataclass(frozen=True)
class ParamDecl:
    """A per-layer (or top-level) weight as a model family declares it.

    axes: logical axes of OUR layout ([in, out] for linear weights); hf / gguf: the tensor's
    name in a Hugging Face checkpoint (after `model.layers.{i}.` for layer params) and in a
    GGUF file (after `blk.{i}.`); transpose: HF stores it [out, in]; when: present only for
    configs where this returns True (e.g. q/k/v biases behind `attention_bias`)."""

    name: str
    axes: tuple[str, ...]
    hf: str
    gguf: str | None = None
    transpose: bool = False
    init: str = "normal"
    when: Callable[[Any], bool] | None = None

    def present(self, cfg) -> bool:
        return self.when is None or bool(self.when(cfg))

    def decl(self, sizes: Mapping[str, int]) -> ArrayDecl:
        return ArrayDecl(self.axes, tuple(sizes[a] for a in self.axes), init=self.init)


def axis_sizes(cfg) -> dict[str, int]:
    """Sizes of the parameter axes of a ModelConfig."""
    return {
        "vocab": cfg.vocab_size, "embed": cfg.hidden_size, "ffn": cfg.intermediate_size,
        "q_heads": cfg.num_heads * cfg.head_dim, "kv_heads": cfg.num_kv_heads * cfg.head_dim,
        "head_dim": cfg.head_dim,
    }
