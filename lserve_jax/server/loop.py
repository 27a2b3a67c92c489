"""The engine loop thread of the HTTP server: HTTP handlers (asyncio) submit requests, one thread
owns the `Engine` and steps it, and each request's events go back to its handler's asyncio queue.

    loop = EngineLoop(engine, max_queue=256); loop.start()
    sub = Submission("cmpl-1", prompt_ids, SamplingParams(...), asyncio.get_running_loop())
    loop.submit(sub)                      # QueueFull when max_queue requests wait already
    ev = await sub.events.get()           # "admitted", or "error" (too long: 400)
    while (ev := await sub.events.get()).kind == "tokens": ...   # then "finished"
    loop.abort("cmpl-1")                  # the client went away: slot and pages freed at once

The Engine is not thread-safe, so only the loop thread touches it; handlers talk to it through
an inbox and an abort list under one condition variable, which also wakes the idle loop.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time
import traceback

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..engine import Engine, PromptTooLong
from ..pages import PoolExhausted
from ..sampling import SamplingParams
from ..scheduler import RequestTooLarge

log = logging.getLogger("lserve_jax.serve")


class QueueFull(RuntimeError):
    """More than max_queue requests wait for a slot; the handler answers 429."""


@dataclasses.dataclass
class Event:
    kind: str  # "admitted" (queued in the engine) | "tokens" | "finished" | "error"
    token_ids: list[int] = dataclasses.field(default_factory=list)  # new tokens ("tokens", "finished")
    finish_reason: str | None = None  # engine's: eos | stop | length | abort
    error: str | None = None  # "error": the message
    status: int = 400  # "error": the HTTP status it maps to
    cached_tokens: int = 0  # "tokens", "finished": prompt tokens the prefix cache supplied


@dataclasses.dataclass(eq=False)
class Submission:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    loop: asyncio.AbstractEventLoop  # the handler's event loop: events are posted into it
    events: asyncio.Queue = None
    arrival: float = dataclasses.field(default_factory=time.perf_counter)
    first_token: float | None = None
    generated: int = 0

    def __post_init__(self):
        if self.events is None:
            self.events = asyncio.Queue()

    def post(self, event: Event) -> None:
        """Thread-safe: hands the event to the handler's queue (dropped if its loop has closed)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:
            pass


class Metrics:
    """Prometheus metrics in a registry of their own (not the process-global one)."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.running = Gauge("lserve_requests_running", "requests holding a decode slot", registry=r)
        self.waiting = Gauge("lserve_requests_waiting", "requests queued for a decode slot", registry=r)
        self.pages_used = Gauge("lserve_kv_pages_used", "KV-cache pages owned by requests", registry=r)
        self.pages_cached = Gauge("lserve_prefix_cache_pages", "KV-cache pages held only by the prefix cache",
                                  registry=r)
        self.prefix_hits = Counter("lserve_prefix_cache_hit_tokens", "prompt tokens reused from the prefix cache",
                                   registry=r)
        self.pages_total = Gauge("lserve_kv_pages_total", "KV-cache pages in the pool (scratch page excluded)",
                                 registry=r)
        self.ttft = Histogram("lserve_time_to_first_token_seconds", "arrival to first token", registry=r,
                              buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120))
        self.tpot = Histogram("lserve_time_per_output_token_seconds", "mean time between a request's tokens",
                              registry=r, buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
        self.generated = Counter("lserve_generation_tokens", "tokens generated", registry=r)
        self.prompt = Counter("lserve_prompt_tokens", "prompt tokens of admitted requests", registry=r)
        self.finished = Counter("lserve_requests_finished", "finished requests by finish reason", ["reason"],
                                registry=r)
        self.rejected = Counter("lserve_requests_rejected", "requests refused (queue full or too large)",
                                ["why"], registry=r)


class EngineLoop:
    """Owns `engine` on one thread: admits submissions, steps while work exists, waits when idle."""

    def __init__(self, engine: Engine, *, max_queue: int = 256, metrics: Metrics | None = None):
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.engine = engine
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        self._cond = threading.Condition()
        self._inbox: collections.deque[Submission] = collections.deque()
        self._aborts: list[str] = []
        self._live: dict[str, Submission] = {}  # admitted to the engine, not finished (loop thread only)
        self._accepting = True
        self._stop = False
        self._thread: threading.Thread | None = None
        self.metrics.pages_total.set(engine.scheduler.allocator.num_pages - 1)

    # -- called from handlers (any thread) ----------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lserve-engine-loop", daemon=True)
        self._thread.start()

    def submit(self, sub: Submission) -> None:
        with self._cond:
            if not self._accepting:
                raise QueueFull("the server is shutting down")
            if len(self._inbox) + len(self.engine.scheduler.waiting) >= self.max_queue:
                self.metrics.rejected.labels("queue_full").inc()
                raise QueueFull(f"{self.max_queue} requests are queued already (--max-queue); retry later")
            self._inbox.append(sub)
            self._cond.notify()

    def abort(self, request_id: str) -> None:
        with self._cond:
            self._aborts.append(request_id)
            self._cond.notify()

    def shutdown(self) -> None:
        """Stops admitting and aborts everything in flight (their streams end with "abort");
        the thread keeps running until `stop`. Safe to call from a signal handler."""
        with self._cond:
            self._accepting = False
            self._cond.notify()

    def stop(self, timeout: float = 10.0) -> None:
        self.shutdown()
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def accepting(self) -> bool:
        return self._accepting

    # -- the loop thread ----------------------------------------------------------------------

    def _run(self) -> None:
        eng = self.engine
        while True:
            with self._cond:
                while (not self._stop and not self._inbox and not self._aborts and not eng.has_unfinished()
                       and (self._accepting or not self._live)):
                    self._cond.wait()
                if self._stop and not self._live and not self._inbox:
                    break
                inbox, self._inbox = list(self._inbox), collections.deque()
                aborts, self._aborts = self._aborts, []
                accepting = self._accepting
            if not accepting:  # shutting down: refuse what is queued, abort what runs
                for sub in inbox:
                    sub.post(Event("error", error="the server is shutting down", status=503))
                inbox = []
                aborts += list(self._live)
            for rid in aborts:
                self._abort(rid)
            for sub in inbox:
                self._admit(sub)
            if eng.has_unfinished():
                try:
                    outs = eng.step()
                except Exception as e:  # noqa: BLE001  the engine failed: fail its requests, keep serving
                    log.error("engine step failed:\n%s", traceback.format_exc())
                    for rid, sub in list(self._live.items()):
                        eng.abort(rid)
                        sub.post(Event("error", error=f"engine error: {e}", status=500))
                    self._live.clear()
                    outs = []
                self._deliver(outs)
            self._update_gauges()
            if not accepting and not self._live and self._stop:
                break

    def _admit(self, sub: Submission) -> None:
        try:
            self.engine.add_request(sub.prompt_ids, sub.sampling, request_id=sub.request_id)
        except (PromptTooLong, RequestTooLarge, PoolExhausted, ValueError) as e:
            self.metrics.rejected.labels("too_large").inc()
            sub.post(Event("error", error=str(e), status=400))
            return
        self._live[sub.request_id] = sub
        self.metrics.prompt.inc(len(sub.prompt_ids))
        sub.post(Event("admitted"))

    def _abort(self, rid: str) -> None:
        sub = self._live.pop(rid, None)
        if self.engine.abort(rid):
            self.metrics.finished.labels("abort").inc()
        if sub is not None:
            sub.post(Event("finished", finish_reason="abort"))

    def _deliver(self, outs) -> None:
        now = time.perf_counter()
        for out in outs:
            sub = self._live.get(out.request_id)
            if sub is None:
                continue
            if out.new_token_ids:
                if sub.first_token is None:
                    sub.first_token = now
                    self.metrics.ttft.observe(now - sub.arrival)
                    self.metrics.prefix_hits.inc(out.cached_tokens)
                sub.generated += len(out.new_token_ids)
                self.metrics.generated.inc(len(out.new_token_ids))
            if out.finished:
                del self._live[out.request_id]
                self.metrics.finished.labels(out.finish_reason).inc()
                if sub.generated > 1:
                    self.metrics.tpot.observe((now - sub.first_token) / (sub.generated - 1))
                sub.post(Event("finished", list(out.new_token_ids), out.finish_reason,
                               cached_tokens=out.cached_tokens))
            elif out.new_token_ids:
                sub.post(Event("tokens", list(out.new_token_ids), cached_tokens=out.cached_tokens))

    def _update_gauges(self) -> None:
        sched = self.engine.scheduler
        alloc = sched.allocator
        self.metrics.running.set(len(sched.running()))
        self.metrics.waiting.set(len(sched.waiting) + len(self._inbox))
        free_or_cached = sched.reclaimable_pages()
        self.metrics.pages_used.set(alloc.num_pages - 1 - free_or_cached)
        self.metrics.pages_cached.set(free_or_cached - alloc.free_pages)
        self.metrics.pages_total.set(alloc.num_pages - 1)
