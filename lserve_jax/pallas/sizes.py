"""Power-of-2 helpers for the Triton shape rules (loaded blocks need power-of-2 sizes)."""

from __future__ import annotations

__all__ = ["is_pow2", "next_pow2"]


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def next_pow2(n: int) -> int:
    """The smallest power of 2 >= n (1 for n <= 1)."""
    return 1 << max(0, (n - 1).bit_length())
