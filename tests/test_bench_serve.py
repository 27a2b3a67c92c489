"""bench/serve.py runs end to end on a tiny model (the H200 run is the same code at full size)."""

from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_serve_benchmark_smoke(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    import serve  # bench/serve.py

    res = serve.main(["--shape", "tiny", "--scale", "0.001", "--requests", "3", "--rates", "50",
                      "--max-slots", "2", "--prefill-chunk", "32", "--out", str(tmp_path), "--compile-cache", ""])
    runs = {(r["engine"], r["workload"], r["rate"], r["prefix_cache"]) for r in res["runs"]}
    assert ("sparse", "doc", None, True) in runs and ("dense", "gen", 50.0, True) in runs
    assert ("sparse", "prefix", None, False) in runs
    for r in res["runs"]:
        assert r["output_tokens"] > 0 and r["ttft_p50_s"] > 0 and r["peak_running"] >= 1
    on = [r for r in res["runs"] if r["workload"] == "prefix" and r["prefix_cache"]]
    assert all(r["prefix_hit_tokens"] > 0 for r in on)
    s = res["summary"]
    for key in ("serve_doc_throughput_speedup_vs_dense", "serve_gen_throughput_speedup_vs_dense",
                "serve_gen_tpot_p50_speedup_vs_dense", "prefix_cache_ttft_speedup"):
        assert s[key] > 0
    (f,) = list(tmp_path.glob("serve-*.json"))
    assert json.loads(f.read_text())["summary"] == s
    # the same bytes of KV pages: the sparse engine's pages hold half the heads, so it gets more
    pages = res["num_pages"]
    assert pages["sparse"] > pages["dense"] and res["pool_bytes"] > 0
    sys.modules.pop("serve", None)


def test_serve_benchmark_one_engine_per_call_then_merge(tmp_path, monkeypatch):
    """A GPU run too long for one call runs each engine in its own and merges the files."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    import serve  # bench/serve.py

    common = ["--shape", "tiny", "--scale", "0.001", "--requests", "2", "--rates", "", "--workloads", "doc",
              "--max-slots", "2", "--out", str(tmp_path), "--compile-cache", ""]
    parts = [serve.main(common + ["--engines", e, f"--tag=-{e}"]) for e in ("sparse", "dense")]
    assert [{r["engine"] for r in p["runs"]} for p in parts] == [{"sparse"}, {"dense"}]
    assert "serve_doc_throughput_speedup_vs_dense" not in parts[0]["summary"]
    merged = serve.main(["--merge", *sorted(map(str, tmp_path.glob("serve-*-*e.json"))), "--out", str(tmp_path), "--compile-cache", ""])
    assert merged["summary"]["serve_doc_throughput_speedup_vs_dense"] > 0
    assert len(list(tmp_path.glob("serve-*-merged.json"))) == 1
    sys.modules.pop("serve", None)


def test_serve_benchmark_through_http(tmp_path, monkeypatch):
    """--http: the same requests as streaming /v1/completions calls to the server on a thread."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    import serve

    res = serve.main(["--shape", "tiny", "--scale", "0.001", "--requests", "2", "--rates", "", "--workloads", "doc",
                      "--max-slots", "2", "--prefill-chunk", "32", "--http", "--out", str(tmp_path), "--compile-cache", ""])
    assert res["http"] and len(res["runs"]) == 2
    for r in res["runs"]:
        assert r["http"] and r["output_tokens"] == 2 * 4 and r["ttft_p50_s"] > 0 and r["tpot_p50_s"] > 0
    assert list(tmp_path.glob("serve-http-*.json"))
    sys.modules.pop("serve", None)


def test_serve_benchmark_in_process_and_through_http_on_one_engine(tmp_path, monkeypatch):
    """--http both: each run in process, then the same requests through the server on the same
    warm engine; the two JSONs the report pairs, with the same greedy token counts."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    import serve

    res = serve.main(["--shape", "tiny", "--scale", "0.001", "--requests", "2", "--rates", "", "--workloads", "gen",
                      "--engines", "sparse", "--max-slots", "2", "--prefill-chunk", "32", "--http", "both",
                      "--out", str(tmp_path), "--compile-cache", "", "--tag=-t"])
    assert res["http"] and len(res["runs"]) == 1
    with open(next(tmp_path.glob("serve-2*-t.json"))) as f:
        local = json.load(f)
    assert not local["http"] and len(local["runs"]) == 1 and not local["runs"][0].get("http")
    assert local["runs"][0]["output_tokens"] == res["runs"][0]["output_tokens"] > 0
    assert local["num_pages"] == res["num_pages"]
    sys.modules.pop("serve", None)


def test_pool_of_equal_bytes_and_the_long_prompt_mode(tmp_path, monkeypatch):
    """pages_for_bytes gives each layout the pages that fit the same memory (the sparse layout's
    streaming pool counted in); --long serves one long prompt in chunks and reports its TTFT."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    import serve
    from lserve_jax.config import ModelConfig, SparseConfig
    from lserve_jax.heads import HeadLayout

    import jax.numpy as jnp

    cfg = ModelConfig(**serve.TINY)
    sp = SparseConfig(page_size=16, logical_page_size=4)
    dense, half = HeadLayout.dense(2, 2), HeadLayout(2, (1, 1))
    per_page = serve.cache_bytes(cfg, dense, sp, jnp.float32, 3) - serve.cache_bytes(cfg, dense, sp, jnp.float32, 2)
    assert serve.pages_for_bytes(cfg, dense, sp, jnp.float32, 10 * per_page, 1) == 11
    sparse_pages = serve.pages_for_bytes(cfg, half, sp, jnp.float32, 10 * per_page, 1)
    assert 19 <= sparse_pages <= 21  # half the heads per page: about twice the pages
    assert serve.pages_for_bytes(cfg, half, sp, jnp.float32, 10 * per_page, 9) < sparse_pages
    # 8-bit pages (values + a float32 scale per token and head; the page statistics stay float32):
    # 2.3x float32's pages at this tiny head dim (16)
    assert 20 <= serve.pages_for_bytes(cfg, dense, sp, jnp.float32, 10 * per_page, 1, jnp.int8) <= 25

    res = serve.main(["--shape", "tiny", "--long", "300", "--prefill-chunk", "64", "--out", str(tmp_path),
                      "--compile-cache", "", "--kv-dtype", "int8"])
    assert [r["engine"] for r in res["runs"]] == ["sparse", "dense"] and res["kv_dtype"] == "int8"
    for r in res["runs"]:
        assert r["served"] and r["ttft_s"] > 0 and r["output_tokens"] == serve.LONG_OUT and r["prefill_chunk"] == 64
    assert res["summary"]["max_prompt_tokens_served"] == 300
    assert list(tmp_path.glob("serve-long-*.json"))
    sys.modules.pop("serve", None)


def test_a_pool_too_small_for_the_longest_request_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    import pytest
    import serve

    with pytest.raises(SystemExit, match="raise --pool-gib"):
        serve.main(["--shape", "tiny", "--scale", "0.001", "--requests", "2", "--rates", "", "--workloads", "doc",
                    "--pool-gib", "0.00001", "--out", str(tmp_path), "--compile-cache", ""])
    for bad in (["--long", "-5"], ["--pool-gib", "0"]):  # usage errors (argparse exits 2), before any work
        with pytest.raises(SystemExit) as e:
            serve.main(["--shape", "tiny", *bad, "--out", str(tmp_path)])
        assert e.value.code == 2
    sys.modules.pop("serve", None)


def test_http_without_the_server_packages_is_one_clear_error(tmp_path, monkeypatch, capsys):
    """--http on a machine without uvicorn fails at once, naming the package, before any warm-up."""
    import importlib.util

    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    import serve

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    with pytest.raises(SystemExit) as e:
        serve.main(["--shape", "tiny", "--http", "both", "--out", str(tmp_path)])
    assert e.value.code == 2 and "--http needs uvicorn (pip install uvicorn)" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
    sys.modules.pop("serve", None)
