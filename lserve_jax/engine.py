"""The request-level engine: continuous batching over a fixed set of decode slots.

    engine.add_request([5, 6, 7], SamplingParams(max_new_tokens=32), request_id="a")
    while engine.has_unfinished():
        for out in engine.step():            # new tokens of every request that got some
            print(out.request_id, out.new_token_ids, out.finished, out.finish_reason)

`Engine` owns the (donated) KV cache, whose batch rows are decode slots, and three jitted
programs: prefill into chosen rows, one decode step of every row, and the first-token sampling
inside prefill. `lserve_jax.scheduler.Scheduler` decides, on the host, which waiting requests
are admitted (their prompts prefilled into free slots), which running requests get a new page
before the next step and which are preempted when the pool runs out. Each request samples with
its own knobs and seed (`sampling.sample_rows`), each row keeps its own selection-refresh clock
(`cache.step [B]`), so a request's tokens do not depend on what else runs.

One decode step stays in flight: `step()` dispatches step k+1 (its input tokens are already on
the device) before reading step k's tokens back, so host work (stop strings, streaming,
scheduling) overlaps the device. Tokens of a request that finished or was preempted meanwhile
are dropped. `generate()` is a client of this loop.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import sys
import time
from numbers import Integral
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import cache as kvc
from .config import ModelConfig, SparseConfig
from .fuse import is_fused
from .heads import HeadLayout
from .model import ModelSpec, decode_step, prefill_chunk
from .ops import Kernels
from .pages import PageAllocator, PoolExhausted  # noqa: F401  (importable from here too)
from .params import Params
from .kv8 import KV_DTYPES, calibration_ids, is_kv8, key_centers, with_key_centers
from .quant import weights_mode
from .prompts import normalize_request
from .sampling import SamplingParams, sample_rows, seed_key_data
from .scheduler import Chunk, Request, RequestTooLarge, Scheduler, stream_window_pages  # noqa: F401  (RequestTooLarge: importable from here)
from .sharding import replicate, shard_cache, shard_params


PROGRESS_MIN_TOKENS = 4096  # prompts of at least this many tokens show a prefill progress bar
# Prompt tokens prefilled per dispatch when the engine is not told (`prefill_chunk="auto"`): on
# CPU small chunks keep the attention scores small; on GPU 8192 (the offset prefill kernel runs
# 4096-token chunks at 444 TFLOP/s at a 127K offset on an H100, bench/results/kernel_check-*;
# a chunk's GEMMs of 8K rows are compute-bound, and a dispatch costs a weights read of ~5 ms).
DEFAULT_CHUNK = {"cpu": 512, "gpu": 8192}
# decode steps per dispatch ("auto"): on a GPU the host's work per call (the jitted call's
# arguments, the CUDA graph's launch and updates) was 1.1 ms of a 7.2 ms INT8 W8A8 + KV8 step at
# 128K x 4 on an H100, and four steps in one program ran at 6.1 ms a step
# (bench/results/profile_decode-2026-12-06h-h100-cbdefault.json); on the CPU a step's compute dwarfs it.
DEFAULT_DECODE_STEPS = {"cpu": 1, "gpu": 4}
TABLE_PAGES_MIN = 16  # the narrowest page table a decode step reads (see Engine._table_pages)


class PromptTooLong(ValueError):
    pass


def length_bucket(n: int, page_size: int, cap: int) -> int:
    """Prompt length bucket: the next power of two (at least one page, at most `cap`)."""
    return min(max(page_size, 1 << max(0, math.ceil(math.log2(max(n, 1))))), cap)


@dataclasses.dataclass
class Generation:
    token_ids: list[int]
    text: str
    prompt_tokens: int
    finish_reason: str  # "eos" | "stop" | "length" | "abort"


@dataclasses.dataclass
class RequestOutput:
    """What one `step()` produced for one request."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None  # "eos" | "stop" | "length" | "abort" once finished
    token_ids: list[int]  # every token generated so far
    cached_tokens: int = 0  # prompt tokens the prefix cache supplied (not prefilled)


@dataclasses.dataclass
class Stats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    ttft_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0  # decode steps after the first (which may include compilation)
    decode_steps: int = 0  # steps timed in decode_s
    first_step_s: float = 0.0  # the first decode step, compilation included on a new shape
    preemptions: int = 0
    decode_tokens: int = 0  # tokens produced by the steps timed in decode_s (every running sequence's)
    prefix_hit_tokens: int = 0  # prompt tokens reused from the prefix cache, not prefilled

    def line(self) -> str:
        pf = self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0
        dec = (f"{self.decode_tokens / self.decode_s:.1f} tok/s ({self.decode_steps / self.decode_s:.1f} steps/s)"
               if self.decode_s else "n/a")
        pre = f" | {self.preemptions} preemptions" if self.preemptions else ""
        if self.prefix_hit_tokens:
            pre += f" | {self.prefix_hit_tokens} prompt tokens from the prefix cache"
        return (f"[stats] prompt tokens {self.prompt_tokens} | ttft {self.ttft_s * 1e3:.0f} ms | "
                f"prefill {pf:.1f} tok/s | decode {dec} (first step {self.first_step_s * 1e3:.0f} ms) | "
                f"{self.generated_tokens} tokens generated{pre}")


@dataclasses.dataclass
class _Pending:
    """Sampled tokens on the device and, per row, the request they belong to."""

    tokens: jax.Array  # int32 [rows] (prefill) or [steps, slots] (decode: one row of tokens per step)
    rows: list[tuple[int, Request, int]]  # (index into tokens, request, its epoch at dispatch)
    kind: str  # "prefill" (a chunk; rows: those whose prompt it ends) | "decode"
    t0: float
    prompt_tokens: int = 0  # prompt tokens the chunk prefilled (the progress bar's)
    new_tokens: int = 0  # decode: tokens the rows asked for (at most steps each)
    steps: int = 1  # decode steps the dispatch ran


class Engine:
    def __init__(self, params: Params, config: ModelConfig, *, tokenizer=None, layout: HeadLayout | None = None,
                 sparse: SparseConfig = SparseConfig(), max_seq_len: int | None = None,
                 num_pages: int | None = None, prefill_impl: str = "auto", decode_impl: str = "auto",
                 cache_dtype=None, tp: int = 1, max_slots: int | None = None, preemption: str = "auto",
                 prefill_chunk: int | str | None = "auto", prefix_cache: bool = True,
                 num_stream_pages: int | None = None, kv_dtype: str = "auto", center_keys: bool = True,
                 decode_steps: int | str = "auto"):
        """max_slots: decode slots (rows run by every decode step). None: `generate` sizes them to
        its batch (the next power of two); `add_request` then uses 8. num_pages: the page pool
        (default: enough for every slot at max_seq_len, plus the scratch page). preemption: what
        happens to a request preempted when the pool runs out: "swap" (its cache rows and pages
        go to host memory and come back unchanged), "recompute" (freed; prefilled again with its
        generated tokens: exact for dense attention, while with streaming heads and page
        selection a recomputed cache follows prefill's masks, not decode's), "auto" (recompute
        for dense layouts, swap for sparse ones: both exact). prefill_chunk: prompt tokens prefilled
        per dispatch, a multiple of the page size (None: whole prompts; "auto": `DEFAULT_CHUNK`
        for the platform); decode steps of running requests go on between a long prompt's chunks.
        prefix_cache: reuse the pages of prompts prefilled before (same leading tokens). num_stream_pages:
        the streaming heads' prefill pool (default: four chunked prefills' windows). kv_dtype: how
        K and V are stored: "auto" (the cache dtype), "bfloat16", "float16", "float32" or
        "fp8_e4m3" / "int8" (8-bit values with a scale per token and head, `lserve_jax.kv8`: half
        the bytes of bf16; int8 loses least, BENCHMARKS.md; the GPU's fused decode kernel reads them and
        its fused append writes them; CPU decode and appends run the references). center_keys: with 8-bit KV, subtract each
        layer's calibrated mean key from every key before it is stored (`kv8.key_centers`: the
        same attention, less rounding; one forward over 1024 calibration tokens at start-up).
        decode_steps: decode steps per dispatch, run as one program ("auto": `DEFAULT_DECODE_STEPS`
        for the platform): the host's cost of a call is paid once per that many tokens; tokens
        stream that many at a time and a waiting prompt is admitted between dispatches. A row
        never runs past the tokens it asked for, and the tokens are those of single steps."""
        if preemption not in ("auto", "swap", "recompute"):
            raise ValueError(f"preemption must be 'auto', 'swap' or 'recompute', got {preemption!r}")
        self.config = config
        self.tokenizer = tokenizer
        self._eos = frozenset(config.eos_token_ids) | frozenset(getattr(tokenizer, "eos_token_ids", ()))
        layout = layout or HeadLayout.dense(config.num_layers, config.num_kv_heads)
        self.spec = ModelSpec(config, layout, sparse, Kernels.from_names(prefill=prefill_impl, decode=decode_impl), tp)
        self.preemption = ("recompute" if layout.is_dense else "swap") if preemption == "auto" else preemption
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}")
        self.kv_dtype = KV_DTYPES[kv_dtype]
        if tp > 1 and is_kv8(self.kv_dtype):
            raise ValueError(f"8-bit KV pages ({kv_dtype}) run with tp=1 only, got tp={tp}")
        if center_keys and is_kv8(self.kv_dtype) and "k_center" not in params.layers[0]:
            ids = calibration_ids(tokenizer, config.vocab_size)
            params = with_key_centers(params, key_centers(params, config, ids))
        if tp > 1 and weights_mode(params) is not None:
            raise ValueError(f"FP8 weights ({weights_mode(params)}) run with tp=1 only, got tp={tp}")
        if tp > 1 and is_fused(params):
            raise ValueError(f"fused projections (lserve_jax.fuse) run with tp=1 only, got tp={tp}")
        self.params = shard_params(params, config, tp)
        self.max_seq_len = int(config.max_position_embeddings if max_seq_len is None else max_seq_len)
        if self.max_seq_len < 1:
            raise ValueError(f"max_seq_len must be positive, got {self.max_seq_len}")
        if max_slots is not None and max_slots < 1:
            raise ValueError(f"max_slots must be >= 1, got {max_slots}")
        self.max_pages_per_seq = -(-self.max_seq_len // sparse.page_size)
        self.num_pages = num_pages
        if prefill_chunk == "auto":
            prefill_chunk = DEFAULT_CHUNK.get(jax.default_backend())
        if prefill_chunk is not None:
            prefill_chunk = int(prefill_chunk)
            if prefill_chunk < sparse.page_size or prefill_chunk % sparse.page_size:
                raise ValueError(f"prefill_chunk must be a positive multiple of the page size {sparse.page_size}, "
                                 f"got {prefill_chunk}")
            prefill_chunk = min(prefill_chunk, self.max_pages_per_seq * sparse.page_size)
        self.prefill_chunk = prefill_chunk
        if decode_steps == "auto":
            decode_steps = DEFAULT_DECODE_STEPS.get(jax.default_backend(), 1)
        if isinstance(decode_steps, bool) or not isinstance(decode_steps, Integral) or decode_steps < 1:
            raise ValueError(f"decode_steps must be a positive integer or 'auto', got {decode_steps!r}")
        self.decode_steps = int(decode_steps)
        self.prefix_cache = bool(prefix_cache)
        streaming = any(r < config.num_kv_heads for r in layout.num_retrieval)
        self._window = kvc.window_geometry(sparse) if streaming else None
        if num_stream_pages is None:
            if self._window is None or (prefill_chunk is None and not prefix_cache):
                num_stream_pages = 1
            else:
                cap = self.max_pages_per_seq * sparse.page_size
                num_stream_pages = 4 * stream_window_pages(self._window, prefill_chunk or cap, sparse.page_size, cap) + 1
        self.num_stream_pages = int(num_stream_pages)
        self.max_slots = max_slots
        self.cache_dtype = cache_dtype or jax.tree.leaves(params)[0].dtype
        self._bar = None
        self._progress = False
        self._ids = itertools.count()
        # generate's hooks: per collected dispatch (timing) and per token (streaming)
        self._on_collect: Callable[[_Pending], None] | None = None
        self._on_token: Callable[[Request, int], None] | None = None
        # the prefill program: one chunk of some rows (context_pages: None when every row starts
        # its prompt, else the page-table entries read; one compiled program per value)
        self._prefill = jax.jit(self._prefill_rows, donate_argnames=("cache",), static_argnames=("context_pages",))
        # one decode program: whether a row refreshes its page selection is decided on the device
        # (a lax.cond that XLA runs as a CUDA-graph conditional node; measured faster on the H200
        # than switching between two static programs, bench/results/profile_decode-*.json)
        # (one per page-table width read: powers of two up to the table, so that a short context
        # decodes at a short context's cost whatever the cache's capacity)
        # (decode_steps > 1: that many steps in one program, a fori_loop)
        self._step = jax.jit(self._decode_steps, donate_argnames=("cache",), static_argnames=("table_pages", "steps"))
        self._save = jax.jit(kvc.save_sequence)
        self._restore = jax.jit(kvc.restore_sequence, donate_argnames=("cache",))
        self.scheduler: Scheduler | None = None
        self.last_stats = Stats()
        self._reset(max_slots or 8, build=False)

    # -- programs ---------------------------------------------------------------------------

    def _prefill_rows(self, params, cache, tokens, starts, counts, rows, next_tokens, key_data, knobs,
                      context_pages=None):
        """Prefills a chunk tokens [b, C] (row i: positions starts[i] + j, counts[i] real) into cache
        rows `rows` [b]; samples each row's next token (kept for rows whose prompt this chunk ends).
        Returns (sampled [b], cache, next_tokens with the sampled tokens in those rows)."""
        sub = kvc.take_rows(cache, rows)
        logits, sub = prefill_chunk(params, sub, tokens, starts, counts, self.spec, context_pages=context_pages)
        sampled = sample_rows(logits, key_data, starts + counts, *knobs)
        return sampled, kvc.put_rows(cache, sub, rows), next_tokens.at[rows].set(sampled)

    def _decode_and_sample(self, params, cache, tokens, active, key_data, temperature, top_k, top_p,
                           table_pages=None):
        """One decode step of every row; rows not `active` (free slots, prompts still in prefill)
        run at position 0 over an all-scratch page table (their writes land on the scratch page;
        a prompt's next chunk rewrites its ring and length, its first decode step its selection)."""
        table = cache.page_table
        cache = cache.replace(lengths=jnp.where(active, cache.lengths, 0),
                              page_table=jnp.where(active[:, None], table, kvc.NULL_PAGE))
        logits, cache = decode_step(params, cache, tokens, self.spec, table_pages=table_pages)
        return sample_rows(logits, key_data, cache.lengths, temperature, top_k, top_p), cache.replace(page_table=table)

    def _decode_steps(self, params, cache, tokens, active, budget, key_data, temperature, top_k, top_p,
                      table_pages=None, steps=1):
        """`steps` decode steps -> (tokens int32 [steps, slots], cache). Row i takes part in the
        first budget[i] steps only (then it is inactive: a row never writes past the tokens its
        request asked for, so never past its pages); one step is `_decode_and_sample` as is.
        Sampling keys follow positions, so the tokens are those of `steps` single steps."""
        if steps == 1:
            sampled, cache = self._decode_and_sample(params, cache, tokens, active, key_data, temperature, top_k,
                                                     top_p, table_pages)
            return sampled[None], cache

        def body(i, carry):
            cache, tok, out = carry
            sampled, cache = self._decode_and_sample(params, cache, tok, active & (i < budget), key_data,
                                                     temperature, top_k, top_p, table_pages)
            return cache, sampled, out.at[i].set(sampled)

        out = jnp.zeros((steps,) + tokens.shape, tokens.dtype)
        cache, _, out = jax.lax.fori_loop(0, steps, body, (cache, tokens, out))
        return out, cache

    # -- state ------------------------------------------------------------------------------

    def _reset(self, slots: int, build: bool = True) -> None:
        """Fresh scheduler and device state for `slots` decode slots (drops every request)."""
        pages = slots * self.max_pages_per_seq + 1 if self.num_pages is None else self.num_pages
        limit = min(self.max_seq_len, self.config.max_position_embeddings)
        self.scheduler = Scheduler(slots, pages, self.spec.sparse.page_size, limit, chunk=self.prefill_chunk,
                                   num_stream_pages=self.num_stream_pages, window=self._window,
                                   prefix_cache=self.prefix_cache, lookahead=self.decode_steps)
        self._slots = slots
        self._table = np.zeros((2, slots, self.max_pages_per_seq), np.int32)  # page table, stream table
        self._table_in_cache = self._table.copy()  # what the cache's tables hold
        self._uploaded: dict[str, tuple[np.ndarray, jax.Array]] = {}
        self._key_data = np.zeros((slots, 2), np.uint32)
        self._knobs = (np.zeros(slots, np.float32), np.zeros(slots, np.int32), np.ones(slots, np.float32))
        self._pending: list[_Pending] = []
        self._outputs: dict[str, RequestOutput] = {}
        self._cache = None
        if build:
            self._build_cache()

    def _build_cache(self) -> None:
        cache = kvc.init_cache(self.config, self.spec.layout, self.spec.sparse, batch=self._slots,
                               num_pages=self.scheduler.allocator.num_pages,
                               max_pages_per_seq=self.max_pages_per_seq, dtype=self.cache_dtype,
                               num_stream_pages=self.scheduler.stream.num_pages, kv_dtype=self.kv_dtype)
        # commit it to the device like the caches prefill/decode return: otherwise the first
        # call's (uncommitted) cache is another jit cache key and prefill compiles twice
        self._cache = shard_cache(cache, self.spec.tp)
        self._next_tokens = replicate(jnp.zeros((self._slots,), jnp.int32), self.spec.tp)

    @property
    def num_slots(self) -> int:
        return self._slots

    def warmup(self, max_prompt_tokens: int | None = None, prompt_lengths: Sequence[int] | None = None) -> None:
        """Compiles ahead of the first request: the decode step and the prefill programs a prompt
        of up to `max_prompt_tokens` (default: the cache capacity) can use: whole prompts in every
        bucket and batch size (powers of two up to the slots and the chunk), and a long prompt's
        later chunks for every context size. `prompt_lengths` instead: only the programs prompts
        of these lengths use (a benchmark's request list; fewer programs to compile), decode
        steps from the shortest prompt's table width up. Runs on
        scratch pages only; the engine must be idle."""
        if self.has_unfinished():
            raise RuntimeError("warmup() needs an idle engine")
        if self._cache is None:
            self._build_cache()
        page = self.spec.sparse.page_size
        cap = self.max_pages_per_seq * page
        top = min(max_prompt_tokens or cap, cap)
        whole = self.prefill_chunk or top
        if prompt_lengths is None:
            short = [page] + [1 << k for k in range(whole.bit_length() + 1)]
            long_ = [top] if top > whole else []
        else:
            lengths = [min(int(n), cap) for n in prompt_lengths]
            if not lengths or min(lengths) < 1:
                raise ValueError(f"prompt_lengths must be positive lengths, got {prompt_lengths!r}")
            short = [n for n in lengths if n <= whole]
            long_ = [n for n in lengths if n > whole]
        if long_:
            short = short + [whole]  # a long prompt's first chunk: a whole chunk from position 0
        buckets = sorted({length_bucket(n, page, whole) for n in short if n <= max(whole, page)})
        self._sync_table()  # no request: every row maps the scratch page only

        def run(b, t, context_pages=None):
            knobs = (np.zeros(b, np.float32), np.zeros(b, np.int32), np.ones(b, np.float32))
            z = jnp.zeros((b,), jnp.int32)
            _, self._cache, self._next_tokens = self._prefill(
                self.params, self._cache, jnp.zeros((b, t), jnp.int32), z, z, z, self._next_tokens,
                jnp.zeros((b, 2), jnp.uint32), knobs, context_pages=context_pages)

        for b in [1 << k for k in range(self._slots.bit_length()) if 1 << k <= self._slots]:
            for t in buckets:
                if b * t <= max(self.scheduler.batch_tokens, t):  # the batches `next_prefill` makes
                    run(b, t)
        if self.prefill_chunk is not None and long_:
            # later chunks start at any page (after a prefix-cache hit), up to the longest prompt
            for n in sorted({self._context_pages(s, self.prefill_chunk) for s in range(self.prefill_chunk, max(long_), page)}):
                run(1, self.prefill_chunk, n)
        # decode reads tables as wide as the longest row: from the shortest prompt to the capacity
        first = 1 if prompt_lengths is None else -(-min(lengths) // page)
        for width in sorted({self._table_pages(n) for n in range(first, self.max_pages_per_seq + 1)}):
            sampled, self._cache = self._step(self.params, self._cache, self._next_tokens,
                                              jnp.zeros((self._slots,), bool), jnp.zeros((self._slots,), jnp.int32),
                                              jnp.asarray(self._key_data.copy()),
                                              *(jnp.asarray(k.copy()) for k in self._knobs), table_pages=width,
                                              steps=self.decode_steps)
            self._next_tokens = sampled[-1]
        jax.block_until_ready(sampled)

    def _table_pages(self, pages: int) -> int:
        """Page-table entries a decode step reads when the longest row holds `pages` pages: 16,
        then times 4 (few programs to compile; page scoring and dense reads cost at most 4x the
        tokens in the cache), at most the whole table."""
        width = TABLE_PAGES_MIN
        while width < pages:
            width *= 4
        return min(width, self.max_pages_per_seq)

    def _context_pages(self, start: int, width: int) -> int:
        """Page-table entries a chunk of `width` tokens at `start` reads: a power of two (few
        programs), at most the table."""
        need = -(-(start + width) // self.spec.sparse.page_size)
        return min(1 << (need - 1).bit_length(), self.max_pages_per_seq)

    # -- requests ---------------------------------------------------------------------------

    def tokenize(self, prompts: Sequence[str | Sequence[int]], chat: bool = False) -> list[list[int]]:
        out = []
        for p in prompts:
            if isinstance(p, str):
                if not p.strip():
                    raise ValueError("empty prompt")
                if self.tokenizer is None:
                    raise ValueError("text prompts need a tokenizer; pass token ids instead")
                ids = self.tokenizer.encode_chat(p) if chat else self.tokenizer.encode(p)
            else:
                ids = [int(t) for t in p]
            if not ids:
                raise ValueError("empty prompt")
            bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise ValueError(f"token ids outside the vocabulary [0, {self.config.vocab_size}): {bad[:5]}")
            out.append(ids)
        return out

    def add_request(self, prompt: str | Sequence[int], sampling: SamplingParams = SamplingParams(), *,
                    request_id: str | None = None, chat: bool = False) -> str:
        """Queues a request (text or token ids); returns its id. A request that can never run
        (longer than the model, the cache or the pool) raises RequestTooLarge and queues nothing."""
        (ids,) = self.tokenize([prompt], chat)
        self._check_prompt(0, ids)
        if sampling.seed is None:
            from .prompts import normalize_sampling

            sampling = normalize_sampling(sampling)
        if self._max_new(ids, sampling) < sampling.max_new_tokens:  # stops at the context: "length"
            sampling = dataclasses.replace(sampling, max_new_tokens=self._max_new(ids, sampling))
        request_id = f"req-{next(self._ids)}" if request_id is None else str(request_id)
        if self._cache is None:
            self._build_cache()
        req = self.scheduler.add(request_id, ids, sampling)
        req.key_data = seed_key_data(sampling.seed)  # uint32 [2]: its sampling key, before positions
        return request_id

    @property
    def max_tokens(self) -> int:
        """Positions a sequence may use: the model's context or the cache's capacity."""
        return min(self.max_seq_len, self.config.max_position_embeddings)

    def _check_prompt(self, i: int, ids: list[int]) -> None:
        if len(ids) >= self.max_tokens:
            raise PromptTooLong(
                f"prompt {i} has {len(ids)} tokens but the limit is {self.max_tokens} positions, one of them "
                f"for the first new token (model context {self.config.max_position_embeddings}, cache "
                f"max_seq_len {self.max_seq_len})")

    def _max_new(self, ids: list[int], sampling: SamplingParams) -> int:
        """New tokens a prompt can get: max_new_tokens, cut at the context (finish reason "length")."""
        return min(sampling.max_new_tokens, self.max_tokens - len(ids))

    def abort(self, request_id: str) -> bool:
        """Stops a request and frees its slot and pages at once; False if it is not known."""
        req = self.scheduler.requests.get(request_id)
        if req is None:
            return False
        self._finish(req, "abort")
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending)

    # -- the loop ---------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Admits what fits, dispatches the next decode step, reads back the previous one.
        Returns the requests that got tokens or finished since the last call."""
        sched = self.scheduler
        admitted = sched.admit()
        resumed = [r for r in admitted if r.swapped is not None]
        if resumed:
            self._dispatch_restore(resumed)
        chunk = sched.next_prefill()
        if chunk:
            self._dispatch_prefill(chunk)
        swap = self.preemption == "swap"
        if swap and sched.pages_short() > 0:
            # a swap saves what the device holds: read every dispatched token first, so that the
            # saved state and the request's tokens agree (a pipeline bubble, at preemptions only)
            for p in self._pending:
                self._collect(p)
            self._pending = []
        for req in sched.grow():  # a preempted request's row maps nothing until it is readmitted
            if swap and not req.preempted_in_prefill:  # (one mid-prefill is prefilled again)
                self._swap_out(req)
        in_flight = self._pending
        self._pending = []
        if any(r.wants_more for r in sched.running()):
            self._dispatch_decode()
        # read back everything dispatched before this call's decode step (prefills of this call
        # included: their first tokens stream now, the decode step stays in flight)
        keep = [p for p in self._pending if p.kind == "decode"]
        for p in in_flight + [p for p in self._pending if p.kind == "prefill"]:
            self._collect(p)
        self._pending = keep
        if not sched.running() and not sched.waiting:
            for p in self._pending:  # nothing left to wait for: drain
                self._collect(p)
            self._pending = []
        outs, self._outputs = list(self._outputs.values()), {}
        return outs

    def _sync_table(self) -> None:
        """The page and stream tables of every slot from the scheduler's ownership (free slots:
        all scratch), put into the cache before a dispatch."""
        self._table[:] = 0
        for req in self.scheduler.running():
            self._table[0, req.slot, : len(req.pages)] = req.pages
            for i, p in req.spages.items():
                self._table[1, req.slot, i] = p
        if np.array_equal(self._table, self._table_in_cache):
            return  # the programs leave the tables as they got them: no upload on most steps
        self._table_in_cache = self._table.copy()
        # committed like the arrays the programs return: one jit cache entry, not two. From a copy
        # that is never written: on CPU a device array may alias the numpy buffer it was made from
        page_table, stream_table = self._table_in_cache
        self._cache = self._cache.replace(page_table=replicate(jnp.asarray(page_table), self.spec.tp),
                                          stream_table=replicate(jnp.asarray(stream_table), self.spec.tp))

    def _on_device(self, name: str, host: np.ndarray) -> jax.Array:
        """`host` as a device array, uploaded again only when it changed (slot knobs change at
        admissions and finishes, not every step)."""
        prev = self._uploaded.get(name)
        if prev is None or not np.array_equal(prev[0], host):
            copy = host.copy()  # never written (a CPU device array may alias it)
            self._uploaded[name] = prev = (copy, jnp.asarray(copy))
        return prev[1]

    def _padded_pages(self, pages: list[int], n: int | None = None) -> jax.Array:
        """pages int32 [n] (default: the next power of two, so that a swap moves about what the
        request holds and compiles one program per size class), padded with the scratch page."""
        n = n or 1 << max(len(pages) - 1, 0).bit_length()
        out = np.zeros(n, np.int32)
        out[: len(pages)] = pages
        return jnp.asarray(out)

    def _swap_out(self, req: Request) -> None:
        """Copies a just-preempted request's cache state to host memory (dispatched before anything
        that could reuse its pages or row)."""
        saved = self._save(self._cache, jnp.int32(req.last_slot), self._padded_pages(req.last_pages))
        req.swapped = jax.device_get(saved)

    def _set_slot(self, req: Request) -> None:
        """The slot's sampling key and knobs: the request's."""
        self._key_data[req.slot] = req.key_data
        sp = req.sampling
        self._knobs[0][req.slot], self._knobs[1][req.slot], self._knobs[2][req.slot] = \
            sp.temperature, sp.top_k, sp.top_p

    def _dispatch_restore(self, resumed: list[Request]) -> None:
        """Writes swapped-out requests back into their (new) slots and pages: the state they left."""
        for req in resumed:
            self._set_slot(req)
            n = req.swapped["layers"][0]["k_pages"].shape[1]  # pages saved, padding included
            self._cache = self._restore(self._cache, jnp.int32(req.slot), self._padded_pages(req.pages, n),
                                        req.swapped)
            # its next decode input: the last token it sampled (read before the swap)
            self._next_tokens = self._next_tokens.at[req.slot].set(req.output_ids[-1])
            req.swapped = None

    def _dispatch_prefill(self, chunk: list[Chunk]) -> None:
        """One prefill dispatch: a long prompt's next chunk, or short prompts whole (padded to a
        power-of-two batch with copies of the last row, whose duplicate writes are identical)."""
        page = self.spec.sparse.page_size
        context = any(c.start for c in chunk)
        if self.prefill_chunk is not None and (context or not chunk[0].last):
            t = self.prefill_chunk
        else:  # whole prompts, or (prefill_chunk None) a prompt's rest after a prefix-cache hit
            t = length_bucket(max(c.count for c in chunk), page, self.prefill_chunk or self.max_pages_per_seq * page)
        b = len(chunk)
        padded = chunk + [chunk[-1]] * ((1 << (b - 1).bit_length()) - b)
        tokens = np.zeros((len(padded), t), np.int32)
        starts = np.zeros((len(padded),), np.int32)
        counts = np.zeros((len(padded),), np.int32)
        for i, c in enumerate(padded):
            tokens[i, : c.count] = c.request.tokens[c.start: c.start + c.count]
            starts[i], counts[i] = c.start, c.count
        for c in chunk:
            self._set_slot(c.request)
        rows_a = np.asarray([c.request.slot for c in padded], np.int32)
        knobs = tuple(k[rows_a] for k in self._knobs)
        self._start_bar(chunk)
        t0 = time.perf_counter()
        self._sync_table()
        sampled, self._cache, self._next_tokens = self._prefill(
            self.params, self._cache, jnp.asarray(tokens), jnp.asarray(starts), jnp.asarray(counts),
            jnp.asarray(rows_a), self._next_tokens, jnp.asarray(self._key_data[rows_a]), knobs,
            context_pages=self._context_pages(max(c.start for c in chunk), t) if context else None)
        done = []
        for i, c in enumerate(chunk):
            self.scheduler.chunk_dispatched(c)
            if c.last:
                c.request.dispatched += 1
                done.append((i, c.request, c.request.epoch))
        self._pending.append(_Pending(sampled, done, "prefill", t0, sum(c.count for c in chunk)))

    def _start_bar(self, chunk: list[Chunk]) -> None:
        """A progress bar over a long prompt's tokens (when `generate` asked for progress)."""
        req = chunk[0].request
        if self._progress and self._bar is None and len(req.tokens) >= PROGRESS_MIN_TOKENS and not chunk[0].last:
            from tqdm import tqdm

            self._bar = tqdm(total=len(req.tokens), initial=chunk[0].start, desc="prefill", unit="tok",
                             file=sys.stderr, leave=False)

    def _dispatch_decode(self) -> None:
        sched = self.scheduler
        steps = self.decode_steps
        active = np.zeros(self._slots, bool)
        budget = np.zeros(self._slots, np.int32)  # steps each row takes part in (decode_steps > 1)
        rows, new = [], 0
        for req in sched.running():
            if not req.prefill_done:
                continue  # its prompt is still being prefilled
            active[req.slot] = True
            if req.wants_more:
                n = min(steps, req.sampling.max_new_tokens - req.dispatched)
                rows.append((req.slot, req, req.epoch))
                req.dispatched += n
                budget[req.slot], new = n, new + n
                req.cached += n
            elif steps == 1:
                req.cached += 1  # one step writes every active row (a finishing row's extra token)
        self._sync_table()
        t0 = time.perf_counter()
        knobs = (self._on_device(f"knob{i}", k) for i, k in enumerate(self._knobs))
        width = self._table_pages(max(len(r.pages) for r in sched.running()))
        sampled, self._cache = self._step(self.params, self._cache, self._next_tokens, self._on_device("active", active),
                                          self._on_device("budget", budget), self._on_device("key_data", self._key_data),
                                          *knobs, table_pages=width, steps=steps)
        self._next_tokens = sampled[-1]
        self._pending.append(_Pending(sampled, rows, "decode", t0, new_tokens=new, steps=steps))

    def _collect(self, p: _Pending) -> None:
        host = np.asarray(p.tokens)
        if self._bar is not None and p.kind == "prefill":
            self._bar.update(p.prompt_tokens)
            if p.rows:  # the prompt's last chunk
                self._bar.close()
                self._bar = None
        if self._on_collect is not None:
            self._on_collect(p)
        eos = self._eos
        for step_tokens in (host if host.ndim == 2 else host[None]):  # a decode dispatch: one row per step
            for i, req, epoch in p.rows:
                if req.status != "running" or req.epoch != epoch:
                    continue  # finished, aborted or preempted after this work was dispatched
                tok = int(step_tokens[i])
                out = self._output(req)
                if tok in eos and not req.sampling.ignore_eos:
                    self._finish(req, "eos")
                    continue
                req.output_ids.append(tok)
                out.new_token_ids.append(tok)
                if self._on_token is not None:
                    self._on_token(req, tok)
                if req.sampling.stop and self._hit_stop(req.output_ids, req.sampling.stop):
                    self._finish(req, "stop")
                elif len(req.output_ids) >= req.sampling.max_new_tokens:
                    self._finish(req, "length")

    def _output(self, req: Request) -> RequestOutput:
        out = self._outputs.get(req.request_id)
        if out is None:
            out = self._outputs[req.request_id] = RequestOutput(req.request_id, [], False, None, req.output_ids,
                                                                 req.prefix_hit)
        return out

    def _finish(self, req: Request, reason: str) -> None:
        self.scheduler.finish(req, reason)
        out = self._output(req)
        out.finished, out.finish_reason = True, reason

    # -- generate: a client of the loop -----------------------------------------------------

    def generate(self, prompts: Sequence[str | Sequence[int]], sampling: SamplingParams = SamplingParams(), *,
                 chat: bool = False, on_token: Callable[[int, int], None] | None = None,
                 progress: bool = False) -> list[Generation]:
        """Generates for a batch of prompts (text or token ids), each to its end.

        `on_token(i, token_id)` is called as each sequence's tokens arrive (streaming).
        """
        prompts, sampling = normalize_request(prompts, sampling, self.tokenizer)
        if not prompts:
            raise ValueError("no prompts")
        ids = self.tokenize(prompts, chat)
        n = len(ids)
        page = self.spec.sparse.page_size
        for i, p in enumerate(ids):
            self._check_prompt(i, p)
        if self.has_unfinished():
            raise RuntimeError("generate() runs on an idle engine; finish the requests added with add_request first")
        slots = self.max_slots or 1 << (n - 1).bit_length()
        if slots != self._slots or self._cache is None:
            self._reset(slots)
        usable = self.scheduler.allocator.num_pages - 1
        for i, p in enumerate(ids):
            need = -(-(len(p) + self._max_new(p, sampling)) // page)
            if need > usable:
                raise PoolExhausted(f"page pool exhausted: prompt {i} needs {need} pages of {page} tokens, the pool "
                                    f"has {usable} (raise num_pages or lower the length)")
        stats = Stats(prompt_tokens=sum(map(len, ids)))
        hit0 = self.scheduler.prefix_hit_total
        start = time.perf_counter()
        index = {}
        marks = {"first": None, "decode_start": None, "steps": 0}

        def collected(p: _Pending) -> None:
            now = time.perf_counter()
            if p.kind == "prefill":
                stats.prefill_s += now - p.t0
                if marks["first"] is None:
                    marks["first"] = now
                    stats.ttft_s = now - start
            elif marks["decode_start"] is None:
                marks["decode_start"] = now
                stats.first_step_s = now - p.t0
            else:
                marks["steps"] += p.steps
                stats.decode_tokens += p.new_tokens

        self._on_collect = collected
        self._on_token = (lambda req, tok: on_token(index[req.request_id], tok)) if on_token else None
        self._progress = progress
        results: dict[str, list] = {}
        try:
            for i, p in enumerate(ids):
                rid = self.add_request(p, sampling)
                index[rid] = i
            while self.has_unfinished():
                for out in self.step():
                    if out.finished:
                        results[out.request_id] = [out.token_ids, out.finish_reason]
        except BaseException:
            # Ctrl-C (or an error): the stats of what ran, then a fresh state (buffers may have
            # been donated mid-run); the engine stays usable
            finished = sum(len(r[0]) for r in results.values())
            self._finish_stats(stats, marks, hit0)
            stats.generated_tokens = finished + sum(len(r.output_ids) for r in self.scheduler.requests.values())
            self.last_stats = stats
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            self._reset(self._slots, build=False)
            raise
        finally:
            self._on_collect = self._on_token = None
            self._progress = False
        self._finish_stats(stats, marks, hit0)
        gens = [None] * n
        for rid, i in index.items():
            toks, reason = results[rid]
            text = self.tokenizer.decode(toks) if self.tokenizer is not None else ""
            if reason == "stop":
                text = self._cut_at_stop(text, sampling.stop)
            gens[i] = Generation(list(toks), text, len(ids[i]), reason)
        stats.generated_tokens = sum(len(g.token_ids) for g in gens)
        self.last_stats = stats
        return gens

    def _finish_stats(self, stats: Stats, marks: dict, hit0: int) -> None:
        end = time.perf_counter()
        if marks["decode_start"] is not None and marks["steps"]:
            stats.decode_s, stats.decode_steps = end - marks["decode_start"], marks["steps"]
        stats.preemptions = self.scheduler.preempted_total
        stats.prefix_hit_tokens = self.scheduler.prefix_hit_total - hit0

    def _hit_stop(self, toks: list[int], stops: tuple[str, ...]) -> bool:
        if self.tokenizer is None:
            return False
        tail = self.tokenizer.decode(toks[-32:])
        return any(s in tail for s in stops)

    @staticmethod
    def _cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
        cut = min((text.find(s) for s in stops if s in text), default=-1)
        return text if cut < 0 else text[:cut]
