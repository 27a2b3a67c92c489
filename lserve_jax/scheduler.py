"""Host-side scheduling for continuous batching: requests, decode slots and page ownership.

No jax here: the engine asks the scheduler what to run, runs it on the device, and reports the
tokens back. The rules (first come, first served; pages as sequences grow; preemption):

* A request waits until a decode slot is free and the pages for its prompt (plus whatever it
  has generated before a preemption) are free with one spare page, then it is admitted: the
  engine prefills it into its slot.
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

    @property
    def tokens(self) -> list[int]:
        """What a (re-)prefill runs: the prompt and every token generated so far."""
        return self.prompt_ids + self.output_ids

    @property
    def wants_more(self) -> bool:
        """Whether dispatched work has not yet covered its token limit."""
        return self.status == "running" and self.dispatched < self.sampling.max_new_tokens


class Scheduler:
    """Decode slots and page ownership for continuous batching (see the module docstring)."""

    def __init__(self, num_slots: int, num_pages: int, page_size: int, max_tokens: int):
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.num_slots = num_slots
        self.page_size = page_size
        self.max_tokens = max_tokens  # per sequence: min(model context, cache capacity)
        self.allocator = PageAllocator(num_pages)
        self.waiting: collections.deque[Request] = collections.deque()
        self.slots: list[Request | None] = [None] * num_slots
        self.requests: dict[str, Request] = {}
        self._order = itertools.count()
        self.preempted_total = 0

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
        """Requests to prefill now, in arrival order, each given a slot and its prompt's pages."""
        out = []
        while self.waiting and None in self.slots:
            req = self.waiting[0]
            need = len(req.last_pages) if req.swapped is not None else self.pages_for(len(req.tokens))
            # one spare page, so that admitting does not force a preemption at the next step
            if need + (1 if self.running() or out else 0) > self.allocator.free_pages:
                break
            self.waiting.popleft()
            req.slot = self.slots.index(None)
            req.pages = self.allocator.alloc(need)
            req.status, req.dispatched = "running", len(req.output_ids)
            req.cached = req.resume_cached if req.swapped is not None else len(req.tokens)
            req.epoch += 1
            self.slots[req.slot] = req
            out.append(req)
        return out

    def grow(self) -> list[Request]:
        """Gives every running request that needs one the page its next decode token goes into,
        preempting the youngest requests when the pool is empty. Returns the preempted."""
        preempted = []
        for req in sorted(self.running(), key=lambda r: r.order):
            if req.status != "running" or not req.wants_more:
                continue
            while len(req.pages) * self.page_size <= req.cached:
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
        need = sum(1 for r in self.running() if r.wants_more and len(r.pages) * self.page_size <= r.cached)
        return need - self.allocator.free_pages

    def preempt(self, req: Request) -> None:
        req.last_slot, req.last_pages, req.resume_cached = req.slot, list(req.pages), req.cached
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
        self.slots[req.slot] = None
        req.pages, req.slot, req.cached = [], None, 0

    # -- checks -----------------------------------------------------------------------------

    def owned_pages(self) -> Iterable[int]:
        for r in self.running():
            yield from r.pages

    def check(self) -> None:
        """Raises AssertionError unless every page is owned once or free (tests call it)."""
        owned = list(self.owned_pages())
        assert len(owned) == len(set(owned)), "a page is owned twice"
        assert 0 not in owned, "the scratch page is owned"
        assert len(owned) + self.allocator.free_pages == self.allocator.num_pages - 1, \
            f"{len(owned)} owned + {self.allocator.free_pages} free != {self.allocator.num_pages - 1}"
        assert set(owned) == self.allocator._owned, "scheduler and allocator disagree"
