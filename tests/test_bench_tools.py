"""Small device-call tools: bench/launch_overhead.py runs its chains (interpret mode on CPU) and
writes its JSON; bench/compile_cache.sh packs a cache folder into parts and restores it;
bench/hlo_kernels.py attributes a dumped step's launches to their source ops; bench/cpu_gemm.py
chains the same products in XLA and torch and refuses bad counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_launch_overhead_measures_every_kind(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    import launch_overhead

    rows = launch_overhead.main(["--steps", "3", "--calls", "2", "--tag", "t", "--out", str(tmp_path)])
    assert [r["kind"] for r in rows] == ["xla", "pallas", "cond"]
    assert all(r["us_per_kernel"] > 0 and r["us_per_step"] == r["us_per_call"] / 3 for r in rows)
    # the chains compute what they say: 3 pallas steps of (x + 1) * 1.0001 from ones
    import jax.numpy as jnp

    x = launch_overhead.chain("pallas", 3)(jnp.ones((8, 128), jnp.float32))
    want = 1.0
    for _ in range(3):
        want = (want + 1.0) * 1.0001
    assert abs(float(x[0, 0]) - want) < 1e-4
    (path,) = tmp_path.glob("launch_overhead-*-t.json")
    assert json.loads(path.read_text())["tag"] == "t"
    with pytest.raises(SystemExit):  # one usage line, not a ZeroDivisionError
        launch_overhead.main(["--steps", "0", "--out", str(tmp_path)])
    sys.modules.pop("launch_overhead", None)


def test_compile_cache_round_trip(tmp_path):
    cache, out, back = tmp_path / "cache", tmp_path / "out", tmp_path / "back"
    cache.mkdir()
    for i, n in enumerate((10, 2000, 300000)):
        (cache / f"entry{i}").write_bytes(os.urandom(n))
    script = os.path.join(ROOT, "bench", "compile_cache.sh")
    env = dict(os.environ, LSERVE_COMPILE_CACHE=str(cache))
    r = subprocess.run(["bash", script, "save", str(out)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    parts = sorted(out.glob("cc-*-*.tgz"))
    assert parts and "3 entries" in r.stdout
    env["LSERVE_COMPILE_CACHE"] = str(back)
    r = subprocess.run(["bash", script, "restore", str(out)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(back)) == sorted(os.listdir(cache))
    assert all((back / e).read_bytes() == (cache / e).read_bytes() for e in os.listdir(cache))
    r = subprocess.run(["bash", script, "bogus"], capture_output=True, text=True)
    assert r.returncode == 2 and "restore" in r.stdout


_HLO = '''
  %fusion.12 = bf16[4,6144]{1,0} fusion(%p), kind=kLoop, calls=%f, metadata={op_name="jit(decode_step)/layer3/convert_element_type" scheduling_name="fusion.12"}
  %input_reduce_fusion.160 = f32[4,8]{1,0} fusion(%a), kind=kInput, metadata={op_name="jit(decode_step)/layer1/jit(fused_append)/reduce_max" deduplicated_name="input_reduce_fusion.160" scheduling_name="input_reduce_fusion.161"}
  ROOT %loop_select_fusion.65 = s32[4] fusion(%b), kind=kLoop, metadata={op_name="jit(decode_step)/layer3/cond/branch_1_fun/jit(_where)/select_n"}
'''
_THUNKS = '''000: kCommandBuffer [source | sink]
    001: kCustomKernel [source | next=002 (1)] fusion_12 grid: [96, 1, 1] threads: [128, 1, 1]
    002: kCustomKernel [prev=001 (1) | next=003 (1)] input_reduce_fusion_161 grid: [4, 1, 1]
    003: kCopy         [prev=002 (1) | next=004 (1)] kCopy
    004: kCustomKernel [prev=003 (1) | next=005 (1)] lserve_fused_append__2 grid: [4, 1, 1]
    010: kConditional  [prev=004 (1) | next=011 (1)]
      false_branch:
        005: kCustomKernel [source | sink] loop_select_fusion_65 grid: [1, 1, 1]
'''


def test_hlo_kernels_attributes_launches_to_source_ops(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    import hlo_kernels

    rows = hlo_kernels.attribute(hlo_kernels.launches(_THUNKS), hlo_kernels.op_names(_HLO))
    assert rows == [("fusion_12", "jit(decode_step)/layer3/convert_element_type"),
                    ("input_reduce_fusion_161", "jit(decode_step)/layer1/jit(fused_append)/reduce_max"),
                    ("kCopy", "kCopy"), ("lserve_fused_append__2", "pallas:lserve_fused_append"),
                    ("loop_select_fusion_65", "jit(decode_step)/layer3/cond/branch_1_fun/jit(_where)/select_n")]
    assert hlo_kernels.fold(rows[4][1]) == "layer/cond/branch/jit(_where)/select_n"
    (tmp_path / "m.jit_decode_step.thunk_sequence_after_thunk_passes.txt").write_text(_THUNKS)
    (tmp_path / "m.jit_decode_step.sm_9.0a_gpu_after_optimizations.txt").write_text(_HLO)
    assert hlo_kernels.main([str(tmp_path), "--layer", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    # from layer 3's first named launch to its last: the copy and the Pallas kernel between included
    assert [line.split()[0] for line in out] == ["fusion_12", "input_reduce_fusion_161", "kCopy",
                                                 "lserve_fused_append__2", "loop_select_fusion_65"]
    assert hlo_kernels.main([str(tmp_path), "--layer", "7"]) == 0 and capsys.readouterr().out == ""
    assert hlo_kernels.main([str(tmp_path)]) == 0
    assert "5 launches (1 copies" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="xla_dump_to"):
        hlo_kernels.main([str(tmp_path / "none")])
    with pytest.raises(SystemExit, match="no 2 files"):
        hlo_kernels.main([str(tmp_path), "--index", "1"])
    sys.modules.pop("hlo_kernels", None)


def test_cpu_gemm_chains_agree_and_write_their_json(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    import cpu_gemm
    from common import SHAPES

    shape = SHAPES["smollm2-135m"]
    # the engine's products: fused q/k/v (9 + 2 x 3 heads of 64), o, fused gate/up, down
    assert cpu_gemm.layer_shapes(shape) == [(576, 960), (576, 576), (576, 3072), (1536, 576)]
    assert cpu_gemm.main(["--rows", "4,8", "--layers", "2", "--repeats", "2", "--out", str(tmp_path),
                          "--tag=-t"]) == 0
    (path,) = tmp_path.glob("cpu_gemm-*-t.json")
    res = json.loads(path.read_text())
    assert [p["rows"] for p in res["points"]] == [4, 8]
    for p in res["points"]:
        assert p["max_rel_err"] < 1e-3 and len(p["xla"]["runs_s"]) == len(p["torch"]["runs_s"]) == 2
        assert p["flops"] == 2 * p["rows"] * 2 * (576 * 960 + 576 * 576 + 576 * 3072 + 1536 * 576)
    # the two chains compute the same thing (the check the script makes before timing)
    import numpy as np
    import torch
    import jax.numpy as jnp

    w = cpu_gemm.make_weights(shape, 2)
    x = np.random.default_rng(3).standard_normal((5, 576), dtype=np.float32)
    a = np.asarray(cpu_gemm.jax_chain(shape)(jnp.asarray(x), [[jnp.asarray(m) for m in layer] for layer in w]))
    b = cpu_gemm.torch_chain(shape, torch)(torch.from_numpy(x), [[torch.from_numpy(m) for m in layer] for layer in w])
    np.testing.assert_allclose(a, b.numpy(), rtol=1e-4, atol=1e-4)
    assert np.all(np.isfinite(a)) and not np.allclose(a, x)
    for bad in (["--rows", "0"], ["--rows", "a"], ["--repeats", "2,3"], ["--layers", "-1"]):
        with pytest.raises(SystemExit) as e:
            cpu_gemm.main(bad)
        assert e.value.code == 2
    sys.modules.pop("cpu_gemm", None)
