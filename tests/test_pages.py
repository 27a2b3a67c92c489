"""The page allocator (lserve_jax/pages.py): pages handed out are distinct and never the scratch
page, and every misuse (double free, a page it never handed out, a negative count) raises a
ValueError naming the page and leaves the allocator exactly as it was."""

from __future__ import annotations

import numpy as np
import pytest

from lserve_jax.pages import PageAllocator, PoolExhausted


def state(a: PageAllocator) -> tuple:
    return a.free_pages, a.owned_pages, list(a._free), set(a._owned)


def test_allocator_never_hands_out_the_scratch_page():
    a = PageAllocator(5)
    assert a.free_pages == 4
    pages = a.alloc(4)
    assert sorted(pages) == [1, 2, 3, 4] and a.free_pages == 0


def test_allocator_exhaustion_changes_nothing():
    a = PageAllocator(4)
    held = a.alloc(2)
    with pytest.raises(PoolExhausted, match="2 pages requested, 1 of 3 free"):
        a.alloc(2)
    assert a.free_pages == 1  # the failed request took nothing
    a.free(held)
    assert a.free_pages == 3
    assert sorted(a.alloc(3)) == [1, 2, 3]  # freed pages are reusable, no duplicates


def test_allocator_pages_are_distinct_across_requests():
    a = PageAllocator(9)
    got = a.alloc(3) + a.alloc(2) + a.alloc(3)
    assert len(set(got)) == 8 and 0 not in got


def test_engine_module_still_exports_the_allocator():
    from lserve_jax import engine

    assert engine.PageAllocator is PageAllocator and engine.PoolExhausted is PoolExhausted


def test_alloc_zero_is_empty_and_changes_nothing():
    a = PageAllocator(4)
    before = state(a)
    assert a.alloc(0) == [] and state(a) == before


@pytest.mark.parametrize("n", [-1, -5])
def test_alloc_negative_raises(n):
    a = PageAllocator(4)
    before = state(a)
    with pytest.raises(ValueError, match=f"negative number of pages: {n}"):
        a.alloc(n)
    assert state(a) == before


@pytest.mark.parametrize("n", [1.0, "2", None, True])
def test_alloc_non_integer_raises(n):
    with pytest.raises(TypeError, match="must be an integer"):
        PageAllocator(4).alloc(n)


def test_double_free_raises_and_the_page_is_not_handed_out_twice():
    a = PageAllocator(5)
    pages = a.alloc(2)
    a.free(pages)
    before = state(a)
    with pytest.raises(ValueError, match=f"cannot free page {pages[0]}: it is not allocated"):
        a.free(pages)
    assert state(a) == before
    got = a.alloc(4)
    assert sorted(got) == [1, 2, 3, 4]  # each page once


@pytest.mark.parametrize("bad, why", [
    (0, "is the scratch page"),
    (99, r"is outside the pool \(pages 1..4\)"),
    (-1, r"is outside the pool \(pages 1..4\)"),
    (5, r"is outside the pool \(pages 1..4\)"),
    (3, "is not allocated"),  # in the pool, but free
])
def test_freeing_a_page_never_handed_out_raises(bad, why):
    a = PageAllocator(5)
    held = a.alloc(2)  # pages 1, 2
    before = state(a)
    with pytest.raises(ValueError, match=rf"cannot free page {bad}: it {why}"):
        a.free([bad])
    assert state(a) == before and a.free_pages <= a.num_pages - 1
    with pytest.raises(ValueError, match=rf"page {bad}"):  # a bad page among good ones frees none of them
        a.free([*held, bad])
    assert state(a) == before


def test_a_page_listed_twice_in_one_call_frees_nothing():
    a = PageAllocator(5)
    p = a.alloc(2)
    before = state(a)
    with pytest.raises(ValueError, match=f"page {p[0]}: it is listed twice"):
        a.free([p[0], p[1], p[0]])
    assert state(a) == before


def test_free_accepts_numpy_integers_and_any_iterable():
    a = PageAllocator(6)
    pages = a.alloc(3)
    a.free(np.asarray(pages[:2], np.int32))
    a.free(iter(pages[2:]))
    assert a.free_pages == 5 and a.owned_pages == 0


def test_owned_and_free_always_partition_the_pool():
    rng = np.random.default_rng(0)
    a = PageAllocator(17)
    held: list[list[int]] = []
    for _ in range(200):
        if held and (rng.random() < 0.5 or a.free_pages == 0):
            a.free(held.pop(int(rng.integers(len(held)))))
        else:
            held.append(a.alloc(int(rng.integers(0, a.free_pages + 1))))
        owned = [p for h in held for p in h]
        assert len(owned) == len(set(owned)) == a.owned_pages
        assert sorted(owned + a._free) == list(range(1, 17))


@pytest.mark.parametrize("n", [0, -3])
def test_pool_needs_a_page(n):
    with pytest.raises(ValueError, match="num_pages must be >= 1"):
        PageAllocator(n)
