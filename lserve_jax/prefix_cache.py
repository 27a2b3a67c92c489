"""The prefix cache: pages of prompts prefilled before, reused by later prompts that start the same.

Host-side bookkeeping only (no jax). A *block* is one full page of prompt tokens, named by a
digest of every token from the start of the prompt through that page (a hash chain: the same
page of tokens after a different prefix is a different block). A block holds the retrieval
heads' physical page (keys, values and key statistics) and, where the prompt's prefill left one,
its page of the streaming heads' pool.

A later prompt reuses its longest run of cached blocks from the start such that its prefill can
continue after it: the retrieval pages of the whole run, and (with streaming heads) the streaming
pages of the sink and of the window before the run's end (`window` pages, `cache.window_geometry`).
The reusing request shares those pages read-only (`PageAllocator.share`): decode never writes
into a full prompt page, and chunked prefill continues on pages of its own.

Blocks no request holds are evicted least recently used first (the deepest of a prompt first, so
a chain is cut from its end) when the engine needs pages.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools

import numpy as np

from .pages import PageAllocator


@dataclasses.dataclass(eq=False)
class Block:
    digest: bytes
    depth: int  # its page index in the prompt
    page: int  # retrieval pool page
    spage: int | None  # streaming pool page, if cached
    last_used: int = 0


def page_digests(tokens: list[int], page_size: int, salt: bytes = b"") -> list[bytes]:
    """Digest of every full page of `tokens`, each covering the whole prefix through it."""
    out, h = [], hashlib.blake2b(salt, digest_size=16).digest()
    arr = np.asarray(tokens, dtype=np.int64)
    for i in range(len(tokens) // page_size):
        h = hashlib.blake2b(h + arr[i * page_size:(i + 1) * page_size].tobytes(), digest_size=16).digest()
        out.append(h)
    return out


class PrefixCache:
    def __init__(self, page_size: int, pages: PageAllocator, stream_pages: PageAllocator | None,
                 window: tuple[int, int] | None):
        """window: (sink pages, window pages) a continuation's streaming heads need, or None when
        the model has no streaming heads (then retrieval pages are the whole state)."""
        self.page_size = page_size
        self.pages = pages
        self.stream_pages = stream_pages
        self.window = window
        self.blocks: dict[bytes, Block] = {}
        self._clock = itertools.count(1)
        self.hit_tokens = 0  # prompt tokens reused, over every match
        self.queried_tokens = 0  # prompt tokens looked up

    def __len__(self) -> int:
        return len(self.blocks)

    # -- lookup -----------------------------------------------------------------------------

    def _resumable(self, chain: list[Block], p: int) -> bool:
        """Whether a prefill can continue after the first p blocks of `chain`."""
        if self.window is None:
            return True
        ns, nw = self.window
        need = set(range(min(ns, p))) | set(range(max(0, p - nw), p))
        return all(chain[i].spage is not None for i in need)

    def match(self, digests: list[bytes], prompt_len: int) -> list[Block]:
        """The longest usable cached run for a prompt of `prompt_len` tokens with these page
        digests (at least one token is left to prefill, for the logits). Marks it used."""
        chain = []
        for d in digests[: (prompt_len - 1) // self.page_size]:
            b = self.blocks.get(d)
            if b is None:
                break
            chain.append(b)
        p = len(chain)
        while p and not self._resumable(chain, p):
            p -= 1
        self.queried_tokens += prompt_len
        self.hit_tokens += p * self.page_size
        now = next(self._clock)
        for b in chain[:p]:
            b.last_used = now
        return chain[:p]

    def stream_window(self, chain: list[Block]) -> dict[int, int]:
        """The streaming pages (logical page -> pool page) a continuation after `chain` reads."""
        if self.window is None or not chain:
            return {}
        ns, nw = self.window
        p = len(chain)
        return {i: chain[i].spage for i in sorted(set(range(min(ns, p))) | set(range(max(0, p - nw), p)))}

    # -- insertion and eviction ---------------------------------------------------------------

    def insert(self, digests: list[bytes], pages: list[int], spages: dict[int, int]) -> None:
        """Caches the full prompt pages of a request whose prefill just finished: block i is
        `pages[i]` (and `spages[i]` where the request holds that streaming page). The cache takes
        its own reference on every page it keeps."""
        now = next(self._clock)
        for i, d in enumerate(digests):
            b = self.blocks.get(d)
            if b is None:
                self.pages.share([pages[i]])
                b = self.blocks[d] = Block(d, i, pages[i], None)
            if b.spage is None and i in spages and self.stream_pages is not None:
                self.stream_pages.share([spages[i]])
                b.spage = spages[i]
            b.last_used = now

    def _evictable(self) -> list[Block]:
        """Blocks only the cache holds, least recently used (then deepest) first."""
        free = [b for b in self.blocks.values() if self.pages.refcount(b.page) == 1
                and (b.spage is None or self.stream_pages.refcount(b.spage) == 1)]
        return sorted(free, key=lambda b: (b.last_used, -b.depth))

    def evict(self, pages: int = 0, stream_pages: int = 0) -> None:
        """Drops unused blocks until `pages` retrieval pages and `stream_pages` streaming pages are
        free (or nothing more can go)."""
        def short():
            return (self.pages.free_pages < pages
                    or (self.stream_pages is not None and self.stream_pages.free_pages < stream_pages))

        if not short():
            return
        for b in self._evictable():
            self._drop(b)
            if not short():
                return

    def drop_stream_pages(self, n: int) -> None:
        """Frees up to n streaming pages of unused blocks (their retrieval pages stay cached; a
        block without its streaming page can still be part of a longer match's middle)."""
        for b in sorted((b for b in self.blocks.values() if b.spage is not None
                         and self.stream_pages.refcount(b.spage) == 1), key=lambda b: (b.last_used, -b.depth)):
            if self.stream_pages.free_pages >= n:
                return
            self.stream_pages.free([b.spage])
            b.spage = None

    def _drop(self, b: Block) -> None:
        del self.blocks[b.digest]
        self.pages.free([b.page])
        if b.spage is not None:
            self.stream_pages.free([b.spage])

    def clear(self) -> None:
        for b in list(self.blocks.values()):
            self._drop(b)

    def owned(self) -> tuple[set[int], set[int]]:
        """(retrieval pages, streaming pages) the cache holds a reference on."""
        return {b.page for b in self.blocks.values()}, {b.spage for b in self.blocks.values() if b.spage is not None}
