"""Head-pattern calibration on a tiny random model: the gated forward's semantics, a few Adam
steps lower the loss, the attention-mass baseline, the TSV round trip and the CLI end to end."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lserve_jax import calibrate as cal
from lserve_jax.calibrate import gated
from lserve_jax.evals import byte_encoder, forward_hidden, token_nll
from lserve_jax.heads import binarize, layout_and_permutation, load_pattern
from lserve_jax.params import init_params, permute_kv_heads

from .tiny import tiny_config

CFG = tiny_config(vocab_size=256, max_position_embeddings=1024)  # byte-level prompts
ENCODE = byte_encoder(CFG.vocab_size)
QUICK = cal.CalibConfig(sink=4, local=16, lengths=(384,), num_keys=2, steps=6, lr=0.1, reg=0.05, refine_band=0)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0), jnp.float32, scale=0.3)


def test_binary_gates_equal_the_sparse_prefill_model(params):
    """gated_hidden with 0/1 gates (original head order) == the library's prefill_attention on
    the retrieval-first permuted weights; gates all 1 == dense."""
    retrieval = np.array([[False, True], [True, False]])
    layout, perms = layout_and_permutation(retrieval)
    toks = jax.random.randint(jax.random.key(1), (1, 48), 0, CFG.vocab_size)
    gated = cal.gated_hidden(params, toks, CFG, jnp.asarray(retrieval, jnp.float32), sink=4, local=8)
    lib = forward_hidden(permute_kv_heads(params, CFG, perms), toks, CFG, layout, sink=4, local=8)
    np.testing.assert_allclose(gated, lib, atol=2e-5, rtol=2e-5)
    dense = forward_hidden(params, toks, CFG)
    np.testing.assert_allclose(cal.gated_hidden(params, toks, CFG, jnp.ones((2, 2)), sink=4, local=8), dense,
                               atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(cal.gated_hidden(params, toks, CFG, None, sink=4, local=8), dense,
                               atol=2e-5, rtol=2e-5)
    assert float(jnp.max(jnp.abs(gated - dense))) > 1e-3  # the streaming heads do change the output


@pytest.mark.parametrize("t,sink,local,block", [(100, 4, 16, 16), (64, 0, 8, 16), (37, 8, 64, 8), (96, 20, 10, 32),
                                                (50, 4, 1, 7), (40, 3, 5, 64)])
def test_blocked_gated_attention_equals_the_dense_reference(t, sink, local, block, monkeypatch):
    """gated_attention (blocks that read only the keys they may see) == the two [T, T] attentions
    of `two_attentions` mixed by the gates, in value and in the gradient on the gates, q, k, v."""
    monkeypatch.setattr(gated, "STREAM_BLOCK", 8)  # streaming blocks smaller than the full ones
    kq, kk, kv = jax.random.split(jax.random.key(t + sink), 3)
    q = 2.0 * jax.random.normal(kq, (2, t, 4, 8))
    k = 2.0 * jax.random.normal(kk, (2, t, 2, 8))
    v = jax.random.normal(kv, (2, t, 2, 8))
    gate = jnp.array([0.3, 1.0])

    def ref(q, gate):
        o_full, o_stream, _ = cal.two_attentions(q, k, v, sink, local)
        a = gate[None, None, :, None, None]
        return a * o_full + (1.0 - a) * o_stream

    got = cal.gated_attention(q, k, v, gate, sink, local, block)
    np.testing.assert_allclose(got, ref(q, gate), atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(cal.gated_attention(q, k, v, None, sink, local, block),
                               cal.two_attentions(q, k, v, sink, local, stream=False)[0], atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(cal.gated_attention(q, k, v, jnp.zeros(2), sink, local, block),
                               cal.two_attentions(q, k, v, sink, local)[1], atol=2e-5, rtol=2e-5)
    for binary in [(True, False), (False, True), (True, True), (False, False)]:  # binary gates: lax.cond per head
        np.testing.assert_allclose(cal.gated_attention(q, k, v, jnp.asarray(binary), sink, local, block),
                                   ref(q, jnp.asarray(binary, jnp.float32)), atol=2e-5, rtol=2e-5)
    w = jax.random.normal(jax.random.key(7), got.shape)
    loss = lambda f: lambda q, gate: jnp.sum(w * f(q, gate))  # noqa: E731
    g_got = jax.grad(loss(lambda q, g: cal.gated_attention(q, k, v, g, sink, local, block)), argnums=(0, 1))(q, gate)
    g_ref = jax.grad(loss(ref), argnums=(0, 1))(q, gate)
    for a, b in zip(g_got, g_ref):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)

    def mixed(k, v):  # the gradient on k and v too (the custom backward pass)
        o_full, o_stream, _ = cal.two_attentions(q, k, v, sink, local)
        a = gate[None, None, :, None, None]
        return jnp.sum(w * (a * o_full + (1.0 - a) * o_stream))
    g_got = jax.grad(lambda k, v: jnp.sum(w * cal.gated_attention(q, k, v, gate, sink, local, block)), argnums=(0, 1))(k, v)
    for a, b in zip(g_got, jax.grad(mixed, argnums=(0, 1))(k, v)):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_samples_have_exact_length_and_answer_span():
    samples = cal.make_samples(ENCODE, QUICK, 3)
    for tokens, span, context in samples:
        assert tokens.shape == span.shape == context.shape == (384,)
        n = int(span.sum())
        assert n > 0 and span[-1] == 0
        first = int(np.argmax(span))
        assert np.all(span[first:first + n] == 1)  # one contiguous span, ending at T - 2
        assert first + n == 383
        # the context term: every prompt position past the window, none of the answer span
        start = QUICK.sink + QUICK.local
        assert np.all(context[:start] == 0) and np.all(context[start:first] == 1) and np.all(context[first:] == 0)


def test_text_haystack_samples_hide_the_keys_in_the_text():
    text = ENCODE("Call me Ishmael. Some years ago, never mind how long precisely, I went to sea. " * 40)
    cc = dataclasses.replace(QUICK, haystack="text")
    samples = cal.make_samples(ENCODE, cc, 4, text)
    filler = cal.make_samples(ENCODE, QUICK, 1)[0][0]
    for tokens, _, _ in samples:
        assert tokens.shape == (384,)
        body = bytes(int(t) - 1 for t in tokens).decode(errors="replace")
        assert "Ishmael" in body or "precisely" in body
        assert "yellow" not in body and body.count("The pass key number") == QUICK.num_keys
    assert "yellow" in bytes(int(t) - 1 for t in filler).decode(errors="replace")
    starts = {bytes(int(t) - 1 for t in s[0][150:170]) for s in samples}
    assert len(starts) > 1  # random offsets into the text
    with pytest.raises(ValueError, match="haystack"):
        cal.make_samples(ENCODE, cc, 1, text[:100])
    mixed = cal.make_samples(ENCODE, dataclasses.replace(QUICK, haystack="mixed"), 4, text)
    kinds = ["yellow" in bytes(int(t) - 1 for t in m[0]).decode(errors="replace") for m in mixed]
    assert kinds == [True, False, True, False]  # filler and text alternate


def test_text_weight_adds_the_context_term(params):
    """text_weight 0 == answer span only; > 0 adds a nonnegative term once gates move off 1."""
    base = dataclasses.replace(QUICK, steps=3)
    a = cal.calibrate(params, CFG, ENCODE, base, log=None)
    b = cal.calibrate(params, CFG, ENCODE, dataclasses.replace(base, text_weight=1.0), log=None)
    assert a.curve[0]["distill"] == pytest.approx(0.0, abs=1e-8) == b.curve[0]["distill"]
    assert b.curve[1]["distill"] > a.curve[1]["distill"]  # same first update, extra positive term
    with pytest.raises(ValueError, match="text_weight"):
        cal.CalibConfig(text_weight=-1.0)
    with pytest.raises(ValueError, match="haystack"):
        cal.CalibConfig(haystack="novel")


def test_gradient_calibration_lowers_the_loss(params):
    res = cal.calibrate(params, CFG, ENCODE, QUICK, log=None)
    losses = [c["loss"] for c in res.curve]
    assert len(losses) == QUICK.steps
    assert losses[-1] < losses[0]
    assert res.alpha.shape == (CFG.num_layers, CFG.num_kv_heads)
    assert np.all((res.alpha >= 0) & (res.alpha <= 1))
    assert len(np.unique(res.alpha)) == res.alpha.size  # ties broken: any sparsity splits cleanly
    assert binarize(res.alpha, 0.5).sum() == 2
    assert res.to_json()["curve"][0]["distill"] == pytest.approx(0.0, abs=1e-8)  # gates start at 1


TEXT = ENCODE("Call me Ishmael. Some years ago, never mind how long precisely, I went to sea. " * 12)
REFINE = dataclasses.replace(QUICK, refine_band=2, refine_samples=2, refine_length=600)  # 3 attention blocks


def test_refine_samples_are_held_out_text_weighted_past_the_window():
    samples = cal.refine_samples(REFINE, TEXT)
    assert len(samples) == REFINE.refine_samples
    joined = " ".join(map(str, TEXT))
    for tokens, w in samples:
        assert tokens.shape == w.shape == (600,)
        assert " ".join(map(str, tokens)) in joined  # a run of the haystack
        assert np.all(w[:REFINE.sink + REFINE.local] == 0) and np.all(w[REFINE.sink + REFINE.local:] == 1)
    wide = cal.refine_samples(dataclasses.replace(REFINE, refine_local=40), TEXT)
    assert int(np.argmax(wide[0][1])) == REFINE.sink + 40  # the refinement's own window
    assert cal.refine_samples(REFINE, TEXT)[1][0].tolist() == samples[1][0].tolist()  # seeded
    with pytest.raises(ValueError, match="fewer than 600"):
        cal.refine_samples(REFINE, TEXT[:500])


def _pattern_nll(params, retrieval, samples, cc) -> float:
    """Mean weighted NLL through the library's sparse prefill path (permuted weights)."""
    layout, perms = layout_and_permutation(retrieval)
    p = permute_kv_heads(params, CFG, perms)
    out = []
    for tokens, w in samples:
        nll = token_nll(p, jnp.asarray(tokens)[None], CFG, layout, sink=cc.sink, local=cc.local)[0]
        out.append(float(jnp.sum(nll * w[:-1]) / np.sum(w[:-1])))
    return float(np.mean(out))


def test_refine_boundary_streams_the_cheapest_heads_of_the_band(params):
    alpha = np.array([[0.2, 0.9], [0.6, 0.4]])  # streaming at 0.5: (0, 0) and (1, 1)
    new, rep = cal.refine_boundary(params, CFG, ENCODE, alpha, REFINE, haystack=TEXT, log=None)
    assert sorted(rep["band"]) == [0, 1, 2, 3]  # band 2 on each side = every head here
    np.testing.assert_array_equal(np.sort(new.ravel()), np.sort(alpha.ravel()))  # the same gate values
    samples = cal.refine_samples(REFINE, TEXT)
    base = binarize(alpha, 0.5)
    assert rep["base_nll"] == pytest.approx(_pattern_nll(params, base, samples, REFINE), rel=1e-4)
    cost = {}
    for h, c in zip(rep["band"], rep["cost"]):  # each cost against an independent measurement
        m = base.copy().ravel()
        m[h] = ~m[h]
        flipped = _pattern_nll(params, m.reshape(2, 2), samples, REFINE)
        cost[h] = flipped - rep["base_nll"] if base.ravel()[h] else rep["base_nll"] - flipped
        assert c == pytest.approx(cost[h], abs=1e-4)
    per_window = np.asarray(rep["window_cost"])
    assert per_window.shape == (REFINE.refine_samples, 4)
    np.testing.assert_allclose(per_window.mean(0), rep["cost"], atol=1e-7)
    assert np.ptp(per_window, axis=0).max() > 0  # two windows, two measurements
    order = sorted(cost, key=cost.get)
    assert sorted(np.flatnonzero(~binarize(new, 0.5))) == sorted(order[:2])  # the cheapest half streams
    assert sorted(rep["moved"]) == sorted(set(order[:2]) ^ {0, 3})
    assert list(np.argsort(new.ravel())) == order  # gates follow the cost order inside the band


def test_rerank_band_keeps_gates_outside_the_band():
    alpha = np.array([[0.05, 0.9, 0.3], [0.6, 0.4, 0.95]])
    retrieval, band = cal.boundary_band(alpha, 0.5, 1)
    assert sorted(band) == [3, 4]  # the highest streaming gate (0.4) and the lowest retrieval gate (0.6)
    new = cal.rerank_band(alpha, band, [0.01, -0.01])  # the retrieval head (3) is cheaper to stream
    assert new[1, 0] == 0.4 and new[1, 1] == 0.6
    np.testing.assert_array_equal(np.delete(new.ravel(), band), np.delete(alpha.ravel(), band))
    assert binarize(new, 0.5).sum() == binarize(alpha, 0.5).sum() == 3
    assert (binarize(new, 0.75) == binarize(alpha, 0.75)).all()  # a cut outside the band does not move
    _, wide = cal.boundary_band(alpha, 0.5, 10)
    assert len(wide) == 6  # limited by the heads on each side


def test_calibrate_refines_and_reports_it(params):
    cc = dataclasses.replace(REFINE, refine_band=1, steps=2)
    res = cal.calibrate(params, CFG, ENCODE, cc, haystack=TEXT, log=None)
    assert res.refine is not None and len(res.refine["band"]) == 2 and len(res.refine["cost"]) == 2
    np.testing.assert_array_equal(np.sort(res.alpha.ravel()), np.sort(np.asarray(res.refine["alpha_before"]).ravel()))
    assert json.loads(json.dumps(res.to_json()))["refine"]["sparsity"] == 0.5
    mass = cal.calibrate(params, CFG, ENCODE, dataclasses.replace(cc, method="attention-mass", steps=1), log=None)
    assert mass.refine is None  # the baseline stays unrefined
    for bad in (dict(refine_band=-1), dict(refine_sparsity=1.0), dict(refine_samples=0),
                dict(refine_band=1, refine_length=20)):
        with pytest.raises(ValueError, match="refine"):
            dataclasses.replace(QUICK, **bad)


def test_break_ties_orders_clipped_gates_at_any_sparsity():
    alpha = np.array([[0.0, 0.0, 0.0, 0.7], [1.0, 1.0, 0.3, 0.0]])
    sec = np.array([[3.0, 1.0, 2.0, 0.0], [5.0, 4.0, 0.0, 9.0]])
    out = cal.break_ties(alpha, sec)
    assert np.all((out >= 0) & (out <= 1)) and len(np.unique(out)) == out.size
    np.testing.assert_allclose(out, alpha, atol=2e-6)
    assert list(np.argsort(out[0, :3])) == [1, 2, 0]  # the zeros ordered by the secondary key
    assert out[1, 0] > out[1, 1] and out[1, 3] > out[0, 0]
    for s in (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875):
        assert binarize(out, s).sum() == round(8 * (1 - s))


def test_attention_mass_scores(params):
    cc = cal.CalibConfig(method="attention-mass", sink=4, local=16, lengths=(384,), num_keys=2, steps=2)
    res = cal.calibrate(params, CFG, ENCODE, cc, log=None)
    assert res.alpha.shape == (2, 2)
    assert np.all((res.alpha > 0) & (res.alpha < 1))  # answer queries at ~380 see far past 4 + 16
    wide = cal.calibrate(params, CFG, ENCODE, cal.CalibConfig(method="attention-mass", sink=4, local=1024,
                                                                lengths=(384,), num_keys=2, steps=1), log=None)
    np.testing.assert_allclose(wide.alpha, 0.0, atol=1e-6)  # nothing outside a window that covers all


def test_config_validation():
    with pytest.raises(ValueError, match="method"):
        cal.CalibConfig(method="nope")
    with pytest.raises(ValueError, match="local"):
        cal.CalibConfig(local=0)


def test_pattern_tsv_round_trip(tmp_path):
    alpha = np.random.default_rng(0).random((5, 3))
    alpha[0, 0], alpha[1, 1] = 0.0, 1.0
    path = cal.write_pattern_atomic(tmp_path / "sub" / "head_pattern.tsv", alpha)
    np.testing.assert_array_equal(load_pattern(path), alpha)
    assert sorted(p.name for p in path.parent.iterdir()) == ["head_pattern.tsv"]  # no temp file left
    cal.write_pattern_atomic(path, alpha * 0.5)  # overwrite in place
    np.testing.assert_array_equal(load_pattern(path), alpha * 0.5)


def write_tiny_checkpoint(dest, params, cfg) -> None:
    """A converted checkpoint of `params` with a byte-level BPE tokenizer (no merges: one token
    per byte), enough for the CLIs that build prompts and read text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from lserve_jax.checkpoint import atomic_directory, write_checkpoint

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    with atomic_directory(dest) as tmp:
        write_checkpoint(tmp, params, cfg, "float32", tokenizer_files={"tokenizer.json": tok.to_str()})


def test_cli_writes_pattern_with_checkpoint(params, tmp_path, capsys):
    from lserve_jax.checkpoint import open_checkpoint

    dest = tmp_path / "ckpt"
    write_tiny_checkpoint(dest, params, CFG)
    rc = cal.main([str(dest), "--steps", "2", "--lengths", "384", "--sink", "4", "--local", "16",
                   "--num-keys", "2", "--refine-band", "0"])
    assert rc == 0
    ckpt = open_checkpoint(dest)
    assert ckpt.head_pattern().shape == (2, 2)
    curve = json.loads((dest / "head_pattern.json").read_text())
    assert len(curve["curve"]) == 2 and curve["config"]["local"] == 16
    assert curve["device"] == "CPU" and curve["cpu_cores"] >= 1  # what bench/accuracy.py reports the time against
    assert "step 2/2" in capsys.readouterr().out
    out = tmp_path / "elsewhere.tsv"
    assert cal.main([str(dest), "--method", "attention-mass", "--steps", "1", "--lengths", "384",
                     "--output", str(out)]) == 0
    assert load_pattern(out).shape == (2, 2)
    text = tmp_path / "haystack.txt"
    text.write_text("It was the best of times, it was the worst of times. " * 20)
    assert cal.main([str(dest), "--steps", "1", "--lengths", "384", "--sink", "4", "--local", "16",
                     "--haystack", "text", "--text", str(text), "--output", str(out), "--refine-band", "0"]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["config"]["haystack"] == "text"
    # the refinement (filler samples, --text for the refinement only), then refinement alone
    assert cal.main([str(dest), "--steps", "2", "--lengths", "384", "--sink", "4", "--local", "16",
                     "--text", str(text), "--refine-band", "1", "--refine-length", "200", "--refine-samples", "1",
                     "--output", str(out)]) == 0
    rec = json.loads(out.with_suffix(".json").read_text())
    assert rec["config"]["refine_length"] == 200 and len(rec["refine"]["band"]) == 2
    assert "boundary heads changed side" in capsys.readouterr().out
    refined = tmp_path / "refined.tsv"
    assert cal.main([str(dest), "--from-pattern", str(out), "--sink", "4", "--local", "16", "--text", str(text),
                     "--refine-band", "1", "--refine-length", "200", "--refine-samples", "1",
                     "--output", str(refined)]) == 0
    rec = json.loads(refined.with_suffix(".json").read_text())
    assert rec["curve"] == [] and rec["from_pattern"] == str(out)
    np.testing.assert_array_equal(np.sort(load_pattern(refined).ravel()), np.sort(load_pattern(out).ravel()))
    bad_pattern = tmp_path / "bad.tsv"
    bad_pattern.write_text("1\t0\t1\n")
    text.write_text("Too short. " * 5)
    for bad in (["--haystack", "text", "--text", str(text), "--refine-band", "0"],
                ["--haystack", "filler", "--text", str(text), "--refine-band", "0"],
                ["--text", str(text), "--refine-length", "200"],  # too short for the refinement
                ["--refine-length", "4096"],  # past the model context (1024)
                ["--from-pattern", str(bad_pattern)], ["--from-pattern", str(tmp_path / "none.tsv")],
                ["--from-pattern", str(out), "--refine-band", "0"],
                ["--haystack", "text", "--text", str(tmp_path / "missing.txt")]):
        with pytest.raises(SystemExit) as e:
            rc = cal.main([str(dest), "--steps", "1", "--lengths", "384", "--output", str(out), *bad])
            raise SystemExit(rc)
        assert e.value.code == 2
