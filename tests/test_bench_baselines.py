"""The benchmarks' baselines run the model's own decode skeleton (`model.decode_forward`) and
build random caches from the cache declaration (`cache.init_cache(fill=...)`): on CPU, with XLA
attention in place of cuDNN, the dense contiguous baseline equals the paged dense decode step."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lserve_jax import cache as kvc
from lserve_jax.config import SparseConfig
from lserve_jax.heads import HeadLayout
from lserve_jax.model import ModelSpec, decode_step, prefill
from lserve_jax.ops import Kernels

from .tiny import TINY, tiny_params

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _bench_module(name):
    sys.path.insert(0, str(BENCH))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(BENCH))


def test_dense_contiguous_baseline_equals_the_paged_decode_step():
    decode = _bench_module("decode")
    params = tiny_params(TINY)
    layout = HeadLayout.dense(TINY.num_layers, TINY.num_kv_heads)
    sparse = SparseConfig(page_size=16, logical_page_size=4, sparse_decode=False)
    spec = ModelSpec(TINY, layout, sparse, Kernels.from_names(prefill="reference", decode="reference"))
    b, t, n = 2, 32, 4
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, TINY.vocab_size, (b, t)).astype(np.int32)
    lengths = np.array([20, 32], np.int32)
    cache = kvc.init_cache(TINY, layout, sparse, batch=b, num_pages=b * n + 1, max_pages_per_seq=n,
                           dtype=jnp.float32)
    cache = cache.replace(page_table=jnp.arange(1, b * n + 1, dtype=jnp.int32).reshape(b, n))
    _, cache = prefill(params, cache, jnp.asarray(tokens), jnp.asarray(lengths), spec)
    # the contiguous caches of the baseline hold the same prompt K/V, gathered from the pages
    kc, vc = [], []
    for lc in cache.layers:
        pages = np.asarray(cache.page_table)
        k = np.asarray(lc.k_pages)[:, pages].transpose(1, 2, 3, 0, 4).reshape(b, n * 16, -1, TINY.head_dim)
        v = np.asarray(lc.v_pages)[:, pages].transpose(1, 2, 3, 0, 4).reshape(b, n * 16, -1, TINY.head_dim)
        kc.append(jnp.asarray(k))
        vc.append(jnp.asarray(v))
    step = jax.jit(functools.partial(decode_step, spec=spec))
    base = jax.jit(functools.partial(decode.dense_contiguous_step, cfg=TINY, implementation="xla"))
    toks, lens, kc, vc = jnp.asarray([3, 7], jnp.int32), jnp.asarray(lengths), tuple(kc), tuple(vc)
    for _ in range(5):
        ref, cache = step(params, cache, toks)
        got, kc, vc, lens = base(params, kc, vc, toks, lens)
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-4, rtol=0)
        toks = jnp.argmax(ref, axis=-1).astype(jnp.int32)


def test_random_cache_statistics_match_its_pages():
    decode = _bench_module("decode")
    sparse = SparseConfig(page_size=16, logical_page_size=4, token_budget=32)
    cache = decode.random_cache(TINY, HeadLayout(2, (1, 2)), sparse, 2, 40, 8, jax.random.key(0))
    for lc in cache.layers:
        k = np.asarray(lc.k_pages).reshape(*lc.k_pages.shape[:2], 4, 4, -1)
        np.testing.assert_array_equal(np.asarray(lc.k_min), k.min(axis=3))
        np.testing.assert_array_equal(np.asarray(lc.k_max), k.max(axis=3))
    assert cache.lengths.tolist() == [40, 40] and cache.step.shape == (2,)
    # --max-batch's cache: the same shapes, table and lengths, every value zero
    zero = decode.random_cache(TINY, HeadLayout(2, (1, 2)), sparse, 2, 40, 8, jax.random.key(0), zeros=True)
    assert jax.tree.structure(zero) == jax.tree.structure(cache)
    assert all(a.shape == b.shape and a.dtype == b.dtype for a, b in zip(jax.tree.leaves(zero), jax.tree.leaves(cache)))
    np.testing.assert_array_equal(np.asarray(zero.page_table), np.asarray(cache.page_table))
    assert zero.lengths.tolist() == [40, 40] and not any(np.asarray(x).any() for x in jax.tree.leaves(zero.layers))


def test_decode_bench_quantised_variants():
    """`+w8a8` / `+kv8` / `+kv8e4m3` parse, an 8-bit random cache carries KV8 fields, and the
    summary compares sparse W8A8+KV8 with dense bf16 cuDNN and with dense in the same precision."""
    from lserve_jax.kv8 import INT8
    from lserve_jax.quant import FP8

    decode = _bench_module("decode")
    assert decode.parse_variant("sparse_kv_head+w8a8+kv8") == ("sparse_kv_head", "fp8", INT8)
    assert decode.parse_variant("dense_paged+kv8e4m3") == ("dense_paged", None, FP8)
    assert decode.parse_variant("dense_cudnn") == ("dense_cudnn", None, None)
    assert decode.parse_variant("sparse_kv_head+w8a8int8+kv8") == ("sparse_kv_head", "int8", INT8)
    for bad in ("sparse_kv_head+kv9", "dense_cudnn+kv8", "dense_paged+kv8+kv8e4m3", "dense_paged+w8a8+w8a8int8"):
        with pytest.raises(ValueError):
            decode.parse_variant(bad)
    sparse = SparseConfig(page_size=16, logical_page_size=4, token_budget=32)
    cache = decode.random_cache(TINY, HeadLayout(2, (1, 2)), sparse, 2, 40, 8, jax.random.key(0), INT8)
    lc = cache.layers[0]
    assert lc.k_pages.dtype == INT8 and lc.ring_v.dtype == INT8 and "k_scale" in lc and lc.k_min.dtype == jnp.bfloat16
    pts = [dict(ctx=131072, batch=4, variant=v, pipelined_s=t, mean_s=t) for v, t in
           [("dense_cudnn", 20e-3), ("sparse_kv_head", 6e-3), ("sparse_kv_head+w8a8+kv8", 4e-3),
            ("dense_cudnn+w8a8", 16e-3), ("dense_paged+w8a8+kv8", 32e-3)]]
    s = decode.summarize(pts)
    assert s["tpot_speedup_vs_cudnn_128k_b4"] == pytest.approx(20 / 6)
    assert s["tpot_speedup_fp8_vs_dense_bf16_128k_b4"] == pytest.approx(5.0)
    assert s["tpot_speedup_fp8_vs_dense_fp8_128k_b4"] == pytest.approx(4.0)
    assert s["w8a8_format_128k_b4"] == "w8a8"
    # an INT8 W8A8 run that is faster is the one the 8-bit ratios take
    s = decode.summarize(pts + [dict(ctx=131072, batch=4, variant="sparse_kv_head+w8a8int8+kv8", pipelined_s=2.5e-3,
                                     mean_s=2.5e-3)])
    assert s["w8a8_format_128k_b4"] == "w8a8int8" and s["tpot_speedup_fp8_vs_dense_bf16_128k_b4"] == pytest.approx(8.0)


def test_decode_bench_max_batch_fills_the_memory_it_is_given():
    """--max-batch: the batch is what the memory left after weights and headroom holds, and it
    runs; 8-bit KV fits more sequences in the same bytes."""
    from lserve_jax.kv8 import INT8

    decode = _bench_module("decode")
    sparse = SparseConfig(page_size=16, logical_page_size=4, token_budget=32)
    layout = HeadLayout(2, (1, 2))
    per_seq, fixed = decode.seq_cache_bytes(TINY, layout, sparse, 40)
    per_seq8, _ = decode.seq_cache_bytes(TINY, layout, sparse, 40, INT8)
    assert 0 < per_seq8 < per_seq
    limit = 1000 + decode.HEADROOM + fixed + int(3.5 * per_seq)
    r = decode.max_batch(tiny_params(TINY), TINY, layout, sparse, 40, Kernels(), None, 1000, limit)
    assert r["max_batch"] == 3 and r["fits"] and r["attempts"][-1]["ok"]


def test_decode_bench_skips_a_variant_that_cannot_fit():
    """check_fits: the cache (paged or the cuDNN baseline's contiguous one) beside the live weights
    and the headroom must fit the device's limit, else a MemoryError that gives the sizes."""
    decode = _bench_module("decode")
    sparse = SparseConfig(page_size=16, logical_page_size=4, token_budget=32)
    layout = HeadLayout(2, (1, 2))
    per_seq, fixed = decode.seq_cache_bytes(TINY, layout, sparse, 40)
    need = 1000 + decode.HEADROOM + fixed + 3 * per_seq
    decode.check_fits(TINY, layout, sparse, 3, 40, "sparse_kv_head", None, 1000, need)  # exactly fits
    decode.check_fits(TINY, layout, sparse, 3, 40, "sparse_kv_head", None, 1000, None)  # no limit known
    with pytest.raises(MemoryError, match="does not fit: cache"):
        decode.check_fits(TINY, layout, sparse, 3, 40, "sparse_kv_head", None, 1000, need - 1)
    contiguous = 2 * TINY.num_layers * 3 * (40 + 64) * TINY.num_kv_heads * TINY.head_dim * 2
    with pytest.raises(MemoryError, match="does not fit"):
        decode.check_fits(TINY, layout, sparse, 3, 40, "dense_cudnn", None, 0, decode.HEADROOM + contiguous - 1)


def test_multi_step_equals_greedy_steps_one_per_call():
    """bench/decode.py's multi_step (K steps in one fori_loop, bench/profile_decode.py's @multiK)
    gives the logits and cache of K single greedy steps, page re-selections included."""
    decode = _bench_module("decode")
    params = tiny_params(TINY)
    layout = HeadLayout(2, (1, 2))
    sparse = SparseConfig(page_size=16, logical_page_size=4, token_budget=32, selector_interval=2,
                          decode_sink=4, decode_local=8)
    spec = ModelSpec(TINY, layout, sparse, Kernels.from_names(prefill="reference", decode="reference"))
    cache = decode.random_cache(TINY, layout, sparse, 2, 90, 8, jax.random.key(1))
    toks = jnp.asarray([3, 7], jnp.int32)
    multi = jax.jit(functools.partial(decode.multi_step, spec=spec, steps=5))
    got, got_cache = multi(params, cache, toks)
    step = jax.jit(functools.partial(decode_step, spec=spec))
    for _ in range(5):
        ref, cache = step(params, cache, toks)
        toks = jnp.argmax(ref, axis=-1).astype(jnp.int32)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(got_cache.lengths), np.asarray(cache.lengths))
    for a, b in zip(jax.tree.leaves(got_cache), jax.tree.leaves(cache)):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=1e-5)


def test_dense_multi_step_equals_greedy_steps_and_times_are_per_step():
    decode = _bench_module("decode")
    params = tiny_params(TINY)
    rng = np.random.default_rng(0)
    shape = (2, 48, TINY.num_kv_heads, TINY.head_dim)
    kc = tuple(jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(TINY.num_layers))
    vc = tuple(jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(TINY.num_layers))
    toks, lens = jnp.asarray([3, 7], jnp.int32), jnp.asarray([20, 30], jnp.int32)
    got, gk, gv, glen = jax.jit(functools.partial(decode.dense_multi_step, cfg=TINY, steps=3,
                                                           implementation="xla"))(params, kc, vc, toks,
                                                                                               lens)
    step = jax.jit(functools.partial(decode.dense_contiguous_step, cfg=TINY, implementation="xla"))
    for _ in range(3):
        ref, kc, vc, lens = step(params, kc, vc, toks, lens)
        toks = jnp.argmax(ref, axis=-1).astype(jnp.int32)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-4, rtol=0)
    np.testing.assert_array_equal(np.asarray(glen), np.asarray(lens))
    np.testing.assert_allclose(np.asarray(gk[1]), np.asarray(kc[1]), atol=1e-5)
    t = decode.per_token({"mean_s": 8.0, "pipelined_s": 4.0, "first_call_s": 9.0, "steps": 32}, 4)
    assert t == {"mean_s": 2.0, "pipelined_s": 1.0, "first_call_s": 9.0, "steps": 32, "steps_per_call": 4}


def test_bench_scripts_import_and_explain_themselves():
    for script in ("decode.py", "prefill.py", "profile_decode.py", "prefill_attn.py", "decode_attn.py", "accuracy.py",
                   "calib_sweep.py"):
        r = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0 and "usage" in r.stdout, (script, r.stderr[-2000:])


def test_stage_parts_moves_a_file_in_parts(tmp_path):
    """split writes one part at a time; join appends them in order, never twice, refuses a gap,
    and checks the whole file's SHA-256."""
    import hashlib

    stage = _bench_module("stage_parts")
    src = tmp_path / "model.gguf"
    data = np.random.default_rng(0).bytes(1000)
    src.write_bytes(data)
    dest, carry = tmp_path / "dev" / "model.gguf", tmp_path / "carry"
    dest.parent.mkdir()
    sha = hashlib.sha256(data).hexdigest()
    with pytest.raises(ValueError, match="index 3 is out of range"):
        stage.split(str(src), 3, str(carry), part_bytes=400)
    stage.split(str(src), 1, str(carry), part_bytes=400)
    with pytest.raises(ValueError, match="bring part 0 first"):
        stage.join(str(carry), str(dest), sha)
    for i in range(3):
        stage.split(str(src), i, str(carry), part_bytes=400)
        assert len(os.listdir(carry)) == 1  # one part per call
        got = stage.join(str(carry), str(dest), sha)
        assert got == ("complete" if i == 2 else f"waiting for part {i + 1} of 3")
        assert stage.join(str(carry), str(dest), sha) == got  # a repeated call adds nothing
    assert dest.read_bytes() == data
    with pytest.raises(ValueError, match="SHA-256"):
        stage.join(str(carry), str(dest), "0" * 64)


def test_decode_tuning_times_the_page_format_each_variant_reads():
    """--tune times the kernel on the pages a variant reads: 8-bit pages and rings (KV8) for the
    +kv8 variants, not bf16 ones; every config tried agrees with the reference on them."""
    from lserve_jax.kv8 import INT8

    decode = _bench_module("decode")
    sparse = SparseConfig(page_size=16, logical_page_size=4, token_budget=64)
    for kv in (None, INT8):
        t = decode.tune_layer(TINY, HeadLayout(2, (1, 2)), sparse, 2, 100, reps=1, kv_dtype=kv,
                              configs=[{}, dict(pages_per_block=2)])
        assert t["kv_dtype"] == (None if kv is None else "int8")
        assert [c["options"] for c in t["configs"]] == [{}, {"pages_per_block": 2}]
        assert all("error" not in c and c["rel_err"] < 2e-2 and c["us"] > 0 for c in t["configs"]), t


def test_decode_qmatmul_order_is_checked_before_any_run(capsys):
    """bench/decode.py --qmatmul names registered implementations only (exit 2, one line naming
    them)."""
    decode = _bench_module("decode")
    with pytest.raises(SystemExit) as e:
        decode.main(["--qmatmul", "triton,cublas", "--points", "64x1"])
    assert e.value.code == 2
    assert "no qmatmul implementation ['cublas']" in capsys.readouterr().err
