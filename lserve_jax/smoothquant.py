"""SmoothQuant calibration for INT8 W8A8 (`quant.Int8Linear`): the largest magnitude each input
channel of every linear layer reaches over calibration text.

    amax = activation_amax(params, cfg, calibration_ids(tokenizer, cfg.vocab_size))
    params = quantize_params(params, "int8", act_amax=amax)

Per-token int8 activations lose the bulk of a token's channels when a few channels carry values
10-100x the rest (LLMs have such channels at fixed positions); SmoothQuant divides each input
channel by a factor s_j and multiplies the weight's row j by it, the same product with the range
moved into the weights (`quant.smoothing`). The factors need each channel's activation maximum:
q/k/v read the attention norm's output, o_proj the attention output, gate/up the MLP norm's
output, down_proj SwiGLU's hidden activation; fused q/k/v and gate/up (`lserve_jax.fuse`) read
their parts' input, one smoothing for the fused product, so one activation quantisation. One
jitted layer function, run once per layer over the calibration tokens (the model's own forward,
dense causal attention).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .models.layer import attention_block, causal_attention, gated_act, mlp, rms_norm


def _channel_amax(a: jax.Array) -> jax.Array:
    return jnp.max(jnp.abs(a.astype(jnp.float32)).reshape(-1, a.shape[-1]), axis=0)


def activation_amax(params, cfg, ids) -> list[dict[str, jax.Array]]:
    """Per layer, {linear name: float32 [in]}: each input channel's largest |activation| over the
    token ids `ids` (1-D). The params must be unquantised (the maxima of the model being quantised)."""
    ids = jnp.asarray(ids, jnp.int32)[None]
    if ids.shape[1] < 1:
        raise ValueError("activation maxima need at least one calibration token")
    positions = jnp.arange(ids.shape[1], dtype=jnp.int32)[None]

    @jax.jit
    def layer(lp, x):
        def attend(q, k, v):
            o = causal_attention(q, k, v)
            return o, o

        mid, o = attention_block(lp, x, positions, cfg, attend)
        h_attn = rms_norm(x, lp.attn_norm, cfg.rms_norm_eps)
        h_mlp = rms_norm(mid, lp.mlp_norm, cfg.rms_norm_eps)
        a_attn, a_mlp = _channel_amax(h_attn), _channel_amax(h_mlp)
        amax = {"wq": a_attn, "wk": a_attn, "wv": a_attn, "wqkv": a_attn,
                "wo": _channel_amax(o.reshape(*o.shape[:-2], -1)),
                "w_gate": a_mlp, "w_up": a_mlp, "w_gate_up": a_mlp, "w_down": _channel_amax(gated_act(lp, h_mlp))}
        return mlp(lp, mid, cfg), amax

    x, out = params.embed[ids], []
    for lp in params.layers:
        x, amax = layer(lp, x)
        out.append(amax)
    return out


def quantize_model(params, cfg, mode: str, tokenizer=None):
    """`quant.quantize_params(params, mode)` with what the mode needs: for "int8", activation maxima
    over the package's calibration text through `tokenizer` (`kv8.calibration_ids`; without a
    tokenizer, seeded random ids)."""
    from .kv8 import calibration_ids
    from .quant import check_mode, quantize_params

    amax = None
    if check_mode(mode) == "int8":
        amax = activation_amax(params, cfg, calibration_ids(tokenizer, cfg.vocab_size))
    return quantize_params(params, mode, act_amax=amax)
