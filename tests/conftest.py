"""Fixtures shared by the CPU suite (definitions in tests/tiny.py, kernel cases in
tests/kernel_base.py)."""

from __future__ import annotations

import atexit
import gc
import os
import shutil
import tempfile

import jax
import pytest

# Each test process (every xdist worker, and the CLI subprocesses it starts: jax reads
# JAX_COMPILATION_CACHE_DIR) keeps compiled programs in a cache folder of its own, never the
# user's: no two processes write one folder at once, and no entry written by another run (another
# jax, a crashed writer) is read. `lserve_jax.load` leaves an already chosen folder as it is.
_JIT_CACHE = tempfile.mkdtemp(prefix="lserve-jax-test-jit-")
os.environ["JAX_COMPILATION_CACHE_DIR"] = _JIT_CACHE
jax.config.update("jax_compilation_cache_dir", _JIT_CACHE)
atexit.register(shutil.rmtree, _JIT_CACHE, True)

from .tiny import TINY, tiny_params, word_tokenizer_json


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Frees every compiled program after each test file. Each CPU executable holds a few memory
    mappings and jax keeps them all alive: one xdist worker reached 58,000 mappings at 80% of the
    suite, and past Linux's limit (vm.max_map_count, 65530) LLVM fails with "Cannot allocate
    memory" and the worker dies inside a compile or a cache write (the CI crash). With this, a
    worker holds about 1,300 mappings between files and at most ~23,000 inside one."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def tiny_cfg():
    return TINY


@pytest.fixture(scope="session")
def params():
    """Random params of the tiny config (tests that need another config define their own)."""
    return tiny_params(TINY)


@pytest.fixture(scope="session")
def word_tokenizer(tmp_path_factory):
    from lserve_jax.tokenizer import Tokenizer

    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    word_tokenizer_json(path)
    return Tokenizer(path)
