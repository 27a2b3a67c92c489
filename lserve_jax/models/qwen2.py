"""Qwen2 / Qwen2.5: the Llama layer with q/k/v projection biases."""

from __future__ import annotations

from .base import LLAMA_LAYER, QKV_BIAS, Family

QWEN2 = Family(
    name="qwen2",
    hf_architectures=("Qwen2ForCausalLM",),
    model_types=("qwen2",),
    layer_params=LLAMA_LAYER[:4] + QKV_BIAS + LLAMA_LAYER[4:],
    gguf_architecture="qwen2",
    hf_defaults={"attention_bias": True},
    gguf_hf_config={"attention_dropout": 0.0, "use_sliding_window": False, "sliding_window": None},
)
