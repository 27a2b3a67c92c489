"""Chunked prefill over the paged cache and the prefix cache: the same logits and tokens as one-shot
prefill, with sink and local windows crossing chunk boundaries, under preemption and eviction."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from lserve_jax import cache as kvc
from lserve_jax.config import SparseConfig
from lserve_jax.engine import Engine
from lserve_jax.heads import HeadLayout
from lserve_jax.model import ModelSpec, prefill, prefill_chunk
from lserve_jax.sampling import SamplingParams

from .test_serving import CFG, alone, make_requests, run_all
from .test_serving import model  # noqa: F401  (the dense / sparse fixture)
from .tiny import tiny_config, tiny_params

# windows that cross every chunk boundary below: prefill sink 5 and local 23 (not page multiples),
# decode ring 4 + 12
WINDOWS = SparseConfig(page_size=16, logical_page_size=4, token_budget=128, prefill_sink=5, prefill_local=23,
                       decode_sink=4, decode_local=12)
LONG = tiny_config(max_position_embeddings=512)


def _cache(layout, sp, stream_pages):
    c = kvc.init_cache(LONG, layout, sp, batch=2, num_pages=64, max_pages_per_seq=16, dtype=jnp.float32,
                       num_stream_pages=stream_pages)
    table = np.stack([np.arange(1, 17), np.arange(17, 33)]).astype(np.int32)
    return c.replace(page_table=jnp.asarray(table), stream_table=jnp.asarray(table))


@pytest.mark.parametrize("layout, chunk", [(HeadLayout.dense(2, 2), 48), (HeadLayout(2, (1, 0)), 16),
                                           (HeadLayout(2, (1, 0)), 64), (HeadLayout(2, (0, 2)), 48)],
                         ids=["dense-48", "mixed-16", "mixed-64", "streaming-48"])
def test_chunked_prefill_equals_one_shot(layout, chunk):
    params = tiny_params(LONG)
    spec = ModelSpec(LONG, layout, WINDOWS)
    lengths = np.array([200, 131])
    tokens = np.random.default_rng(0).integers(1, LONG.vocab_size, (2, 208)).astype(np.int32)
    want, one = prefill(params, _cache(layout, WINDOWS, 1), jnp.asarray(tokens), jnp.asarray(lengths), spec)
    cache = _cache(layout, WINDOWS, 40)
    starts = np.zeros(2, np.int32)
    got = np.zeros_like(np.asarray(want))
    while (starts < lengths).any():
        counts = np.clip(lengths - starts, 0, chunk)
        ids = np.zeros((2, chunk), np.int32)
        for b in range(2):
            ids[b, : counts[b]] = tokens[b, starts[b]: starts[b] + counts[b]]
        ctx = None if not starts.any() else -(-(starts.max() + chunk) // WINDOWS.page_size)
        # a finished row rides along on scratch tables (its cache rows are not touched)
        done = (counts == 0)[:, None]
        tables = (cache.page_table, cache.stream_table)
        cache = cache.replace(page_table=jnp.where(done, 0, tables[0]), stream_table=jnp.where(done, 0, tables[1]))
        logits, cache = prefill_chunk(params, cache, jnp.asarray(ids), jnp.asarray(np.where(done[:, 0], 0, starts)),
                                      jnp.asarray(np.maximum(counts, 1)), spec, context_pages=ctx)
        cache = cache.replace(page_table=tables[0], stream_table=tables[1])
        if done.any():  # and keeps its ring (the call rewrote the finished row's from scratch pages)
            b = int(np.flatnonzero(done[:, 0])[0])
            cache = cache.replace(layers=tuple(lc.replace(ring_k=lc.ring_k.at[:, b].set(saved[i][0][:, b]),
                                                          ring_v=lc.ring_v.at[:, b].set(saved[i][1][:, b]))
                                               for i, lc in enumerate(cache.layers)))
        else:
            saved = [(lc.ring_k, lc.ring_v) for lc in cache.layers]
        for b in range(2):
            if counts[b] and starts[b] + counts[b] == lengths[b]:
                got[b] = np.asarray(logits[b])
        starts = starts + counts
    np.testing.assert_allclose(got, np.asarray(want), atol=1e-4, rtol=1e-4)
    for lo, lc in zip(one.layers, cache.layers):  # the decode state: rings, pages and key statistics
        for name in ("ring_k", "ring_v", "k_pages", "k_min", "k_max"):
            a, b = np.asarray(lo[name]), np.asarray(lc[name])
            if name == "ring_k" or name == "ring_v":
                # slots past a row's length hold whatever the ring kept: compare the written ones
                np.testing.assert_allclose(a[:, 0], b[:, 0], atol=1e-4, rtol=1e-4)
                np.testing.assert_allclose(a[:, 1, :16], b[:, 1, :16], atol=1e-4, rtol=1e-4)
            else:  # the pages each row's tokens fill (page 1.. for row 0, 17.. for row 1)
                full = name == "k_pages"  # token slots past the length hold padding: full pages only
                for first, n in ((1, 200), (17, 131)):
                    last = first + (n // 16 if full else -(-n // 16))
                    np.testing.assert_allclose(a[:, first:last], b[:, first:last], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("preemption", ["auto", "recompute"])
def test_busy_batch_with_chunked_prefill_and_preemption_equals_alone(model, preemption):
    """Prompts up to 60 tokens in 16-token chunks, random arrivals, a pool that forces preemption,
    the prefix cache on: every request's greedy tokens equal its tokens alone (one-shot prefill)."""
    params, layout, sparse = model
    reqs = make_requests(10, seed=11)
    # shared prefixes too: requests 6..9 continue request 5's prompt
    reqs[6:] = [(rid, reqs[5][1] + p[:5], sp) for rid, p, sp in reqs[6:]]
    arrivals = list(np.random.default_rng(12).integers(0, 30, len(reqs)))
    eng = Engine(params, CFG, layout=layout, sparse=sparse, max_slots=4, num_pages=12, preemption=preemption,
                 prefill_chunk=16)
    got = run_all(eng, reqs, arrivals)
    assert eng.scheduler.preempted_total > 0, "the pool should force preemptions"
    ref = alone(model, reqs)
    if layout.is_dense or eng.preemption == "swap":
        assert got == ref
    else:  # recompute with streaming heads follows prefill's masks: lengths only
        assert {k: len(v) for k, v in got.items()} == {k: len(v) for k, v in ref.items()}
    assert eng.scheduler.reclaimable_pages() == 11


def test_preempting_a_prompt_in_the_middle_of_its_chunks(model):
    """Two running requests need a page at once while a long prompt is halfway through its chunks:
    the youngest (the long prompt) is preempted mid-prefill. It has nothing decoded, so it starts
    its prefill again when readmitted (a swap would save a half-written cache); every request
    still gets its tokens alone. (Found on the GPU: the swap path read its last sampled token.)"""
    params, layout, sparse = model
    rng = np.random.default_rng(3)
    reqs = [("a1", rng.integers(1, CFG.vocab_size, 15).tolist(), SamplingParams(max_new_tokens=20)),
            ("a2", rng.integers(1, CFG.vocab_size, 15).tolist(), SamplingParams(max_new_tokens=20)),
            ("b", rng.integers(1, CFG.vocab_size, 96).tolist(), SamplingParams(max_new_tokens=5))]
    eng = Engine(params, CFG, layout=layout, sparse=sparse, max_slots=4, num_pages=10, prefill_chunk=16,
                 prefix_cache=False)
    states = []
    preempt = eng.scheduler.preempt
    eng.scheduler.preempt = lambda r: (states.append((r.request_id, r.prefill_done)), preempt(r))[-1]
    got = run_all(eng, reqs, arrivals=[0, 0, 1])
    assert ("b", False) in states, states
    assert got == alone(model, reqs)
    assert eng.scheduler.reclaimable_pages() == 9


def test_streaming_pool_default_is_no_larger_than_the_sequences_need():
    """A prefill window longer than max_seq_len (the default 8192-token window, 64-token
    sequences) sizes the streaming pool by the sequences' pages, not by the window."""
    eng = Engine(tiny_params(CFG), CFG, layout=HeadLayout(2, (1, 1)), sparse=SparseConfig(page_size=16,
                 logical_page_size=4), max_seq_len=64, prefill_chunk=16)
    assert eng.num_stream_pages == 4 * eng.max_pages_per_seq + 1


def test_prefix_cache_reuses_pages_and_gives_the_same_tokens(model):
    params, layout, sparse = model
    rng = np.random.default_rng(5)
    doc = [int(t) for t in rng.integers(1, CFG.vocab_size, 70)]
    sp = SamplingParams(max_new_tokens=6)
    reqs = [(f"q{i}", doc + [int(t) for t in rng.integers(1, CFG.vocab_size, 3 + i)], sp) for i in range(4)]
    eng = Engine(params, CFG, layout=layout, sparse=sparse, max_slots=4, prefill_chunk=32)
    got = run_all(eng, reqs)  # all at once: the later ones wait for the first's prefill, then reuse it
    assert got == alone(model, reqs)
    # 70 tokens: 4 full pages of 16, reused by the 3 later requests
    assert eng.scheduler.prefix_hit_total == 3 * 64
    off = Engine(params, CFG, layout=layout, sparse=sparse, max_slots=4, prefill_chunk=32, prefix_cache=False)
    assert run_all(off, reqs) == got and off.scheduler.prefix_hit_total == 0


def test_prefix_cache_with_whole_prompt_prefill(model):
    """prefill_chunk=None (whole prompts): a prompt that hits the prefix cache prefills its rest
    in one dispatch at its own width (it used to take the chunk width, None, and fail)."""
    params, layout, sparse = model
    rng = np.random.default_rng(6)
    doc = [int(t) for t in rng.integers(1, CFG.vocab_size, 70)]
    sp = SamplingParams(max_new_tokens=6)
    reqs = [(f"q{i}", doc + [int(t) for t in rng.integers(1, CFG.vocab_size, 3 + 9 * i)], sp) for i in range(3)]
    eng = Engine(params, CFG, layout=layout, sparse=sparse, max_slots=4, prefill_chunk=None)
    got = {}
    for rid, ids, p in reqs:  # one after another: each later one reuses the document's pages
        got.update(run_all(eng, [(rid, ids, p)]))
    assert eng.scheduler.prefix_hit_total == 2 * 64
    assert got == alone(model, reqs)


def test_prefix_cache_eviction_under_pressure_stays_correct(model):
    """A pool too small to keep every prompt cached: old blocks are evicted (least recently used
    first) and every answer stays the same as alone."""
    params, layout, sparse = model
    rng = np.random.default_rng(8)
    docs = [[int(t) for t in rng.integers(1, CFG.vocab_size, 40)] for _ in range(3)]
    sp = SamplingParams(max_new_tokens=4)
    reqs = [(f"r{i}", docs[i % 3] + [int(t) for t in rng.integers(1, CFG.vocab_size, 2)], sp) for i in range(9)]
    eng = Engine(params, CFG, layout=layout, sparse=sparse, max_slots=2, num_pages=9, prefill_chunk=16)
    got = {}
    for r in reqs:  # one at a time: each finds the cache as the previous ones left it
        got.update(run_all(eng, [r]))
        assert len(eng.scheduler.cache) <= 8
    assert got == alone(model, reqs)
    assert eng.scheduler.prefix_hit_total > 0
    assert eng.scheduler.reclaimable_pages() == 8


def test_long_prompt_chunks_interleave_with_decode_steps():
    """While a long prompt is prefilled chunk by chunk, a running request keeps getting tokens."""
    params = tiny_params(LONG)
    eng = Engine(params, LONG, sparse=WINDOWS, max_slots=2, max_seq_len=512, prefill_chunk=32)
    eng.add_request([3, 4, 5], SamplingParams(max_new_tokens=40), request_id="short")
    eng.step()
    eng.add_request(list(range(1, 120)) * 3, SamplingParams(max_new_tokens=2), request_id="long")
    got_short = 0
    long_first = None
    steps = 0
    while eng.has_unfinished():
        for o in eng.step():
            if o.request_id == "short":
                got_short += len(o.new_token_ids)
            elif long_first is None and o.new_token_ids:
                long_first = got_short
        steps += 1
    assert long_first is not None and long_first >= 8  # 357 tokens in 32-token chunks: 12 chunks


def test_no_recompilation_with_chunks_after_warmup():
    """Prompts up to 60 tokens in 16-token chunks, the prefix cache on: after `warmup`, 50 requests
    arriving at random compile no new prefill or decode program."""
    eng = Engine(tiny_params(CFG), CFG, sparse=SparseConfig(page_size=16, logical_page_size=4), max_slots=4,
                 prefill_chunk=16)
    eng.warmup(max_prompt_tokens=64)
    sizes = (eng._prefill._cache_size(), eng._step._cache_size())
    assert sizes == (3, 1)  # a 16-token chunk from 0, and later chunks reading 2 or 4 pages
    reqs = [(f"b{i}", p, sp) for i, (_, p, sp) in enumerate(make_requests(50, seed=6))]
    reqs[25:] = [(rid, list(range(1, 41)) + p[:4], sp) for rid, p, sp in reqs[25:]]  # prefix hits too
    run_all(eng, reqs, arrivals=list(np.random.default_rng(7).integers(0, 40, 50)), check=False)
    assert eng.scheduler.prefix_hit_total > 0
    assert (eng._prefill._cache_size(), eng._step._cache_size()) == sizes


def test_warmup_for_given_prompt_lengths_compiles_only_what_they_use():
    """warmup(prompt_lengths=...) (what the serving benchmark calls): prompts of 40 and 100
    tokens in 16-token chunks need the first-chunk program and the later chunks' context sizes,
    not every bucket; serving those prompts (a prefix hit included) then compiles nothing."""
    eng = Engine(tiny_params(CFG), CFG, sparse=SparseConfig(page_size=16, logical_page_size=4), max_slots=4,
                 prefill_chunk=16, max_seq_len=128)
    eng.warmup(prompt_lengths=[40, 100])
    sizes = (eng._prefill._cache_size(), eng._step._cache_size())
    assert sizes[0] == 1 + len({eng._context_pages(s, 16) for s in range(16, 100, 16)})
    doc = list(range(1, 90))
    reqs = [("a", doc + [5] * 11, SamplingParams(max_new_tokens=3)),
            ("b", doc + [7] * 11, SamplingParams(max_new_tokens=3)),
            ("c", list(range(3, 43)), SamplingParams(max_new_tokens=3))]
    run_all(eng, reqs, arrivals=[0, 6, 6], check=False)
    assert eng.scheduler.prefix_hit_total > 0
    assert (eng._prefill._cache_size(), eng._step._cache_size()) == sizes
    with pytest.raises(ValueError, match="prompt_lengths"):
        eng.warmup(prompt_lengths=[])


def test_interrupt_mid_prefill_leaves_the_engine_usable_with_stats():
    """Ctrl-C between a long prompt's chunks (here: raised from the progress hook of the first
    collected chunk) stops generate at once; the stats say what ran; the next call works."""
    params = tiny_params(LONG)
    eng = Engine(params, LONG, sparse=WINDOWS, max_slots=2, max_seq_len=512, prefill_chunk=32)
    want = eng.generate([[3, 4, 5]], SamplingParams(max_new_tokens=4))[0].token_ids
    chunks = []

    def interrupt(p):
        chunks.append(p.kind)
        raise KeyboardInterrupt

    eng_collect = eng._collect

    def collect(p):
        eng._on_collect = interrupt
        eng_collect(p)

    eng._collect = collect
    with pytest.raises(KeyboardInterrupt):
        eng.generate([list(range(1, 120)) * 3], SamplingParams(max_new_tokens=4))
    del eng._collect
    assert chunks == ["prefill"]  # stopped after the first of 12 chunks
    assert eng.last_stats.prompt_tokens == 357 and eng.last_stats.generated_tokens == 0
    assert not eng.has_unfinished()
    assert eng.generate([[3, 4, 5]], SamplingParams(max_new_tokens=4))[0].token_ids == want


@pytest.mark.parametrize("sparse_layout", [False, True], ids=["dense", "sparse"])
def test_decode_reads_a_table_as_wide_as_the_longest_row(sparse_layout):
    """Decode reads 16, 64, ... page-table entries (the longest row's pages, rounded up), not
    the whole table; the tokens are those of reading every entry, also when a row crosses from
    one width to the next mid-generation."""
    sp = SparseConfig(page_size=4, logical_page_size=2, token_budget=32, prefill_sink=4, prefill_local=16,
                      decode_sink=4, decode_local=8)
    layout = HeadLayout(2, (1, 1)) if sparse_layout else None
    params = tiny_params(LONG)
    prompts = [list(range(1, 61)), [7, 8, 9]]
    sampling = SamplingParams(max_new_tokens=40)  # 60 + 40 tokens: 25 pages, past the first width
    eng = Engine(params, LONG, layout=layout, sparse=sp, max_seq_len=512, prefill_chunk=None)
    widths = []
    step = eng._step

    def spy(*a, table_pages=None, **kw):
        widths.append(table_pages)
        return step(*a, table_pages=table_pages, **kw)

    eng._step = spy
    got = [g.token_ids for g in eng.generate(prompts, sampling)]
    assert set(widths) == {16, 64} and eng.max_pages_per_seq == 128
    full = Engine(params, LONG, layout=layout, sparse=sp, max_seq_len=512, prefill_chunk=None)
    full._table_pages = lambda n: full.max_pages_per_seq
    assert got == [g.token_ids for g in full.generate(prompts, sampling)]
