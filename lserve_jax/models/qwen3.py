"""Qwen3 (dense): the Llama layer with an RMSNorm over each head's query and key (before RoPE),
an explicit `head_dim` (not hidden / heads) and no q/k/v bias unless `attention_bias`."""

from __future__ import annotations

from ..decl import ParamDecl
from .base import LLAMA_LAYER, QKV_BIAS, Family

QK_NORM = (
    ParamDecl("q_norm", ("head_dim",), "self_attn.q_norm.weight", "attn_q_norm.weight", init="ones"),
    ParamDecl("k_norm", ("head_dim",), "self_attn.k_norm.weight", "attn_k_norm.weight", init="ones"),
)

QWEN3 = Family(
    name="qwen3",
    hf_architectures=("Qwen3ForCausalLM",),
    model_types=("qwen3",),
    layer_params=LLAMA_LAYER[:4] + QKV_BIAS + QK_NORM + LLAMA_LAYER[4:],
    gguf_architecture="qwen3",
    gguf_hf_config={"attention_dropout": 0.0, "attention_bias": False, "use_sliding_window": False,
                    "sliding_window": None},
)
