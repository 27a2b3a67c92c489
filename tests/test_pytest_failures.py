"""bench/pytest_failures.py (used by bench/kernel_check.sh on the GPU) writes each failure's
reason the moment it happens, so a run stopped by its time limit still says what failed."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_failures_are_written_as_they_happen(tmp_path):
    (tmp_path / "test_sample.py").write_text(
        "def test_ok():\n    assert True\n\n"
        "def test_bad():\n    assert 1 + 1 == 3, 'arithmetic'\n")
    out = tmp_path / "failures.txt"
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "bench"), "FAILURES_FILE": str(out)}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "pytest_failures", "-p", "no:cacheprovider",
                        str(tmp_path / "test_sample.py")], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    text = out.read_text()
    assert "test_sample.py::test_bad (call)" in text and "arithmetic" in text
    assert "test_ok" not in text
