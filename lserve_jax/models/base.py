"""What a model family is: its parameter declaration (with HF and GGUF tensor names) and the
config defaults that differ between families. Pure Python: `config.py` imports it."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from ..decl import ParamDecl


@dataclasses.dataclass(frozen=True)
class Family:
    """A Llama-family decoder variant.

    name: `ModelConfig.architecture`; hf_architectures / model_types: the HF `config.json`
    values that select it; gguf_architecture: GGUF `general.architecture` (None: not read
    from GGUF); layer_params: every per-layer weight (the decoder layer applies what is
    declared: q/k/v biases, per-head q/k norms); hf_defaults: HF config fields whose default
    differs for this family; gguf_permuted_qk: llama.cpp permuted the q/k rows of this
    family's GGUF files; gguf_hf_config: fields written into the HF config made from a GGUF.
    """

    name: str
    hf_architectures: tuple[str, ...]
    model_types: tuple[str, ...]
    layer_params: tuple[ParamDecl, ...]
    gguf_architecture: str | None = None
    hf_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    gguf_permuted_qk: bool = False
    gguf_hf_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __hash__(self) -> int:
        return hash(self.name)

    def layer_decls(self, cfg) -> tuple[ParamDecl, ...]:
        """The per-layer weights a config of this family has."""
        return tuple(p for p in self.layer_params if p.present(cfg))


def _untied(cfg) -> bool:
    return not cfg.tie_word_embeddings


# Weights outside the layers, the same for every family.
TOP_PARAMS = (
    ParamDecl("embed", ("vocab", "embed"), "model.embed_tokens.weight", "token_embd.weight"),
    ParamDecl("final_norm", ("embed",), "model.norm.weight", "output_norm.weight", init="ones"),
    ParamDecl("lm_head", ("embed", "vocab"), "lm_head.weight", "output.weight", transpose=True, when=_untied),
)

# The Llama decoder layer: pre-norm attention and SwiGLU MLP, linear weights [in, out].
LLAMA_LAYER = (
    ParamDecl("attn_norm", ("embed",), "input_layernorm.weight", "attn_norm.weight", init="ones"),
    ParamDecl("wq", ("embed", "q_heads"), "self_attn.q_proj.weight", "attn_q.weight", transpose=True),
    ParamDecl("wk", ("embed", "kv_heads"), "self_attn.k_proj.weight", "attn_k.weight", transpose=True),
    ParamDecl("wv", ("embed", "kv_heads"), "self_attn.v_proj.weight", "attn_v.weight", transpose=True),
    ParamDecl("wo", ("q_heads", "embed"), "self_attn.o_proj.weight", "attn_output.weight", transpose=True),
    ParamDecl("mlp_norm", ("embed",), "post_attention_layernorm.weight", "ffn_norm.weight", init="ones"),
    ParamDecl("w_gate", ("embed", "ffn"), "mlp.gate_proj.weight", "ffn_gate.weight", transpose=True),
    ParamDecl("w_up", ("embed", "ffn"), "mlp.up_proj.weight", "ffn_up.weight", transpose=True),
    ParamDecl("w_down", ("ffn", "embed"), "mlp.down_proj.weight", "ffn_down.weight", transpose=True),
)


def _biased(cfg) -> bool:
    return cfg.attention_bias


# q/k/v projection biases (Qwen2 always, others behind `attention_bias`).
QKV_BIAS = (
    ParamDecl("bq", ("q_heads",), "self_attn.q_proj.bias", "attn_q.bias", init="zeros", when=_biased),
    ParamDecl("bk", ("kv_heads",), "self_attn.k_proj.bias", "attn_k.bias", init="zeros", when=_biased),
    ParamDecl("bv", ("kv_heads",), "self_attn.v_proj.bias", "attn_v.bias", init="zeros", when=_biased),
)
