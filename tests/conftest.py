"""Fixtures shared by the CPU suite (definitions in tests/tiny.py, kernel cases in
tests/kernel_base.py)."""

from __future__ import annotations

import pytest

from .tiny import TINY, tiny_params, word_tokenizer_json


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
