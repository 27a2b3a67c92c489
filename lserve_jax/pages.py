"""The host-side page allocator: which physical KV-cache pages each sequence owns.

Page 0 is the scratch page (unmapped page-table entries point at it) and is never handed out;
pages 1..num_pages-1 are each either free or owned. An owned page has a reference count: `alloc`
gives it one owner, `share` adds one (the prefix cache and the requests that reuse a cached page
hold it together), `free` drops one and the page is free again when none is left. Every call
checks its whole argument before it changes anything, so a call that raises leaves the
allocator as it was.
"""

from __future__ import annotations

import operator
from typing import Iterable


class PoolExhausted(RuntimeError):
    """The page pool cannot hold the requested sequences."""


class PageAllocator:
    """Free list over physical pages 1..num_pages-1, with the set of pages handed out (so that
    a double free, the scratch page or a page outside the pool is caught in O(1) per page)."""

    def __init__(self, num_pages: int):
        num_pages = _page_number(num_pages, "num_pages")
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1 (page 0 is scratch), got {num_pages}")
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, 0, -1))  # a stack: pop() hands out the lowest page first
        self._owned: set[int] = set()
        self._refs: dict[int, int] = {}  # owned page -> owners beyond the first (shared pages only)

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def owned_pages(self) -> int:
        return len(self._owned)

    def alloc(self, n: int) -> list[int]:
        """Hands out `n` distinct free pages (n = 0 gives []); raises PoolExhausted if fewer are free."""
        n = _page_number(n, "the number of pages to allocate")
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of pages: {n}")
        if n > len(self._free):
            raise PoolExhausted(f"page pool exhausted: {n} pages requested, {len(self._free)} of "
                                f"{self.num_pages - 1} free (raise --num-pages or lower the batch/length)")
        out = [self._free.pop() for _ in range(n)]
        self._owned.update(out)
        return out

    def refcount(self, page: int) -> int:
        """Owners of `page` (0: free)."""
        return 1 + self._refs.get(page, 0) if page in self._owned else 0

    def share(self, pages: Iterable[int]) -> None:
        """One more owner for each of `pages` (each must be owned; a page may be listed more than once)."""
        pages = [_page_number(p, "a page") for p in pages]
        bad = [p for p in pages if p not in self._owned]
        if bad:
            raise ValueError(f"cannot share page {bad[0]}: it is not allocated; nothing was shared")
        for p in pages:
            self._refs[p] = self._refs.get(p, 0) + 1

    def free(self, pages: Iterable[int]) -> None:
        """Drops one owner of each page (handed out by `alloc`, or `share`d); a page with no owner
        left is free again. A page that is not currently owned (freed twice, listed twice, the
        scratch page, outside the pool) raises ValueError naming it, and no page of the call is
        freed."""
        pages = [_page_number(p, "a page") for p in pages]
        seen: set[int] = set()
        for p in pages:
            if p in self._owned and p not in seen:
                seen.add(p)
                continue
            if p in seen:
                why = "is listed twice in one free() call"
            elif p == 0:
                why = "is the scratch page, never allocated"
            elif not 0 < p < self.num_pages:
                why = f"is outside the pool (pages 1..{self.num_pages - 1})"
            else:
                why = "is not allocated (freed twice?)"
            raise ValueError(f"cannot free page {p}: it {why}; nothing was freed")
        released = []
        for p in pages:
            extra = self._refs.get(p, 0)
            if extra:
                self._refs[p] = extra - 1
                if extra == 1:
                    del self._refs[p]
            else:
                released.append(p)
        self._owned.difference_update(released)
        self._free.extend(reversed(released))


def _page_number(x, what: str) -> int:
    if isinstance(x, bool):
        raise TypeError(f"{what} must be an integer, got {x!r}")
    try:
        return operator.index(x)  # Python and NumPy integers; not floats
    except TypeError:
        raise TypeError(f"{what} must be an integer, got {x!r}") from None
