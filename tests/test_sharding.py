"""Tensor parallelism over KV heads: sharded logits equal one device's; layout rules; errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lserve_jax.heads import HeadLayout
from lserve_jax.sharding import ShardingError, balance_retrieval, check_tp, tp_permutation

from .tiny import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def test_sharded_prefill_and_decode_match_one_device():
    """4 fake CPU devices (the flag must be set before jax starts, hence a subprocess):
    dense and sparse, tp 2 and 4, GQA ratios 2 and 1; and the engine at tp 2 with three decode
    steps per dispatch against one."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "scripts" / "tp_check.py")], env=env,
                       capture_output=True, text=True, timeout=900)
    print(r.stdout, r.stderr[-3000:])
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert r.stdout.count(" ok") == 10
    assert r.stdout.count("decode_steps 3 vs 1: ok") == 2


def test_balance_promotes_highest_alpha_streaming_heads():
    retrieval = np.array([[True, False, False, False], [True, True, False, False]])
    alpha = np.array([[0.9, 0.1, 0.5, 0.2], [0.9, 0.8, 0.1, 0.3]])
    out = balance_retrieval(retrieval, 2, alpha)
    np.testing.assert_array_equal(out, [[True, False, True, False], [True, True, False, False]])
    assert (balance_retrieval(retrieval, 4, alpha).sum(axis=1) % 4 == 0).all()


def test_tp_permutation_puts_each_devices_retrieval_heads_first():
    retrieval = np.array([[True, False, True, False, True, True, False, False]])
    layout, perms = tp_permutation(retrieval, 2)
    assert layout.num_retrieval == (4,)
    assert sorted(perms[0]) == list(range(8))
    for d in range(2):
        sl = perms[0][d * 4:(d + 1) * 4]
        np.testing.assert_array_equal(retrieval[0][sl], [True, True, False, False])
    # dense: identity, so a dense model is sharded without moving any head
    _, ident = tp_permutation(np.ones((1, 8), bool), 4)
    np.testing.assert_array_equal(ident[0], np.arange(8))


def test_uneven_heads_are_a_clear_error():
    cfg = tiny_config(num_heads=9, num_kv_heads=3)  # SmolLM2-like: 3 KV heads
    with pytest.raises(ShardingError, match="does not divide"):
        check_tp(cfg, HeadLayout.dense(2, 3), 2)
    with pytest.raises(ShardingError, match="not divisible"):
        tp_permutation(np.array([[True, False, False, False]]), 2)


def test_layout_ordered_for_another_tp_is_rejected():
    """A retrieval-first layout for one device would swap head kinds on 2 devices: refused."""
    from lserve_jax.config import SparseConfig
    from lserve_jax.model import ModelSpec

    cfg = tiny_config(num_layers=1, num_kv_heads=4)
    one_device = HeadLayout(4, (2,))
    with pytest.raises(ValueError, match="ordered for tp=1"):
        ModelSpec(cfg, one_device, SparseConfig(), tp=2)
    layout, _ = tp_permutation(np.array([[True, False, True, False]]), 2)
    assert ModelSpec(cfg, layout, SparseConfig(), tp=2).tp == 2
