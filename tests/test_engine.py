"""Host-side engine pieces: length buckets, sampling knobs and sampling, stop
strings, and `Engine.generate` on a tiny random model (token-id prompts, no tokenizer)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lserve_jax.engine import Engine, length_bucket
from lserve_jax.sampling import SamplingParams, sample

from .tiny import TINY, TINY_SPARSE, tiny_config, tiny_params

CFG = TINY
SPARSE = TINY_SPARSE
PROMPTS = [[5, 6, 7], list(range(10, 30)), [1, 2, 3, 4, 5, 6, 7, 8, 9]]  # 3 lengths, 2 length buckets


@pytest.fixture(scope="module")
def engine(params):
    return Engine(params, CFG, sparse=SPARSE)


@pytest.fixture(scope="module")
def text_engine(params, word_tokenizer):
    return Engine(params, CFG, sparse=SPARSE, tokenizer=word_tokenizer)


# --- length_bucket -------------------------------------------------------------------------

@pytest.mark.parametrize("n, page, cap, want", [
    (0, 16, 256, 16), (1, 16, 256, 16), (16, 16, 256, 16), (17, 16, 256, 32), (64, 16, 256, 64),
    (65, 16, 256, 128), (200, 16, 256, 256), (300, 16, 256, 256), (3, 64, 8192, 64),
])
def test_length_bucket(n, page, cap, want):
    assert length_bucket(n, page, cap) == want


# --- SamplingParams ------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, field", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-0.1), "temperature"),
    (dict(top_k=-1), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
])
def test_sampling_params_rejects(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_sampling_params_accepts_edges():
    SamplingParams(max_new_tokens=1, temperature=0.0, top_k=0, top_p=1.0)
    SamplingParams(top_p=1e-9, top_k=1, temperature=5.0)


# --- sample() ------------------------------------------------------------------------------

LOGITS = jax.random.normal(jax.random.key(1), (8, 128), jnp.float32) * 3


def _sample(logits, seed, temperature=1.0, top_k=0, top_p=1.0):
    return np.asarray(jax.jit(sample)(logits, jax.random.key(seed), jnp.float32(temperature),
                                      jnp.int32(top_k), jnp.float32(top_p)))


def test_greedy_is_argmax():
    np.testing.assert_array_equal(_sample(LOGITS, 0, temperature=0.0), np.argmax(LOGITS, -1))


@pytest.mark.parametrize("seed", range(3))
def test_top_k_1_is_greedy(seed):
    np.testing.assert_array_equal(_sample(LOGITS, seed, temperature=1.0, top_k=1), np.argmax(LOGITS, -1))


@pytest.mark.parametrize("seed", range(3))
def test_tiny_top_p_is_greedy(seed):
    # the most likely token alone already exceeds the mass 1e-6: only it survives
    np.testing.assert_array_equal(_sample(LOGITS, seed, temperature=1.0, top_p=1e-6), np.argmax(LOGITS, -1))


def test_seeded_sample_is_reproducible_and_random():
    flat = jnp.zeros((256, 128), jnp.float32)  # uniform: any token is equally likely
    a, b = _sample(flat, 7), _sample(flat, 7)
    np.testing.assert_array_equal(a, b)
    assert len(set(a.tolist())) > 50, "a uniform distribution should give many distinct tokens"
    assert not np.array_equal(a, _sample(flat, 8)), "another seed should give another sample"


def test_top_k_keeps_only_the_k_best():
    rows = jnp.broadcast_to(LOGITS[:1], (512, 128))
    got = set(_sample(rows, 3, temperature=5.0, top_k=4).tolist())  # hot: would spread widely
    assert got <= set(np.argsort(-np.asarray(LOGITS[0]))[:4].tolist())
    assert len(got) > 1


# --- stop strings --------------------------------------------------------------------------

def test_cut_at_stop_takes_the_earliest_stop():
    assert Engine._cut_at_stop("abc STOP def END", ("END", "STOP")) == "abc "
    assert Engine._cut_at_stop("no stop here", ("END",)) == "no stop here"


def test_stop_string_ends_generation(text_engine):
    """Generating with a stop string that is the text of the 3rd greedy token stops at that
    token's first occurrence, reports "stop" and cuts the text before the stop string."""
    free = text_engine.generate([PROMPTS[1]], SamplingParams(max_new_tokens=12))[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 12
    stop = text_engine.tokenizer.decode([free.token_ids[2]])
    first = free.token_ids.index(free.token_ids[2])
    got = text_engine.generate([PROMPTS[1]], SamplingParams(max_new_tokens=12, stop=(stop,)))[0]
    assert got.finish_reason == "stop"
    assert got.token_ids == free.token_ids[: first + 1]
    assert stop not in got.text
    assert got.text == text_engine.tokenizer.decode(free.token_ids)[: len(got.text)]


def test_stop_in_one_sequence_does_not_stop_the_others(text_engine):
    alone = [text_engine.generate([p], SamplingParams(max_new_tokens=8))[0] for p in PROMPTS[:2]]
    stop = text_engine.tokenizer.decode([alone[0].token_ids[0]])
    assert stop not in text_engine.tokenizer.decode(alone[1].token_ids), "pick prompts with other tokens"
    got = text_engine.generate(PROMPTS[:2], SamplingParams(max_new_tokens=8, stop=(stop,)))
    assert got[0].finish_reason == "stop" and got[0].token_ids == alone[0].token_ids[:1]
    assert got[1].finish_reason == "length" and got[1].token_ids == alone[1].token_ids


# --- generate ------------------------------------------------------------------------------

def test_generate_token_ids_runs_to_length(engine):
    out = engine.generate(PROMPTS, SamplingParams(max_new_tokens=7))
    assert len(out) == len(PROMPTS)
    for g, p in zip(out, PROMPTS):
        assert len(g.token_ids) == 7 and g.finish_reason == "length"
        assert g.prompt_tokens == len(p)
        assert g.text == ""  # no tokenizer
        assert all(0 <= t < CFG.vocab_size for t in g.token_ids)
    assert engine.last_stats.generated_tokens == 7 * len(PROMPTS)
    assert engine.last_stats.prompt_tokens == sum(map(len, PROMPTS))


def test_batch_equals_each_prompt_alone(engine):
    """Padding the batch (3 -> 4 rows) and the prompts (to a length bucket) changes nothing."""
    sp = SamplingParams(max_new_tokens=6)
    batch = engine.generate(PROMPTS, sp)
    for p, g in zip(PROMPTS, batch):
        assert engine.generate([p], sp)[0].token_ids == g.token_ids


def test_generate_is_deterministic_and_pages_are_returned(engine):
    sp = SamplingParams(max_new_tokens=5, temperature=1.0, seed=11)
    a = engine.generate(PROMPTS[:2], sp)
    sched = engine.scheduler
    free_after = sched.reclaimable_pages()
    b = engine.generate(PROMPTS[:2], sp)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    # every page went back (to the free list or the prefix cache)
    assert sched.reclaimable_pages() == free_after == sched.allocator.num_pages - 1
    assert engine.last_stats.prefix_hit_tokens > 0  # the second run reused the first's prompt pages


def test_eos_ends_a_sequence(params):
    """With the first greedy token declared EOS, the sequence ends at once with reason "eos"."""
    base = Engine(params, CFG, sparse=SPARSE).generate([PROMPTS[0]], SamplingParams(max_new_tokens=4))[0]
    eos_cfg = dataclasses.replace(CFG, eos_token_ids=(base.token_ids[0],))
    got = Engine(params, eos_cfg, sparse=SPARSE).generate([PROMPTS[0]], SamplingParams(max_new_tokens=4))[0]
    assert got.finish_reason == "eos" and got.token_ids == []


def test_streaming_callback_sees_every_token(engine):
    seen = []
    out = engine.generate(PROMPTS[:2], SamplingParams(max_new_tokens=4), on_token=lambda i, t: seen.append((i, t)))
    for i, g in enumerate(out):
        assert [t for j, t in seen if j == i] == g.token_ids


def test_repeated_calls_do_not_recompile(params):
    """Same batch size and length bucket: one prefill and one decode program, from the first call
    on (the fresh cache must look like the ones the programs return, or prefill compiles twice)."""
    eng = Engine(params, CFG, sparse=SPARSE)
    for p in ([1, 2, 3], [4, 5, 6, 7, 8]):  # same bucket
        eng.generate([p], SamplingParams(max_new_tokens=3))
    assert eng._prefill._cache_size() == 1
    assert eng._step._cache_size() == 1


def test_token_ids_outside_the_vocabulary_are_rejected():
    cfg = tiny_config(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1)
    eng = Engine(tiny_params(cfg, scale=0.02), cfg, max_seq_len=128)
    for bad in ([[64, 1]], [[-1, 3]]):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            eng.generate(bad, SamplingParams(max_new_tokens=1))


def test_progress_callbacks_wait_for_their_layer(params):
    """Each prefill progress callback takes an operand computed by its layer, so XLA cannot run
    them all at the start of the program (the bar used to jump to the end, then sit there)."""
    import functools

    from lserve_jax import cache as kvc
    from lserve_jax.heads import HeadLayout
    from lserve_jax.model import ModelSpec, prefill

    layout = HeadLayout.dense(CFG.num_layers, CFG.num_kv_heads)
    spec = ModelSpec(CFG, layout, SPARSE)
    cache = kvc.init_cache(CFG, layout, SPARSE, batch=1, num_pages=3, max_pages_per_seq=2, dtype=jnp.float32)
    fn = functools.partial(prefill, spec=spec, on_layer=lambda i: None)
    jaxpr = jax.make_jaxpr(fn)(params, cache, jnp.zeros((1, 16), jnp.int32), jnp.array([5], jnp.int32))
    calls = [e for e in jaxpr.eqns if "callback" in e.primitive.name]
    assert len(calls) == CFG.num_layers
    for e in calls:
        assert all(type(v).__name__ != "Literal" for v in e.invars), "a callback with constant operands"


def test_stats_line_reports_tokens_per_second(engine):
    engine.generate(PROMPTS, SamplingParams(max_new_tokens=6))
    line = engine.last_stats.line()
    assert "tok/s" in line and engine.last_stats.decode_tokens == 4 * len(PROMPTS)
