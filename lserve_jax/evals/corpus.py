"""The long public-domain text shipped with the package, split into two disjoint halves.

* `eval_ids`: the first half, for perplexity (`evals.perplexity`, `bench/accuracy.py`).
* `haystack_ids`: the second half, natural text to hide calibration pass keys in and to refine
  a pattern's boundary on (`lserve_jax.calibrate`), so that a pattern is never calibrated on
  the text it is scored on.

The split is at the first line break at or after the middle character, so both halves are
whole lines and the split does not depend on the tokenizer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

TEXT_PATH = Path(__file__).parent.parent / "data" / "eb1911_shakespeare.txt"  # package data


def read_text(path: str | os.PathLike = TEXT_PATH) -> str:
    """The text without its leading '#' header lines (which state the source and licence)."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    return "\n".join(lines).strip()


def split_text(text: str) -> tuple[str, str]:
    """(first half, second half), cut at the first newline at or after the middle."""
    cut = text.find("\n", len(text) // 2)
    if cut < 0:
        raise ValueError("the text has no line break after its middle: cannot split it")
    return text[:cut].strip(), text[cut + 1:].strip()


def eval_ids(encode: Callable[[str], list[int]], path: str | os.PathLike = TEXT_PATH) -> list[int]:
    """Token ids of the evaluation half."""
    return encode(split_text(read_text(path))[0])


def haystack_ids(encode: Callable[[str], list[int]], path: str | os.PathLike = TEXT_PATH) -> list[int]:
    """Token ids of the calibration half."""
    return encode(split_text(read_text(path))[1])
