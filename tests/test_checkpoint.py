"""Checkpoints on disk: what a family declares round-trips, and format-1 checkpoints (written
before per-family declarations, with absent q/k/v biases stored as None) still load."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lserve_jax import models
from lserve_jax.arrays import Arrays
from lserve_jax.checkpoint import FORMAT_VERSION, META_FILE, CheckpointError, open_checkpoint, write_checkpoint
from lserve_jax.params import abstract_params, init_params, layer_decls

from .tiny import tiny_config


@pytest.mark.parametrize("arch,bias", [("llama", False), ("qwen2", True), ("qwen3", False)])
def test_declared_weights_round_trip(arch, bias, tmp_path):
    cfg = tiny_config(architecture=arch, attention_bias=bias)
    params = init_params(cfg, jax.random.key(0), jnp.float32)
    assert set(params.layers[0]) == set(layer_decls(cfg))
    assert ("bq" in params.layers[0]) == bias and ("q_norm" in params.layers[0]) == (arch == "qwen3")
    write_checkpoint(tmp_path, params, cfg, "float32")
    got = open_checkpoint(tmp_path).load_params()
    assert jax.tree.structure(got) == jax.tree.structure(abstract_params(cfg))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_format_1_checkpoint_loads(tmp_path):
    """Format 1 stored every layer with bq/bk/bv fields, None when the model had no biases."""
    cfg = tiny_config()
    params = init_params(cfg, jax.random.key(1), jnp.float32)
    v1 = params.replace(layers=tuple(Arrays({**dict(lp.items()), "bq": None, "bk": None, "bv": None})
                                     for lp in params.layers))
    write_checkpoint(tmp_path, v1, cfg, "float32")
    meta = json.loads((tmp_path / META_FILE).read_text())
    assert meta["format"] == FORMAT_VERSION
    (tmp_path / META_FILE).write_text(json.dumps({**meta, "format": 1}))
    got = open_checkpoint(tmp_path).load_params()
    assert list(got.layers[0]) == list(params.layers[0])  # declaration order, no None entries
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_future_format_is_refused(tmp_path):
    cfg = tiny_config()
    write_checkpoint(tmp_path, init_params(cfg, jax.random.key(0), jnp.float32), cfg, "float32")
    meta = json.loads((tmp_path / META_FILE).read_text())
    (tmp_path / META_FILE).write_text(json.dumps({**meta, "format": 99}))
    with pytest.raises(CheckpointError, match="format 99"):
        open_checkpoint(tmp_path)


def test_every_family_is_reachable_from_its_hf_and_gguf_names():
    for fam in models.FAMILIES:
        for arch in fam.hf_architectures:
            assert models.for_hf({"architectures": [arch]}) is fam
        for mt in fam.model_types:
            assert models.for_hf({"model_type": mt}) is fam
        if fam.gguf_architecture:
            assert models.for_gguf(fam.gguf_architecture) is fam
    assert models.for_hf({"architectures": ["GPT2LMHeadModel"]}) is None
