"""RoPE frequencies, YaRN's attention factor and apply_rope equal transformers' (issue 14)."""

from __future__ import annotations

import dataclasses
import logging

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding, apply_rotary_pos_emb

from lserve_jax import rope
from lserve_jax.config import ConfigError, ModelConfig, RopeScaling


@pytest.fixture(autouse=True)
def _quiet_transformers():
    # transformers warns (once per config) that factor != max_position_embeddings / original.
    logging.getLogger("transformers").setLevel(logging.ERROR)


def hf_dict(head_dim=64, theta=10000.0, max_pos=4096, rope_scaling=None, **extra) -> dict:
    """A config.json for a one-layer Qwen2 whose only interesting part is its RoPE."""
    d = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=32, hidden_size=2 * head_dim,
             intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
             head_dim=head_dim, rope_theta=theta, max_position_embeddings=max_pos, **extra)
    if rope_scaling is not None:
        d["rope_scaling"] = rope_scaling
    return d


def both(d: dict):
    """(our ModelConfig, transformers' config) from one config.json dict (from_dict, as from_pretrained)."""
    return ModelConfig.from_hf(d), transformers.Qwen2Config.from_dict(dict(d))


def assert_inv_freq_equal(ours: np.ndarray, hf: np.ndarray):
    assert ours.dtype == np.float32 and ours.shape == hf.shape
    np.testing.assert_allclose(ours, hf, rtol=1e-6, atol=0)
    np.testing.assert_array_max_ulp(ours, hf, maxulp=1)  # float32 rounding, torch's pow aside


YARN = {
    # Qwen2.5's 128K recipe at its real head size and a smaller one.
    "qwen2.5_hd128": dict(head_dim=128, theta=1e6, max_pos=32768, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}),
    "qwen2.5_hd64": dict(head_dim=64, theta=1e6, max_pos=131072, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}),
    # The tiny test model's: the ramp falls inside head_dim 16; explicit factor 4 != 512 / 64.
    "tiny_hd16": dict(head_dim=16, max_pos=512, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
    "attention_factor": dict(head_dim=64, max_pos=1024, rope_scaling={
        "rope_type": "yarn", "factor": 2.5, "attention_factor": 0.8, "original_max_position_embeddings": 100}),
    "mscale_all_dim": dict(head_dim=64, max_pos=163840, rope_scaling={
        "rope_type": "yarn", "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 0.707, "beta_fast": 32,
        "beta_slow": 1, "original_max_position_embeddings": 4096}),
    "mscale_equal": dict(head_dim=64, max_pos=163840, rope_scaling={
        "rope_type": "yarn", "factor": 40.0, "mscale": 0.707, "mscale_all_dim": 0.707,
        "original_max_position_embeddings": 4096}),
    "no_truncate": dict(head_dim=64, theta=500000.0, max_pos=8192, rope_scaling={
        "rope_type": "yarn", "factor": 8.0, "truncate": False, "original_max_position_embeddings": 2048}),
    "no_truncate_hd16": dict(head_dim=16, max_pos=512, rope_scaling={
        "rope_type": "yarn", "factor": 8.0, "truncate": False, "original_max_position_embeddings": 64}),
    "betas": dict(head_dim=96, max_pos=8192, rope_scaling={
        "rope_type": "yarn", "factor": 3.0, "beta_fast": 8.0, "beta_slow": 2.0,
        "original_max_position_embeddings": 1024}),
    "betas_zero_mean_default": dict(head_dim=64, max_pos=8192, rope_scaling={
        "rope_type": "yarn", "factor": 3.0, "beta_fast": 0, "beta_slow": 0,
        "original_max_position_embeddings": 1024}),
    "factor_below_one": dict(head_dim=64, max_pos=2048, rope_scaling={
        "rope_type": "yarn", "factor": 0.5, "original_max_position_embeddings": 2048}),
    "factor_null_is_ratio": dict(head_dim=64, max_pos=8000, rope_scaling={
        "rope_type": "yarn", "factor": None, "original_max_position_embeddings": 1000}),
    "original_defaults_to_max_pos": dict(head_dim=64, max_pos=4096, rope_scaling={
        "rope_type": "yarn", "factor": 4.0}),
    "legacy_type_key": dict(head_dim=80, theta=1e6, max_pos=32768, rope_scaling={
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}),
    # a top-level original_max_position_embeddings wins over the rope dict's (Phi-3's layout)
    "toplevel_original": dict(head_dim=128, max_pos=131072, original_max_position_embeddings=4096,
                              rope_scaling={"rope_type": "yarn", "factor": 32.0,
                                            "original_max_position_embeddings": 65536}),
}


@pytest.mark.parametrize("case", sorted(YARN))
def test_yarn_matches_transformers(case):
    ours, hf = both(hf_dict(**YARN[case]))
    assert ours.rope_scaling.kind == "yarn" and hf.rope_parameters["rope_type"] == "yarn"
    hf_inv, hf_scale = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    assert_inv_freq_equal(rope.inv_frequencies(ours), hf_inv.numpy())
    assert rope.attention_scaling(ours) == pytest.approx(hf_scale, rel=1e-12, abs=0)
    # and the module the HF model runs picks the same
    emb = Qwen2RotaryEmbedding(hf)
    assert_inv_freq_equal(rope.inv_frequencies(ours), emb.inv_freq.numpy())
    assert rope.attention_scaling(ours) == pytest.approx(emb.attention_scaling, rel=1e-12, abs=0)


def test_yarn_really_scales():
    # The tiny case is not the identity: some frequencies kept, some divided by 4, some blended.
    ours, _ = both(hf_dict(**YARN["tiny_hd16"]))
    plain = rope.inv_frequencies(dataclasses.replace(ours, rope_scaling=RopeScaling()))
    ratio = plain / rope.inv_frequencies(ours)
    assert ratio[0] == 1 and ratio[-1] == pytest.approx(4) and np.any((ratio > 1.01) & (ratio < 3.99))
    assert rope.attention_scaling(ours) == pytest.approx(0.1 * np.log(4) + 1)
    assert rope.attention_scaling(dataclasses.replace(ours, rope_scaling=RopeScaling())) == 1.0


def test_yarn_from_rope_parameters():
    # transformers >= 5 writes rope_parameters (theta inside) instead of rope_scaling.
    d = hf_dict(**YARN["qwen2.5_hd64"])
    d["rope_parameters"] = {**d.pop("rope_scaling"), "rope_theta": d.pop("rope_theta")}
    ours, hf = both(d)
    assert ours.rope_theta == 1e6 and ours.rope_scaling.factor == 4.0
    assert_inv_freq_equal(rope.inv_frequencies(ours), ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")[0].numpy())


@pytest.mark.parametrize("case", ["default", "default_hd80", "linear", "llama3", "llama3_hd16"])
def test_other_kinds_match_transformers(case):
    d = {"default": hf_dict(head_dim=128, theta=1e6),
         "default_hd80": hf_dict(head_dim=80, theta=10000.0),
         "linear": hf_dict(head_dim=64, rope_scaling={"rope_type": "linear", "factor": 2.0}),
         "llama3": hf_dict(head_dim=128, theta=500000.0, max_pos=131072, rope_scaling={
             "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 8192}),
         "llama3_hd16": hf_dict(head_dim=16, theta=500000.0, max_pos=512, rope_scaling={
             "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 64})}[case]
    ours, hf = both(d)
    kind = hf.rope_parameters["rope_type"]
    if kind == "default":
        hf_inv, hf_scale = Qwen2RotaryEmbedding.compute_default_rope_parameters(hf)
    else:
        hf_inv, hf_scale = ROPE_INIT_FUNCTIONS[kind](hf, "cpu")
    np.testing.assert_allclose(rope.inv_frequencies(ours), hf_inv.numpy(), rtol=1e-6, atol=0)
    assert rope.attention_scaling(ours) == hf_scale == 1.0


@pytest.mark.parametrize("case,max_pos", [("qwen2.5_hd128", 131072), ("tiny_hd16", 512),
                                          ("attention_factor", 1024), ("mscale_all_dim", 163840),
                                          ("no_truncate_hd16", 512)])
def test_apply_rope_matches_hf(case, max_pos):
    ours, hf = both(hf_dict(**YARN[case]))
    rng = np.random.default_rng(0)
    b, t, h, d = 2, 48, 3, ours.head_dim
    q = rng.standard_normal((b, t, h, d), dtype=np.float32)
    k = rng.standard_normal((b, t, h, d), dtype=np.float32)
    pos = np.sort(rng.integers(0, max_pos, (b, t)), axis=1).astype(np.int32)
    pos[:, :4] = [0, 1, 2, 3]
    emb = Qwen2RotaryEmbedding(hf)
    with torch.no_grad():
        cos, sin = emb(torch.from_numpy(q), torch.from_numpy(pos).long())
        hq, hk = apply_rotary_pos_emb(torch.from_numpy(q).transpose(1, 2), torch.from_numpy(k).transpose(1, 2),
                                      cos, sin)  # HF's [B, H, T, D]
    inv, scale = rope.inv_frequencies(ours), rope.attention_scaling(ours)
    assert scale == pytest.approx(emb.attention_scaling, rel=1e-12, abs=0)
    for x, ref in ((q, hq), (k, hk)):
        got = np.asarray(rope.apply_rope(jnp.asarray(x), jnp.asarray(pos), inv, scale))
        # Positions reach 1.6e5 rad: a 1-ulp frequency difference would show here, so keep it tight.
        np.testing.assert_allclose(got, ref.transpose(1, 2).numpy(), rtol=0, atol=2e-5)


def test_yarn_config_roundtrips_and_old_configs_load():
    ours, _ = both(hf_dict(**YARN["mscale_all_dim"]))
    assert ModelConfig.from_dict(ours.to_dict()) == ours
    old = ModelConfig.from_dict({**ours.to_dict(), "rope_scaling": {
        "kind": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}})  # an lserve.json written before YaRN
    assert old.rope_scaling.kind == "llama3" and old.rope_scaling.truncate is True
    assert rope.attention_scaling(old) == 1.0


BAD = [
    ({"factor": 0.0}, "factor"),
    ({"factor": -4.0}, "factor"),
    ({"factor": "4"}, "factor"),
    ({"factor": True}, "factor"),
    ({"attention_factor": 0.0}, "attention_factor"),
    ({"attention_factor": -1.0}, "attention_factor"),
    ({"beta_fast": -32.0}, "beta_fast"),
    ({"beta_slow": -1.0}, "beta_slow"),
    ({"beta_fast": 1.0, "beta_slow": 4.0}, "beta_fast"),
    ({"mscale": -1.0, "mscale_all_dim": 1.0}, "mscale"),
    ({"mscale": 1.0, "mscale_all_dim": "x"}, "mscale_all_dim"),
    ({"original_max_position_embeddings": 0}, "original_max_position_embeddings"),
    ({"original_max_position_embeddings": 100.5}, "original_max_position_embeddings"),
    ({"truncate": "no"}, "truncate"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
]


@pytest.mark.parametrize("change,field", BAD, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD)])
def test_bad_yarn_config_names_the_field(change, field):
    rs = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024, **change}
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_hf(hf_dict(max_pos=4096, rope_scaling=rs))


def test_missing_factor_and_partial_rotary_rejected():
    with pytest.raises(ConfigError, match="factor"):
        ModelConfig.from_hf(hf_dict(rope_scaling={"rope_type": "yarn", "original_max_position_embeddings": 64}))
    with pytest.raises(ConfigError, match="partial_rotary_factor"):  # also outside rope_scaling, any kind
        ModelConfig.from_hf(hf_dict(partial_rotary_factor=0.5))
    assert ModelConfig.from_hf(hf_dict(partial_rotary_factor=1.0)).rope_scaling == RopeScaling()
    with pytest.raises(ConfigError, match="yarn"):  # the message lists what is supported
        ModelConfig.from_hf(hf_dict(rope_scaling={"rope_type": "longrope", "factor": 4.0}))
