"""Small device-call tools: bench/launch_overhead.py runs its chains (interpret mode on CPU) and
writes its JSON; bench/compile_cache.sh packs a cache folder into parts and restores it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
