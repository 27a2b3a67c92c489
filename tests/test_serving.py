"""The request-level engine: continuous batching, pages as sequences grow, preemption, per-row
clocks and per-request sampling give every request what it gets alone."""

from __future__ import annotations

import numpy as np
import pytest

from lserve_jax.config import SparseConfig
from lserve_jax.engine import Engine, PromptTooLong
from lserve_jax.heads import HeadLayout
from lserve_jax.params import permute_kv_heads
from lserve_jax.sampling import SamplingParams
from lserve_jax.scheduler import RequestTooLarge, Scheduler

from .tiny import tiny_config, tiny_params

# selection really selects: 2 pages of 16 tokens out of up to 8, refreshed every 3 steps of each
# row's own clock; streaming heads keep 4 + 12 tokens
SPARSE = SparseConfig(page_size=16, logical_page_size=4, token_budget=32, selector_interval=3,
                      prefill_sink=4, prefill_local=24, decode_sink=4, decode_local=12)
CFG = tiny_config(max_position_embeddings=128)


def run_all(engine: Engine, requests, arrivals=None, check=True) -> dict[str, list[int]]:
    """Adds requests (id, prompt, sampling) at their arrival steps and steps to the end,
    checking page ownership after every step. Returns id -> tokens."""
    arrivals = arrivals or [0] * len(requests)
    out, step = {}, 0
    pending = sorted(zip(arrivals, range(len(requests))))
    while pending or engine.has_unfinished():
        while pending and pending[0][0] <= step:
            rid, prompt, sp = requests[pending.pop(0)[1]]
            engine.add_request(prompt, sp, request_id=rid)
        for o in engine.step():
            if o.finished:
                out[o.request_id] = list(o.token_ids)
        if check:
            engine.scheduler.check()
        step += 1
        assert step < 2000, "the engine made no progress"
    return out


def make_requests(n, seed, *, sampled=False):
    rng = np.random.default_rng(seed)
    reqs = []
    for i in range(n):
        length = int(rng.integers(1, 60))
        prompt = [int(t) for t in rng.integers(1, CFG.vocab_size, length)]
        sp = SamplingParams(max_new_tokens=int(rng.integers(1, 24)), temperature=0.9 if sampled else 0.0,
                            top_k=20 if sampled else 0, seed=int(rng.integers(0, 2**62)))
        reqs.append((f"r{i}", prompt, sp))
    return reqs


@pytest.fixture(scope="module", params=["dense", "sparse"])
def model(request):
    params = tiny_params(CFG)
    if request.param == "dense":
        return params, HeadLayout.dense(CFG.num_layers, CFG.num_kv_heads), SparseConfig(page_size=16,
                                                                                    logical_page_size=4)
    # one retrieval and one streaming head per layer (weights permuted retrieval-first)
    perms = np.array([[1, 0], [0, 1]])
    return permute_kv_heads(params, CFG, perms), HeadLayout(2, (1, 1)), SPARSE


def alone(model, requests):
    """Each request on an engine of its own: one slot, whole-prompt prefill, no prefix cache."""
    params, layout, sparse = model
    eng = Engine(params, CFG, layout=layout, sparse=sparse, max_slots=1, prefill_chunk=None, prefix_cache=False,
                 decode_steps=1)
    return {rid: run_all(eng, [(rid, p, sp)])[rid] for rid, p, sp in requests}


def test_busy_batch_equals_each_request_alone(model):
    """10 requests arriving at random steps into 4 slots: requests wait, join mid-run and leave;
    every one's greedy tokens equal its tokens alone (per-row selection clocks, per-row pages)."""
    params, layout, sparse = model
    reqs = make_requests(10, seed=1)
    arrivals = list(np.random.default_rng(2).integers(0, 30, len(reqs)))
    eng = Engine(params, CFG, layout=layout, sparse=sparse, max_slots=4)
    got = run_all(eng, reqs, arrivals)
    assert eng.scheduler.preempted_total == 0
    assert got == alone(model, reqs)
    assert eng.scheduler.reclaimable_pages() == eng.scheduler.allocator.num_pages - 1


@pytest.mark.parametrize("preemption", ["auto", "recompute", "swap"])
def test_preempted_requests_give_their_tokens_alone(model, preemption):
    """The same requests with a pool of 9 pages (each request needs up to 6): requests get
    preempted. Swapped out and back, a request's cache is what it left, so its tokens are its
    tokens alone; recomputed, that holds for dense attention, while with streaming heads and
    page selection a recomputed cache follows prefill's masks (dense retrieval heads, the
    prefill window) where the first run decoded with selected pages and the decode ring, so
    later tokens may differ ("auto" swaps sparse layouts). Every page comes back."""
    params, layout, sparse = model
    reqs = make_requests(10, seed=1)
    arrivals = list(np.random.default_rng(2).integers(0, 30, len(reqs)))
    eng = Engine(params, CFG, layout=layout, sparse=sparse, max_slots=4, num_pages=10, preemption=preemption)
    got = run_all(eng, reqs, arrivals)
    assert eng.scheduler.preempted_total > 0, "the pool should force preemptions"
    ref = alone(model, reqs)
    if layout.is_dense or eng.preemption == "swap":
        assert got == ref
    else:
        assert {k: len(v) for k, v in got.items()} == {k: len(v) for k, v in ref.items()}
    assert eng.scheduler.reclaimable_pages() == 9


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(model):
    params, layout, sparse = model
    reqs = make_requests(6, seed=3, sampled=True)
    eng = Engine(params, CFG, layout=layout, sparse=sparse, max_slots=4)
    got = run_all(eng, reqs, arrivals=[0, 0, 1, 2, 5, 5])
    assert got == alone(model, reqs)


@pytest.mark.parametrize("preemption", ["swap", "recompute"])
def test_several_decode_steps_per_dispatch_give_the_tokens_of_single_steps(model, preemption):
    """decode_steps=3: three steps per program. Greedy and seeded sampled requests arriving at
    random steps into a pool that forces preemptions get their tokens alone (one step a
    dispatch), rows stop at their own token limits inside a dispatch (limits not multiples of 3),
    and every page comes back (page ownership checked after every step)."""
    params, layout, sparse = model
    if preemption == "recompute" and not layout.is_dense:
        pytest.skip("recompute is exact for dense layouts only (see the preemption test)")
    reqs = make_requests(5, seed=1) + make_requests(5, seed=4, sampled=True)
    reqs = [(f"{rid}-{i}", p, sp) for i, (rid, p, sp) in enumerate(reqs)]
    arrivals = list(np.random.default_rng(2).integers(0, 20, len(reqs)))
    eng = Engine(params, CFG, layout=layout, sparse=sparse, max_slots=4, num_pages=10, preemption=preemption,
                 decode_steps=3)
    got = run_all(eng, reqs, arrivals)
    assert eng.scheduler.preempted_total > 0, "the pool should force preemptions"
    assert got == alone(model, reqs)
    assert eng.scheduler.reclaimable_pages() == 9


def test_several_decode_steps_stop_at_eos_inside_a_dispatch(model):
    """An EOS sampled in the middle of a dispatch's steps ends the request there: the tokens the
    row computed after it are dropped, as one step a dispatch would never have run them."""
    params, layout, sparse = model
    reqs = make_requests(8, seed=5)
    ref = alone(model, reqs)
    counts = np.bincount([t for toks in ref.values() for t in toks[1:]], minlength=CFG.vocab_size)
    eos = int(np.argmax(counts))  # the commonest later token: some requests end on it mid-run
    cfg = tiny_config(max_position_embeddings=128, eos_token_ids=(eos,))
    outs = {}
    for steps in (1, 4):
        eng = Engine(params, cfg, layout=layout, sparse=sparse, max_slots=4, decode_steps=steps)
        outs[steps] = run_all(eng, reqs)
    assert outs[4] == outs[1]
    assert any(len(v) < len(ref[k]) for k, v in outs[1].items()), "EOS should end some request early"


def test_several_decode_steps_update_the_cache_in_place(model):
    """The loop carries the cache without a copy: the program's temporaries stay far below the
    cache (a copy of a GPU-sized pool would not fit beside it)."""
    import jax
    import jax.numpy as jnp

    params, layout, sparse = model
    eng = Engine(params, CFG, layout=layout, sparse=sparse, max_slots=4, num_pages=400, decode_steps=4)
    eng._build_cache()
    cache_bytes = sum(x.nbytes for x in jax.tree.leaves(eng._cache))
    z = jnp.zeros((4,), jnp.int32)
    compiled = eng._step.lower(eng.params, eng._cache, z, jnp.zeros((4,), bool), z, jnp.zeros((4, 2), jnp.uint32),
                               jnp.zeros(4, jnp.float32), z, jnp.ones(4, jnp.float32), table_pages=8, steps=4).compile()
    mem = compiled.memory_analysis()
    assert mem.alias_size_in_bytes >= cache_bytes  # donated: the output cache is the input's buffers
    assert mem.temp_size_in_bytes < cache_bytes / 4


def test_decode_steps_must_be_a_positive_integer(model):
    params, layout, sparse = model
    for bad in (0, -2, 1.5, True, "four"):
        with pytest.raises(ValueError, match="decode_steps"):
            Engine(params, CFG, layout=layout, sparse=sparse, decode_steps=bad)


def test_generate_runs_more_prompts_than_slots():
    params = tiny_params(CFG)
    eng = Engine(params, CFG, sparse=SparseConfig(page_size=16, logical_page_size=4), max_slots=2)
    prompts = [[5, 6, 7], list(range(10, 30)), [1, 2, 3, 4], [9] * 40, [3, 1, 4, 1, 5]]
    sp = SamplingParams(max_new_tokens=5)
    batch = eng.generate(prompts, sp)
    single = Engine(params, CFG, sparse=SparseConfig(page_size=16, logical_page_size=4))
    for p, g in zip(prompts, batch):
        assert g.token_ids == single.generate([p], sp)[0].token_ids


def test_abort_frees_slot_and_pages_at_once():
    eng = Engine(tiny_params(CFG), CFG, sparse=SparseConfig(page_size=16, logical_page_size=4), max_slots=2,
                 num_pages=9)
    a = eng.add_request(list(range(1, 40)), SamplingParams(max_new_tokens=30))
    b = eng.add_request([4, 5, 6], SamplingParams(max_new_tokens=30))
    c = eng.add_request([7, 8], SamplingParams(max_new_tokens=3))  # waits: two slots
    for _ in range(3):
        eng.step()
    assert eng.abort(a) and not eng.abort("nope")
    eng.scheduler.check()
    assert eng.scheduler.slots.count(None) == 1
    outs = {}
    while eng.has_unfinished():
        for o in eng.step():
            outs[o.request_id] = o
        eng.scheduler.check()
    assert outs[c].finished and outs[c].finish_reason == "length" and len(outs[c].token_ids) == 3
    assert outs[b].finished and len(outs[b].token_ids) == 30
    assert eng.scheduler.reclaimable_pages() == 8


def test_requests_that_can_never_fit_are_rejected_and_the_rest_run():
    eng = Engine(tiny_params(CFG), CFG, sparse=SparseConfig(page_size=16, logical_page_size=4), max_slots=2,
                 num_pages=4)  # 3 usable pages: 48 tokens
    with pytest.raises(RequestTooLarge, match="needs 4 pages"):
        eng.add_request(list(range(1, 40)), SamplingParams(max_new_tokens=20))
    with pytest.raises(PromptTooLong, match="limit is 128"):
        eng.add_request([1] * 128, SamplingParams(max_new_tokens=4))
    rid = eng.add_request([1, 2, 3], SamplingParams(max_new_tokens=4))
    assert run_all(eng, [])[rid] and not eng.has_unfinished()


def test_max_new_tokens_past_the_context_stops_at_the_context():
    eng = Engine(tiny_params(CFG), CFG, sparse=SparseConfig(page_size=16, logical_page_size=4), max_slots=2)
    rid = eng.add_request([1] * 120, SamplingParams(max_new_tokens=50, ignore_eos=True))
    assert len(run_all(eng, [])[rid]) == 8  # 128 positions in all


def test_ignore_eos_runs_to_the_token_limit():
    params = tiny_params(CFG)
    base = Engine(params, CFG).generate([[5, 6, 7]], SamplingParams(max_new_tokens=6))[0]
    import dataclasses

    eos_cfg = dataclasses.replace(CFG, eos_token_ids=(base.token_ids[0],))
    eng = Engine(params, eos_cfg)
    assert eng.generate([[5, 6, 7]], SamplingParams(max_new_tokens=6))[0].finish_reason == "eos"
    got = eng.generate([[5, 6, 7]], SamplingParams(max_new_tokens=6, ignore_eos=True))[0]
    assert got.token_ids == base.token_ids and got.finish_reason == "length"


def test_no_recompilation_in_steady_state():
    """After `warmup` (every admission batch size and prompt bucket up to 64 tokens), 50
    requests arriving at random compile nothing."""
    eng = Engine(tiny_params(CFG), CFG, sparse=SparseConfig(page_size=16, logical_page_size=4), max_slots=4)
    eng.warmup(max_prompt_tokens=64)
    sizes = (eng._prefill._cache_size(), eng._step._cache_size())
    assert sizes == (3 * 3, 1)  # batches 1, 2, 4 x buckets 16, 32, 64
    reqs = [(f"b{i}", p, sp) for i, (_, p, sp) in enumerate(make_requests(50, seed=6))]
    run_all(eng, reqs, arrivals=list(np.random.default_rng(7).integers(0, 40, 50)), check=False)
    assert (eng._prefill._cache_size(), eng._step._cache_size()) == sizes
    assert eng._step._cache_size() == 1


def prefill_all(s: Scheduler) -> None:
    """What the engine does after admitting: dispatch every prompt's chunks."""
    while chunk := s.next_prefill():
        for c in chunk:
            s.chunk_dispatched(c)


def test_whole_prompt_batches_stay_within_the_token_budget():
    """Without chunks, whole prompts are batched only while their padded tokens fit
    `batch_tokens`; a prompt longer than the budget goes alone (never 16 x 128K in one prefill)."""
    s = Scheduler(num_slots=8, num_pages=200, page_size=4, max_tokens=256, batch_tokens=64)
    reqs = [s.add(f"r{i}", [1] * n, SamplingParams(max_new_tokens=1)) for i, n in enumerate([30, 30, 30, 100, 9])]
    assert s.admit() == reqs
    plan = []
    while rows := s.next_prefill():
        plan.append([(c.request.request_id, c.count) for c in rows])
        for c in rows:
            s.chunk_dispatched(c)
    assert plan == [[("r0", 30), ("r1", 30)], [("r2", 30)], [("r3", 100)], [("r4", 9)]]
    s.check()


def test_scheduler_preempts_the_youngest_and_requeues_it_first():
    s = Scheduler(num_slots=3, num_pages=4, page_size=4, max_tokens=64)  # 3 usable pages
    a = s.add("a", [1] * 4, SamplingParams(max_new_tokens=8))
    b = s.add("b", [1] * 3, SamplingParams(max_new_tokens=8))
    c = s.add("c", [1] * 2, SamplingParams(max_new_tokens=8))
    assert s.admit() == [a, b]  # c waits: admitting it would leave no spare page
    s.check()
    prefill_all(s)
    assert s.grow() == [] and len(a.pages) == 2  # a's next token (position 4) opens its 2nd page
    b.cached += 1  # b's next token (position 4) needs a page too: none is free
    assert s.grow() == [b] and b.status == "waiting" and b.preemptions == 1
    assert list(s.waiting) == [b, c] and len(a.pages) == 2 and s.allocator.free_pages == 1
    s.check()
    s.finish(a, "length")
    assert s.admit() == [b, c] and s.allocator.free_pages == 1
    s.check()
