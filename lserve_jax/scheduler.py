"""Host-side scheduling for continuous batching: requests, decode slots and page ownership.

No jax here: the engine asks the scheduler what to run, runs it on the device, and reports the
tokens back. The rules (first come, first served; pages as sequences grow; preemption):

* A request waits until a decode slot is free and the pages for its prompt (plus whatever it
  has generated before a preemption) are free with one spare page, then it is admitted: the
  engine prefills it into its slot, in chunks of at most `chunk` tokens (`next_prefill` plans
  them: the oldest prompt's next chunk, or a batch of short prompts whole). With a prefix
  cache, the pages of the longest cached prefix are shared instead of allocated and its tokens
  are not prefilled again; a request whose prompt starts like one still being prefilled waits
  for it, so that it can reuse it.
* Streaming heads keep their prefill window in a small pool of their own (`stream`): a
  prefilling request holds the pages of its sink and of the window before its next chunk, and
  gives back the older ones as the prompt advances.
* Before each decode step every running request that will write into a page it does not have
  yet gets one. When the pool is empty the youngest running request is preempted: its slot and
  pages are freed and it goes back to the front of the queue, to be prefilled again later with
  its generated tokens (greedy and seeded results do not change: the recomputed cache holds the
  same tokens, and a sampled token's key depends only on the request's seed and position).
* A finished or aborted request frees its slot and pages at once. Device work already queued
  that touches them runs before anything dispatched later, so a page can be handed out again
  immediately.

Invariant after every call: the pages owned by requests, disjoint, plus the free pages make the
whole pool (`check`).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from typing import Iterable

from .pages import PageAllocator, PoolExhausted
from .prefix_cache import PrefixCache, page_digests
from .sampling import SamplingParams


class RequestTooLarge(ValueError):
    """A request that can never run: longer than the model, the cache or the page pool."""


@dataclasses.dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    order: int  # arrival order: the youngest running request is preempted first
    output_ids: list[int] = dataclasses.field(default_factory=list)
    status: str = "waiting"  # waiting | running | finished
    finish_reason: str | None = None  # eos | stop | length | abort
    slot: int | None = None
    pages: list[int] = dataclasses.field(default_factory=list)
    cached: int = 0  # tokens in its cache rows (prefilled or written by dispatched decode steps)
    dispatched: int = 0  # tokens sampled by dispatched work (read back or not)
    epoch: int = 0  # bumped at every admission: results of work dispatched before are stale
    preemptions: int = 0
    key_data: object = None  # the engine's: uint32 [2] sampling key of its seed
    swapped: object = None  # the engine's: its cache state in host memory while preempted (swap mode)
    last_slot: int | None = None  # slot and pages at its last preemption (what a swap saves)
    last_pages: list[int] = dataclasses.field(default_factory=list)
    resume_cached: int = 0  # `cached` when it was swapped out
    preempted_in_prefill: bool = False  # its last preemption came before its prefill was done
    prefill_len: int = 0  # len(tokens) at its admission: what its prefill covers
    prefilled: int = 0  # tokens of them in the cache (prefill is done when it reaches prefill_len)
    spages: dict = dataclasses.field(default_factory=dict)  # logical page -> streaming pool page held
    prefix_hit: int = 0  # prompt tokens reused from the prefix cache (over every admission)
    digests: list = dataclasses.field(default_factory=list)  # page digests of `tokens` at admission

    @property
    def tokens(self) -> list[int]:
        """What a (re-)prefill runs: the prompt and every token generated so far."""
        return self.prompt_ids + self.output_ids

    @property
    def wants_more(self) -> bool:
        """Whether dispatched work has not yet covered its token limit (and prefill is done)."""
        return self.status == "running" and self.prefill_done and self.dispatched < self.sampling.max_new_tokens

    @property
    def prefill_done(self) -> bool:
        return self.prefilled >= self.prefill_len


@dataclasses.dataclass
class Chunk:
    """One row of a prefill dispatch: tokens [start, start + count) of `request.tokens`."""

    request: Request
    start: int
    count: int

    @property
    def last(self) -> bool:
        return self.start + self.count >= self.request.prefill_len


def stream_window_pages(window: tuple[int, int], chunk_tokens: int, page_size: int, max_tokens: int) -> int:
    """Streaming-pool pages one chunked prefill holds: the sink and window pages and the chunk's
    own, no more than a whole sequence has (a window longer than max_tokens never fills)."""
    return min(window[0] + window[1] + -(-chunk_tokens // page_size), -(-max_tokens // page_size))


class Scheduler:
    """Decode slots and page ownership for continuous batching (see the module docstring)."""

    def __init__(self, num_slots: int, num_pages: int, page_size: int, max_tokens: int, *,
                 chunk: int | None = None, num_stream_pages: int = 1, window: tuple[int, int] | None = None,
                 prefix_cache: bool = False, batch_tokens: int = 8192, lookahead: int = 1):
        """chunk: most prompt tokens prefilled per dispatch (None: whole prompts). window: (sink
        pages, window pages) of the streaming heads' prefill window, None without streaming
        heads. num_stream_pages: their pool (page 0 scratch). batch_tokens: without chunks, the
        padded tokens of one dispatch of several whole prompts (a prompt longer goes alone), so
        sixteen 128K prompts never become one 2M-token prefill. lookahead: decode steps per
        dispatch: `grow` gives each row the pages of that many more tokens (those it still wants)."""
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        if chunk is not None and (chunk < page_size or chunk % page_size):
            raise ValueError(f"the prefill chunk must be a positive multiple of the page size {page_size}, got {chunk}")
        if lookahead < 1:
            raise ValueError(f"lookahead must be >= 1, got {lookahead}")
        self.lookahead = lookahead
        self.num_slots = num_slots
        self.page_size = page_size
        self.max_tokens = max_tokens  # per sequence: min(model context, cache capacity)
        self.chunk = chunk
        self.batch_tokens = chunk or int(batch_tokens)
        self.window = window
        self.allocator = PageAllocator(num_pages)
        self.stream = PageAllocator(max(num_stream_pages, 1))
        if window is not None and chunk is not None:
            need = stream_window_pages(window, chunk, page_size, max_tokens)
            if self.stream.num_pages - 1 < need:
                raise ValueError(f"the streaming pool has {self.stream.num_pages - 1} pages, a chunked prefill needs "
                                 f"{need} (sink, window and one chunk); raise num_stream_pages")
        self.cache = PrefixCache(page_size, self.allocator, self.stream, window) if prefix_cache else None
        self.waiting: collections.deque[Request] = collections.deque()
        self.slots: list[Request | None] = [None] * num_slots
        self.requests: dict[str, Request] = {}
        self._order = itertools.count()
        self.preempted_total = 0
        self.prefix_hit_total = 0  # prompt tokens reused from the prefix cache, over every admission

    # -- requests ---------------------------------------------------------------------------

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def add(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams) -> Request:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        total = len(prompt_ids) + sampling.max_new_tokens
        if total > self.max_tokens:
            raise RequestTooLarge(
                f"request {request_id!r}: {len(prompt_ids)} prompt tokens + max_new_tokens="
                f"{sampling.max_new_tokens} need {total} positions, the limit is {self.max_tokens}")
        usable = self.allocator.num_pages - 1
        if self.pages_for(total) > usable:
            raise RequestTooLarge(
                f"request {request_id!r} needs {self.pages_for(total)} pages of {self.page_size} tokens, "
                f"the pool has {usable} (raise num_pages)")
        req = Request(request_id, list(prompt_ids), sampling, next(self._order))
        self.requests[request_id] = req
        self.waiting.append(req)
        return req

    def running(self) -> list[Request]:
        return [r for r in self.slots if r is not None]

    def has_unfinished(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.slots)

    # -- admission and growth -----------------------------------------------------------------

    def admit(self) -> list[Request]:
        """Requests to prefill now, in arrival order, each given a slot and its prompt's pages
        (the cached prefix's shared, the rest its own)."""
        out = []
        while self.waiting and None in self.slots:
            req = self.waiting[0]
            spare = 1 if self.running() or out else 0  # so that admitting does not force a preemption
            if req.swapped is not None:
                need, chain = len(req.last_pages), []
            else:
                if self.cache is not None:
                    req.digests = page_digests(req.tokens, self.page_size)
                    if self._prefilling_same_prefix(req):
                        break  # its prefix is being prefilled: wait and reuse it
                chain = self.cache.match(req.digests, len(req.tokens)) if self.cache is not None else []
                need = self.pages_for(len(req.tokens)) - len(chain)
            shared = [b.page for b in chain]
            self.allocator.share(shared)  # held before any eviction below
            if need + spare > self.allocator.free_pages and self.cache is not None:
                self.cache.evict(pages=need + spare)
            if need + spare > self.allocator.free_pages:
                self.allocator.free(shared)
                if self.cache is not None and chain:
                    self.cache.hit_tokens -= len(chain) * self.page_size  # not admitted: asked again later
                    self.cache.queried_tokens -= len(req.tokens)
                break
            self.waiting.popleft()
            req.slot = self.slots.index(None)
            req.pages = shared + self.allocator.alloc(need)
            req.status, req.dispatched = "running", len(req.output_ids)
            req.prefill_len = len(req.tokens)
            if req.swapped is not None:
                req.cached = req.resume_cached
                req.prefilled = len(req.tokens)
            else:
                req.cached = len(req.tokens)
                req.prefilled = len(chain) * self.page_size
                req.prefix_hit += req.prefilled
                self.prefix_hit_total += req.prefilled
                req.spages = self.cache.stream_window(chain) if self.cache is not None else {}
                self.stream.share(req.spages.values())
            req.epoch += 1
            self.slots[req.slot] = req
            out.append(req)
        return out

    def _prefilling_same_prefix(self, req: Request) -> bool:
        if not req.digests:
            return False
        return any(not r.prefill_done and r.digests[:1] == req.digests[:1] for r in self.running())

    # -- chunked prefill ----------------------------------------------------------------------

    def next_prefill(self, max_rows: int | None = None) -> list[Chunk]:
        """The prefill rows of the next dispatch: the oldest unfinished prompt's next chunk when it
        is long or already started (one row, reading what the cache holds), else the prompts that
        fit one chunk whole, oldest first (at most `max_rows`, their padded tokens within a chunk's
        budget, or `batch_tokens` without chunks). Streaming pages are mapped for each row that needs them. [] if none waits."""
        todo = sorted((r for r in self.running() if not r.prefill_done), key=lambda r: r.order)
        if not todo:
            return []
        limit = self.chunk or max(r.prefill_len for r in todo)
        first = todo[0]
        if first.prefilled or first.prefill_len > limit:
            rows = [Chunk(first, first.prefilled, min(limit, first.prefill_len - first.prefilled))]
        else:
            rows = []
            for r in todo:
                if r.prefilled or r.prefill_len > limit:
                    continue
                n = len(rows) + 1
                # the engine pads every row to this (a power of two, at least one page)
                bucket = max(self.page_size, _pow2_at_least(max([r.prefill_len] + [c.count for c in rows])))
                over_budget = _pow2_at_least(n) * bucket > max(self.batch_tokens, bucket)
                if rows and ((max_rows and n > max_rows) or over_budget):
                    break
                rows.append(Chunk(r, 0, r.prefill_len))
        for c in rows:
            self._map_stream(c)
        return rows

    def _map_stream(self, c: Chunk) -> None:
        """Gives the row the streaming pages its chunk writes and reads; frees what it no longer reads.
        Whole short prompts get pages only for the prefix cache (when free ones are left)."""
        req = c.request
        if self.window is None:
            return
        page = self.page_size
        ns, nw = self.window
        end = -(-(c.start + c.count) // page)
        whole = c.start == 0 and c.last
        if whole and self.cache is None:
            return
        w0 = max(ns, c.start // page - nw)
        need = set(range(min(ns, end))) | set(range(w0, end))
        old = [i for i in req.spages if i not in need]
        self.stream.free([req.spages.pop(i) for i in old])
        missing = sorted(i for i in need if i not in req.spages)
        if self.stream.free_pages < len(missing) and self.cache is not None:
            self.cache.drop_stream_pages(len(missing))
        if whole and self.stream.free_pages < len(missing):
            return  # caching its streaming pages is optional
        for i, p in zip(missing, self.stream.alloc(len(missing))):
            req.spages[i] = p

    def chunk_dispatched(self, c: Chunk) -> None:
        """Records a dispatched chunk; at the prompt's end caches its pages and frees its window."""
        req = c.request
        req.prefilled = c.start + c.count
        if not c.last:
            return
        if self.cache is not None and req.digests:
            self.cache.insert(req.digests, req.pages, req.spages)
        self.stream.free(list(req.spages.values()))
        req.spages = {}

    def _room(self, req: Request) -> int:
        """Tokens the next decode dispatch writes for a request that wants more."""
        return req.cached + min(self.lookahead, req.sampling.max_new_tokens - req.dispatched)

    def grow(self) -> list[Request]:
        """Gives every running request that needs them the pages its next decode dispatch's tokens
        (`lookahead`, at most those it still wants) go into, preempting the youngest requests when
        the pool is empty. Returns the preempted."""
        preempted = []
        for req in sorted(self.running(), key=lambda r: r.order):
            if req.status != "running" or not req.wants_more:
                continue
            while len(req.pages) * self.page_size < self._room(req):
                if not self.allocator.free_pages and self.cache is not None:
                    self.cache.evict(pages=1)
                try:
                    req.pages += self.allocator.alloc(1)
                except PoolExhausted:
                    victim = max(self.running(), key=lambda r: r.order)
                    self.preempt(victim)
                    preempted.append(victim)
                    if victim is req:
                        break
        return preempted

    def pages_short(self) -> int:
        """Pages `grow` would need beyond the free ones (> 0: it would preempt)."""
        need = sum(-(-self._room(r) // self.page_size) - len(r.pages) for r in self.running()
                   if r.wants_more and len(r.pages) * self.page_size < self._room(r))
        if need > self.allocator.free_pages and self.cache is not None:
            self.cache.evict(pages=need)
        return need - self.allocator.free_pages

    def preempt(self, req: Request) -> None:
        """Frees a running request's slot and pages and queues it first among younger waiting ones.
        One caught in the middle of its prefill (`preempted_in_prefill`) has decoded nothing: it
        is prefilled again from its start (a swap would save a half-written cache)."""
        req.last_slot, req.last_pages, req.resume_cached = req.slot, list(req.pages), req.cached
        req.preempted_in_prefill = not req.prefill_done
        self._release(req)
        req.status = "waiting"
        req.preemptions += 1
        self.preempted_total += 1
        # back to the front, ahead of younger waiting requests
        pos = next((i for i, w in enumerate(self.waiting) if w.order > req.order), len(self.waiting))
        self.waiting.insert(pos, req)

    def finish(self, req: Request, reason: str) -> None:
        if req.status == "finished":
            return
        if req.status == "waiting":
            self.waiting.remove(req)
        else:
            self._release(req)
        req.status, req.finish_reason = "finished", reason
        del self.requests[req.request_id]

    def _release(self, req: Request) -> None:
        self.allocator.free(req.pages)
        self.stream.free(list(req.spages.values()))
        self.slots[req.slot] = None
        req.pages, req.slot, req.cached, req.spages, req.prefilled = [], None, 0, {}, 0

    # -- checks -----------------------------------------------------------------------------

    def reclaimable_pages(self) -> int:
        """Pages free or held by the prefix cache alone (all of the pool once every request is done)."""
        cached = 0 if self.cache is None else sum(1 for p in self.cache.owned()[0] if self.allocator.refcount(p) == 1)
        return self.allocator.free_pages + cached

    def owned_pages(self) -> Iterable[int]:
        for r in self.running():
            yield from r.pages

    def check(self) -> None:
        """Raises AssertionError unless every page is free or owned by exactly the requests and the
        prefix cache that hold it, in both pools (tests call it after every step)."""
        cached, scached = self.cache.owned() if self.cache is not None else (set(), set())
        for pool, lists, cache_held, name in (
                (self.allocator, [r.pages for r in self.running()], cached, "page"),
                (self.stream, [list(r.spages.values()) for r in self.running()], scached, "streaming page")):
            holders = collections.Counter(p for lst in lists for p in lst)
            for lst in lists:
                assert len(lst) == len(set(lst)), f"a request holds a {name} twice"
            holders.update(cache_held)
            assert 0 not in holders, f"the scratch {name} is owned"
            for p, n in holders.items():
                assert pool.refcount(p) == n, f"{name} {p}: {n} holders, refcount {pool.refcount(p)}"
            assert set(holders) == pool._owned, f"scheduler and allocator disagree on {name}s"
            assert len(holders) + pool.free_pages == pool.num_pages - 1, \
                f"{len(holders)} owned + {pool.free_pages} free {name}s != {pool.num_pages - 1}"


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()
