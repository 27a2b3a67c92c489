"""The host side: page allocation, batching and buckets, and the generate loop.

`Engine` owns the (donated) KV cache and the two jitted programs. A call to `generate` pads the
batch to a power of two and the prompts to a length bucket, allocates every page the requests
can need up front (so a pool that is too small fails before any work, with nothing changed),
prefills once, then decodes until every sequence hit EOS, a stop string or its token limit.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import cache as kvc
from .config import ModelConfig, SparseConfig
from .heads import HeadLayout
from .model import ModelSpec, decode_step, prefill
from .params import Params
from .sampling import SamplingParams, sample
from .sharding import shard_cache, shard_params


PROGRESS_MIN_TOKENS = 4096  # prompts padded to at least this many tokens show a prefill progress bar


class PoolExhausted(RuntimeError):
    """The page pool cannot hold the requested sequences."""


class PromptTooLong(ValueError):
    pass


class PageAllocator:
    """Free list over physical pages 1..num_pages-1 (page 0 is the scratch page)."""

    def __init__(self, num_pages: int):
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, 0, -1))

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int]:
        if n > len(self._free):
            raise PoolExhausted(f"page pool exhausted: {n} pages requested, {len(self._free)} of "
                                f"{self.num_pages - 1} free (raise --num-pages or lower the batch/length)")
        out = [self._free.pop() for _ in range(n)]
        return out

    def free(self, pages: Sequence[int]) -> None:
        self._free.extend(reversed(list(pages)))


def length_bucket(n: int, page_size: int, cap: int) -> int:
    """Prompt length bucket: the next power of two (at least one page, at most `cap`)."""
    return min(max(page_size, 1 << max(0, math.ceil(math.log2(max(n, 1))))), cap)


@dataclasses.dataclass
class Generation:
    token_ids: list[int]
    text: str
    prompt_tokens: int
    finish_reason: str  # "eos" | "stop" | "length"


@dataclasses.dataclass
class Stats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    ttft_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0  # decode steps after the first (which may include compilation)
    decode_steps: int = 0  # steps timed in decode_s
    first_step_s: float = 0.0  # the first decode step, compilation included on a new shape

    def line(self) -> str:
        pf = self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0
        dec = f"{self.decode_steps / self.decode_s:.1f} steps/s" if self.decode_s else "n/a"
        return (f"[stats] prompt tokens {self.prompt_tokens} | ttft {self.ttft_s * 1e3:.0f} ms | "
                f"prefill {pf:.1f} tok/s | decode {dec} (first step {self.first_step_s * 1e3:.0f} ms) | "
                f"{self.generated_tokens} tokens generated")


class Engine:
    def __init__(self, params: Params, config: ModelConfig, *, tokenizer=None, layout: HeadLayout | None = None,
                 sparse: SparseConfig = SparseConfig(), max_seq_len: int | None = None,
                 num_pages: int | None = None, prefill_impl: str = "auto", decode_impl: str = "auto",
                 cache_dtype=None, tp: int = 1):
        self.config = config
        self.tokenizer = tokenizer
        layout = layout or HeadLayout.dense(config.num_layers, config.num_kv_heads)
        self.spec = ModelSpec(config, layout, sparse, prefill_impl, decode_impl, tp)
        self.params = shard_params(params, config, tp)
        self.max_seq_len = int(config.max_position_embeddings if max_seq_len is None else max_seq_len)
        if self.max_seq_len < 1:
            raise ValueError(f"max_seq_len must be positive, got {self.max_seq_len}")
        self.max_pages_per_seq = -(-self.max_seq_len // sparse.page_size)
        self.num_pages = num_pages
        self.cache_dtype = cache_dtype or jax.tree.leaves(params)[0].dtype
        self._caches: dict[int, tuple[kvc.KVCache, PageAllocator]] = {}
        self._bar = None
        # two prefill programs: long prompts report each finished layer to a progress bar (a host
        # callback per layer), short ones skip the callbacks
        self._prefill = jax.jit(functools.partial(prefill, spec=self.spec), donate_argnames=("cache",))
        self._prefill_progress = jax.jit(functools.partial(prefill, spec=self.spec, on_layer=self._on_layer),
                                         donate_argnames=("cache",))
        # one decode program: whether a step refreshes the page selection is decided on the device
        # (a lax.cond that XLA runs as a CUDA-graph conditional node; measured faster on the H200
        # than switching between two static programs, bench/results/profile_decode-*.json)
        self._step = jax.jit(self._decode_and_sample, donate_argnames=("cache",))
        self._first = jax.jit(sample)
        self.last_stats = Stats()

    # -- programs ---------------------------------------------------------------------------

    def _decode_and_sample(self, params, cache, tokens, key, temperature, top_k, top_p):
        logits, cache = decode_step(params, cache, tokens, self.spec)
        return sample(logits, key, temperature, top_k, top_p), cache

    def _on_layer(self, layer) -> None:
        if self._bar is not None:
            self._bar.update(1)

    # -- cache ------------------------------------------------------------------------------

    def _cache_for(self, batch: int) -> tuple[kvc.KVCache, PageAllocator]:
        if batch not in self._caches:
            pages = batch * self.max_pages_per_seq + 1 if self.num_pages is None else self.num_pages
            cache = kvc.init_cache(self.config, self.spec.layout, self.spec.sparse, batch=batch,
                                   num_pages=pages, max_pages_per_seq=self.max_pages_per_seq,
                                   dtype=self.cache_dtype)
            # commit it to the device like the caches prefill/decode return: otherwise the first
            # call's (uncommitted) cache is another jit cache key and prefill compiles twice
            cache = shard_cache(cache, self.spec.tp)
            self._caches = {batch: (cache, PageAllocator(pages))}  # keep one cache alive at a time
        return self._caches[batch]

    # -- generation -------------------------------------------------------------------------

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

    def generate(self, prompts: Sequence[str | Sequence[int]], sampling: SamplingParams = SamplingParams(), *,
                 chat: bool = False, on_token: Callable[[int, int], None] | None = None,
                 progress: bool = False) -> list[Generation]:
        """Generates for a batch of prompts (text or token ids).

        `on_token(i, token_id)` is called as each sequence's tokens arrive (streaming).
        """
        if not prompts:
            raise ValueError("no prompts")
        ids = self.tokenize(prompts, chat)
        n = len(ids)
        page = self.spec.sparse.page_size
        limit = min(self.max_seq_len, self.config.max_position_embeddings)
        for i, p in enumerate(ids):
            if len(p) + sampling.max_new_tokens > limit:
                raise PromptTooLong(
                    f"prompt {i} has {len(p)} tokens; with max_new_tokens={sampling.max_new_tokens} it needs "
                    f"{len(p) + sampling.max_new_tokens} positions but the limit is {limit} "
                    f"(model context {self.config.max_position_embeddings}, cache max_seq_len {self.max_seq_len})")
        batch = 1 << math.ceil(math.log2(n))
        t = length_bucket(max(len(p) for p in ids), page, self.max_pages_per_seq * page)
        cache, alloc = self._cache_for(batch)
        need = [-(-(len(p) + sampling.max_new_tokens) // page) for p in ids]
        if sum(need) > alloc.free_pages:
            raise PoolExhausted(f"page pool exhausted: these requests need {sum(need)} pages of {page} tokens, "
                                f"{alloc.free_pages} are free (raise num_pages or lower the batch/length)")
        owned = [alloc.alloc(k) for k in need]
        try:
            return self._run(ids, owned, batch, t, cache, sampling, on_token, progress)
        except BaseException:
            self._caches.pop(batch, None)  # its buffers may have been donated mid-run
            raise
        finally:
            for pages in owned:
                alloc.free(pages)

    def _run(self, ids, owned, batch, t, cache, sampling, on_token, progress) -> list[Generation]:
        n = len(ids)
        table = np.zeros((batch, self.max_pages_per_seq), np.int32)
        tokens = np.zeros((batch, t), np.int32)
        lengths = np.zeros((batch,), np.int32)
        for i, (p, pages) in enumerate(zip(ids, owned)):
            table[i, : len(pages)] = pages
            tokens[i, : len(p)] = p
            lengths[i] = len(p)
        cache = cache.replace(page_table=jnp.asarray(table))
        key = jax.random.key(sampling.seed)
        knobs = (jnp.float32(sampling.temperature), jnp.int32(sampling.top_k), jnp.float32(sampling.top_p))
        stats = Stats(prompt_tokens=int(lengths.sum()))
        start = time.perf_counter()
        run_prefill = self._prefill
        if progress and t >= PROGRESS_MIN_TOKENS:
            from tqdm import tqdm

            self._bar = tqdm(total=self.config.num_layers, desc="prefill", unit="layer", file=sys.stderr, leave=False)
            run_prefill = self._prefill_progress
        try:
            logits, cache = run_prefill(self.params, cache, jnp.asarray(tokens), jnp.asarray(lengths))
            key, sub = jax.random.split(key)
            nxt = self._first(logits, sub, *knobs)
            nxt_host = np.asarray(nxt)
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
        stats.ttft_s = stats.prefill_s = time.perf_counter() - start
        out = [[] for _ in range(n)]
        reasons = [None] * n
        eos = set(self.config.eos_token_ids) | set(getattr(self.tokenizer, "eos_token_ids", ()))
        decode_start = first_done = time.perf_counter()
        # One step stays in flight: step k+1 is dispatched (its input tokens are on the device)
        # before step k's tokens are read back, so the host's stop checks and streaming overlap
        # the GPU. At most one extra step runs after the last token; its result is dropped.
        budget = sampling.max_new_tokens - 1  # decode steps that can still produce a kept token

        def launch(tokens):
            nonlocal key, cache, budget
            if budget <= 0:
                return None
            budget -= 1
            key, sub = jax.random.split(key)
            sampled, cache = self._step(self.params, cache, tokens, sub, *knobs)
            return sampled

        pending = launch(nxt)
        for step in range(sampling.max_new_tokens):
            for i in range(n):
                if reasons[i] is None:
                    tok = int(nxt_host[i])
                    if tok in eos:
                        reasons[i] = "eos"
                        continue
                    out[i].append(tok)
                    if on_token is not None:
                        on_token(i, tok)
                    if sampling.stop and self._hit_stop(out[i], sampling.stop):
                        reasons[i] = "stop"
                    elif len(out[i]) >= sampling.max_new_tokens:
                        reasons[i] = "length"
            if all(r is not None for r in reasons) or pending is None:
                break
            nxt = pending
            pending = launch(nxt)
            nxt_host = np.asarray(nxt)
            if step == 0:
                first_done = time.perf_counter()
                stats.first_step_s = first_done - decode_start
            else:
                stats.decode_steps += 1
        stats.decode_s = time.perf_counter() - first_done if stats.decode_steps else 0.0
        stats.generated_tokens = sum(len(o) for o in out)
        self._caches[batch] = (cache, self._caches[batch][1])
        self.last_stats = stats
        results = []
        for i in range(n):
            toks = out[i]
            text = self.tokenizer.decode(toks) if self.tokenizer is not None else ""
            if reasons[i] == "stop":
                text = self._cut_at_stop(text, sampling.stop)
            results.append(Generation(toks, text, len(ids[i]), reasons[i] or "length"))
        return results

    def _hit_stop(self, toks: list[int], stops: tuple[str, ...]) -> bool:
        if self.tokenizer is None:
            return False
        tail = self.tokenizer.decode(toks[-32:])
        return any(s in tail for s in stops)

    @staticmethod
    def _cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
        cut = min((text.find(s) for s in stops if s in text), default=-1)
        return text if cut < 0 else text[:cut]
