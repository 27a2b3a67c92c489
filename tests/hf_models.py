"""Tiny random Hugging Face checkpoints of each supported architecture, made in the test."""

from __future__ import annotations

from pathlib import Path

import numpy as np

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)

VARIANTS = {
    # name: (config class, extra kwargs)
    "llama3": ("LlamaConfig", dict(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),
    "llama_linear": ("LlamaConfig", dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "mistral": ("MistralConfig", dict(sliding_window=None, num_attention_heads=8, num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=4)),
    "tied": ("LlamaConfig", dict(tie_word_embeddings=True, num_attention_heads=8, num_key_value_heads=1)),
    # Qwen3: per-head q/k RMSNorm, an explicit head_dim unlike hidden / heads (64 / 4 = 16)
    "qwen3": ("Qwen3Config", dict(head_dim=32)),
    # YaRN (Qwen2.5's 128K recipe, shrunk so the ramp falls inside head_dim 16): factor 4 with
    # max_position_embeddings 512 / original 64 = 8, so transformers uses the explicit factor.
    "qwen2_yarn": ("Qwen2Config", dict(rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})),
    # DeepSeek-style mscale == mscale_all_dim (attention factor exactly 1, so this one checks the
    # frequencies alone), untruncated ramp, non-default betas, head_dim 32.
    "llama_yarn": ("LlamaConfig", dict(num_attention_heads=2, num_key_value_heads=1, rope_scaling={
        "rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64, "beta_fast": 16.0,
        "beta_slow": 2.0, "mscale": 1.0, "mscale_all_dim": 1.0, "truncate": False})),
}

MODEL_CLASSES = {"LlamaConfig": "LlamaForCausalLM", "MistralConfig": "MistralForCausalLM",
                 "Qwen2Config": "Qwen2ForCausalLM", "Qwen3Config": "Qwen3ForCausalLM"}


def make_hf_model(variant: str, out_dir: Path, *, safe_serialization: bool = True, seed: int = 0):
    """Builds a random tiny model, saves it with save_pretrained; returns the torch model."""
    import torch
    import transformers

    cfg_cls, extra = VARIANTS[variant]
    kwargs = {**TINY, **extra}
    config = getattr(transformers, cfg_cls)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, MODEL_CLASSES[cfg_cls])(config).float().eval()
    with torch.no_grad():  # HF inits norms to 1 and biases to 0: randomise so they are tested
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    if safe_serialization:
        model.save_pretrained(out_dir)
    else:  # transformers 5 only writes safetensors: write the legacy .bin by hand
        out_dir.mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(out_dir)
        torch.save(model.state_dict(), out_dir / "pytorch_model.bin")
    return model


def hf_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()
