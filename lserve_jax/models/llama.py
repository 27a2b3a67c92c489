"""Llama 2 / 3 / 3.1 and Mistral: the plain Llama layer (Mistral without a sliding window).

Llama checkpoints may set `attention_bias` (rare): the biases are then declared too."""

from __future__ import annotations

from .base import LLAMA_LAYER, QKV_BIAS, Family

LLAMA = Family(
    name="llama",
    hf_architectures=("LlamaForCausalLM",),
    model_types=("llama",),
    layer_params=LLAMA_LAYER + QKV_BIAS,
    gguf_architecture="llama",
    gguf_permuted_qk=True,  # llama.cpp interleaves q/k rotary halves for ggml's RoPE
    gguf_hf_config={"attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0, "pretraining_tp": 1},
)

MISTRAL = Family(
    name="mistral",
    hf_architectures=("MistralForCausalLM",),
    model_types=("mistral",),
    layer_params=LLAMA_LAYER,
    hf_defaults={"use_sliding_window": True},  # config.py refuses a window shorter than the context
)
