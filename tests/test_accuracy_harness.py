"""The accuracy harness (`lserve_jax.evals`): token-exact passkey prompts, the shipped text,
perplexity against the dense reference forward, a two-cell smoke run of the grid through the
engine, the teacher-forced proxy (tiny model); and bench/accuracy.py end to end, resume included."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lserve_jax.calibrate import gated_hidden
from lserve_jax.config import SparseConfig
from lserve_jax.engine import Engine
from lserve_jax.evals import corpus, grid_prompts, lm_logits, passkey_proxy, perplexity, run_grid
from lserve_jax.evals import passkey as pk
from lserve_jax.heads import binarize, layout_and_permutation, save_pattern
from lserve_jax.model import forward_reference
from lserve_jax.params import init_params, permute_kv_heads

from .test_calibrate import write_tiny_checkpoint
from .tiny import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = tiny_config(vocab_size=256, max_position_embeddings=1024)  # byte-level prompts
ENCODE = pk.byte_encoder(CFG.vocab_size)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0), jnp.float32, scale=0.3)


# --- prompts -------------------------------------------------------------------------------

@pytest.mark.parametrize("length", [256, 300, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.77, 1.0])
def test_needle_at_requested_depth_and_length(length, depth):
    p = pk.passkey_prompt(ENCODE, length, depth, "12345")
    needle = ENCODE(pk.NEEDLE.format(key="12345"))
    intro, question = ENCODE(pk.INTRO), ENCODE(pk.QUESTION)
    assert len(p.ids) == p.length == length
    (start,) = p.needle_starts
    assert p.ids[start:start + len(needle)] == needle
    n_fill = length - len(intro) - len(needle) - len(question)
    assert start == len(intro) + round(depth * n_fill)
    assert p.ids[:len(intro)] == intro and p.ids[-len(question):] == question
    assert p.answer_ids == ENCODE(" 12345.")


def test_filler_is_seamless_around_the_needle():
    unit = ENCODE(pk.FILLER)
    p = pk.passkey_prompt(ENCODE, 600, 0.5, "777")
    (start,), (n,) = p.needle_starts, p.needle_lens
    intro, question = len(ENCODE(pk.INTRO)), len(ENCODE(pk.QUESTION))
    filler = p.ids[intro:start] + p.ids[start + n:len(p.ids) - question]
    assert filler == (unit * 10)[:len(filler)]


def test_haystack_filler_is_the_text_in_order_around_the_needles():
    text = list(range(1000, 1900))  # distinct ids: any reordering or repeat would show
    needles = [(0.3, [7, 7, 7]), (0.8, [9, 9])]
    ids, starts = pk.build_prompt(ENCODE, 700, needles, haystack=text)
    intro, question = len(ENCODE(pk.INTRO)), len(ENCODE(pk.QUESTION))
    assert len(ids) == 700 and ids[starts[0]:starts[0] + 3] == [7, 7, 7] and ids[starts[1]:starts[1] + 2] == [9, 9]
    filler = ids[intro:starts[0]] + ids[starts[0] + 3:starts[1]] + ids[starts[1] + 2:len(ids) - question]
    n_fill = 700 - intro - question - 5
    assert filler == text[:n_fill]
    assert starts[0] == intro + round(0.3 * n_fill) and starts[1] == intro + 3 + round(0.8 * n_fill)
    with pytest.raises(ValueError, match="haystack"):
        pk.build_prompt(ENCODE, 700, needles, haystack=text[:100])
    s = pk.multi_passkey_sample(ENCODE, 700, 2, np.random.default_rng(0), fit_answer=True, haystack=text)
    assert len(s.ids) + len(s.answer_ids) == 700 and s.ids[intro] in text and s.ids[intro] != text[0]


def test_with_a_tokenizers_tokenizer_too():
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", *"abcdefghijklmnopqrstuvwxyz"])},
                                     unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # one token per letter, others <unk>
    enc = lambda s: tok.encode(s).ids  # noqa: E731
    p = pk.passkey_prompt(enc, 500, 0.3, "4242")
    assert len(p.ids) == 500 and p.ids[p.needle_starts[0]:][:p.needle_lens[0]] == enc(pk.NEEDLE.format(key="4242"))


def test_multi_passkey_sample_orders_keys_and_fits_the_answer():
    rng = np.random.default_rng(3)
    s = pk.multi_passkey_sample(ENCODE, 700, 3, rng, fit_answer=True)
    assert len(s.ids) + len(s.answer_ids) == 700
    assert list(s.needle_starts) == sorted(s.needle_starts) and list(s.depths) == sorted(s.depths)
    for i, (st, key) in enumerate(zip(s.needle_starts, s.keys)):
        assert s.ids[st:st + s.needle_lens[i]] == ENCODE(pk.MULTI_NEEDLE.format(i=i + 1, key=key))
    with pytest.raises(ValueError, match="below the fixed part"):
        pk.passkey_prompt(ENCODE, 50, 0.5, "1")
    with pytest.raises(ValueError, match="depth"):
        pk.passkey_prompt(ENCODE, 500, 1.5, "1")


def test_passed():
    p = pk.passkey_prompt(ENCODE, 300, 0.5, "31337")
    assert pk.passed(p, " 31337. Remember")
    assert not pk.passed(p, " 3133")
    assert pk.passed(p, output_ids=[9] + ENCODE(" 31337") + [4])
    assert not pk.passed(p, output_ids=ENCODE(" 31338"))


# --- text and perplexity -------------------------------------------------------------------

def test_shipped_text():
    path = corpus.TEXT_PATH
    assert os.path.getsize(path) < 1 << 20
    with open(path, encoding="utf-8") as f:
        head = f.read(2000)
    assert head.startswith("#") and "Public domain" in head  # the source is stated
    ids = corpus.eval_ids(lambda s: list(s.encode()))
    assert len(ids) > 75_000 and ids[0] != ord("#")


def test_perplexity_matches_dense_reference_and_sparse_differs(params):
    text = ENCODE("the quick brown fox jumps over the lazy dog. " * 20)
    dense = perplexity(params, CFG, text, 128, 2, None, 4, 16)
    toks = jnp.asarray(np.asarray(text[:256], np.int32).reshape(2, 128))
    logp = jax.nn.log_softmax(forward_reference(params, toks, CFG)[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, toks[:, 1:, None], axis=-1)
    assert dense["ppl"] == pytest.approx(float(jnp.exp(nll.mean())), rel=1e-4)
    assert dense["tokens"] == 2 * 127 and dense["windows"] == 2
    assert np.exp(np.mean(np.log(dense["window_ppl"]))) == pytest.approx(dense["ppl"], rel=1e-5)  # pooled
    with pytest.raises(ValueError):
        perplexity(params, CFG, text, 128, len(text) // 128 + 1, None, 4, 16)
    sparse = perplexity(params, CFG, text, 128, 2, np.array([[1.0, 0.0], [0.0, 1.0]]), 4, 16)
    assert np.isfinite(sparse["ppl"]) and sparse["ppl"] != pytest.approx(dense["ppl"], rel=1e-6)


def test_perplexity_with_8bit_kv_reads_quantised_keys_and_values(params):
    """kv_dtype: attention reads K and V back from 8-bit pages; the same as the reference forward
    with every layer's K (after RoPE) and V fake-quantised, close to (not equal to) unquantised."""
    from lserve_jax.kv8 import FP8, INT8, fake_quantize
    from lserve_jax.models.layer import causal_attention, decoder_layer, final_norm, lm_logits as head

    text = ENCODE("the quick brown fox jumps over the lazy dog. " * 20)
    dense = perplexity(params, CFG, text, 128, 1, None, 4, 16)
    toks = jnp.asarray(np.asarray(text[:128], np.int32)[None])
    for kv in (INT8, FP8):
        got = perplexity(params, CFG, text, 128, 1, None, 4, 16, kv_dtype=kv)
        x = params.embed[toks]
        for lp in params.layers:
            x, _ = decoder_layer(lp, x, jnp.arange(128)[None], CFG, lambda q, k, v: (
                causal_attention(q, fake_quantize(k, kv), fake_quantize(v, kv)), None))
        logp = jax.nn.log_softmax(head(params, final_norm(params, x, CFG))[:, :-1], axis=-1)
        want = float(jnp.exp(-jnp.take_along_axis(logp, toks[:, 1:, None], axis=-1).mean()))
        assert got["ppl"] == pytest.approx(want, rel=1e-4)
        assert got["ppl"] != dense["ppl"] and got["ppl"] == pytest.approx(dense["ppl"], rel=0.05)


# --- grid smoke run ------------------------------------------------------------------------

def test_grid_smoke_two_cells(params):
    """Two cells (one length, depths 0 and 1) through Engine.generate, dense and sparse with the
    same prompts; with a window that covers the prompt the sparse engine must agree with dense."""
    prompts = grid_prompts(ENCODE, [300], [0.0, 1.0], trials=1, seed=0)
    assert [[c[0].length for c in row] for row in prompts] == [[300, 300]]
    knobs = dict(page_size=16, logical_page_size=4)
    dense = Engine(params, CFG, sparse=SparseConfig(token_budget=512, sparse_decode=False, **knobs),
                   max_seq_len=320)
    frac_d, outs_d = run_grid(dense, prompts)
    assert np.asarray(frac_d).shape == (1, 2)
    alpha = np.array([[0.9, 0.1], [0.2, 0.8]])
    layout, perms = layout_and_permutation(binarize(alpha, 0.5))
    wide = SparseConfig(static_sparsity=0.5, prefill_sink=4, prefill_local=512, decode_sink=4, decode_local=512,
                        token_budget=512, **knobs)
    sparse = Engine(permute_kv_heads(params, CFG, perms), CFG, layout=layout, sparse=wide, max_seq_len=320)
    frac_s, outs_s = run_grid(sparse, prompts)
    assert outs_s == outs_d and frac_s == frac_d
    assert all(len(o[0]) == 8 for o in outs_d[0])  # no EOS in a random model: 8 tokens each


def test_corpus_halves_are_disjoint_and_cover_the_text():
    text = corpus.read_text()
    first, second = corpus.split_text(text)
    assert first and second and not text.startswith("#")
    assert text.index(second) > len(first) - 1  # the second half comes after the first
    assert abs(len(first) - len(second)) < 0.01 * len(text)
    enc = lambda s: list(s.encode())  # noqa: E731
    assert corpus.eval_ids(enc) == enc(first) and corpus.haystack_ids(enc) == enc(second)
    with pytest.raises(ValueError, match="line break"):
        corpus.split_text("one line without a break at all")


def test_passkey_proxy_is_the_teacher_forced_greedy_answer(params):
    """A cell passes iff the argmax at every answer position is the answer token; right padding
    to a common width changes nothing (causal)."""
    cells = [pk.passkey_prompt(ENCODE, n, d, "4242") for n, d in ((300, 0.5), (400, 0.0), (360, 1.0))]
    for gates in (None, jnp.asarray([[1.0, 0.0], [0.0, 1.0]])):
        got = passkey_proxy(params, CFG, cells, gates, sink=4, local=16)
        for c, ok in zip(cells, got):
            toks = jnp.asarray([c.ids + c.answer_ids], jnp.int32)
            h = gated_hidden(params, toks, CFG, gates, sink=4, local=16)
            pred = np.asarray(jnp.argmax(lm_logits(params, h[0]), -1))[len(c.ids) - 1:-1]
            want = c.answer_ids[:-1]
            assert ok == (list(pred[:len(want)]) == want)
    # an answer equal to the model's own first prediction passes (only the first token is
    # checked: the period after it is excluded, and later inputs would change the prediction)
    c = cells[0]
    toks = jnp.asarray([c.ids + c.answer_ids], jnp.int32)
    pred = np.asarray(jnp.argmax(lm_logits(params, gated_hidden(params, toks, CFG, None, sink=4,
                                                                          local=16)[0]), -1))
    own = dataclasses.replace(c, answer_ids=[int(pred[len(c.ids) - 1]), 1])
    assert passkey_proxy(params, CFG, [own, cells[1]], None, sink=4, local=16)[0]


# --- bench/accuracy.py ---------------------------------------------------------------------

def test_accuracy_script_end_to_end_and_resume(params, tmp_path):
    """bench/accuracy.py on a tiny checkpoint: grid and perplexity of dense, the pattern and the
    random control; tables, summary and heatmap. `--resume` keeps the entries of patterns with
    the same gates and perplexities over the same windows, and computes the others again."""
    pytest.importorskip("matplotlib")
    ckpt, pattern, out = tmp_path / "ckpt", tmp_path / "pattern.tsv", tmp_path / "acc.json"
    write_tiny_checkpoint(ckpt, params, CFG)
    save_pattern(pattern, np.array([[0.9, 0.1], [0.2, 0.8]]))
    args = ["--checkpoint", str(ckpt), "--pattern", str(pattern), "--lengths", "300", "--depths", "0,1",
            "--sparsities", "0.5", "--budgets", "256", "--ppl-lengths", "512", "--ppl-sparsities", "0.5",
            "--selection-modes", "query_head", "--out", str(out)]

    def run(*extra) -> tuple[dict, str]:
        r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "accuracy.py"), *args, *extra],
                           capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        return json.loads(out.read_text()), r.stdout + r.stderr

    res, _ = run("--ppl-windows", "2")
    names = ["dense", "calibrated-s0.5-b256", "random-s0.5-b256"]
    assert list(res["grid"]["variants"]) == names
    assert all(np.shape(v["pass"]) == (1, 2) for v in res["grid"]["variants"].values())
    ppl = res["perplexity"]["variants"]
    assert list(ppl) == ["dense", "calibrated-s0.5", "random-s0.5"] and list(ppl["dense"]) == ["prefill"]
    assert ppl["calibrated-s0.5"]["decode"]["512"]["tokens"] == 2 * 511 and len(ppl["dense"]["prefill"]["512"]["window_ppl"]) == 2
    s = res["summary"]
    assert s["headline_variant"] == "calibrated-s0.5-b256" and s["cells_total"] == 2 and s["ppl_length"] == 512
    assert s["ppl_ratio_sparse_over_dense"] == pytest.approx(ppl["calibrated-s0.5"]["prefill"]["512"]["ppl"] /
                                                             ppl["dense"]["prefill"]["512"]["ppl"])
    assert len(s["ppl_ratio_random_over_dense_per_window"]) == 2
    assert s["cells_sparse_pass_where_dense_passes"] == s["per_variant"][names[1]]["pass_where_dense_passes"]
    assert f"| {names[1]} | 0.5 | 256 | " in res["table_md"] and "| random-s0.5 | decode | " in res["table_md"]
    assert (tmp_path / "acc.png").read_bytes()[:4] == b"\x89PNG"

    save_pattern(pattern, np.array([[0.1, 0.9], [0.8, 0.2]]))  # re-calibrated: its entries go
    again, log = run("--ppl-windows", "2", "--resume")
    assert "grid: dense (kept" in log and "grid: random-s0.5-b256 (kept" in log and f"grid: {names[1]}\n" in log
    for name in ("dense", "random-s0.5"):
        assert again["perplexity"]["variants"][name] == ppl[name]
    assert again["perplexity"]["variants"]["calibrated-s0.5"] != ppl["calibrated-s0.5"]

    third, log = run("--ppl-windows", "1", "--resume")  # other windows: every perplexity again
    assert third["grid"] == again["grid"] and "ppl dense prefill @512" in log
    assert third["perplexity"]["variants"]["dense"]["prefill"]["512"]["tokens"] == 511

    # 8-bit: the grid's variants again with INT8 weights and KV pages, beside their twins
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "accuracy.py"), *args, "--weights", "int8"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "--skip-ppl" in r.stderr
    eight, log = run("--resume", "--skip-ppl", "--variants", "dense,calibrated-s0.5-b256",
                     "--weights", "int8", "--kv-dtype", "int8")
    g = eight["grid"]["variants"]
    assert set(g) == {*names, "dense+int8+kv-int8", "calibrated-s0.5-b256+int8+kv-int8"}
    assert g["dense+int8+kv-int8"]["twin"] == "dense" and g["dense+int8+kv-int8"]["kv_dtype"] == "int8"
    assert "grid: random-s0.5-b256" not in log.replace("(kept", "")  # --variants: the control is not run
    twin, own = np.asarray(g["dense"]["pass"]) >= 1, np.asarray(g["dense+int8+kv-int8"]["pass"]) >= 1
    per = eight["summary"]["per_variant"]["dense+int8+kv-int8"]
    assert per["pass_where_twin_passes"] == int((twin & own).sum())
    assert per["mean_pass"] == pytest.approx(np.mean(g["dense+int8+kv-int8"]["pass"]), abs=1e-4)
    lost = sum(int((np.asarray(g[n["twin"]]["pass"]) >= 1).sum()) - eight["summary"]["per_variant"][k]["pass_where_twin_passes"]
               for k, n in g.items() if n.get("twin"))
    assert eight["summary"]["passkey_cells_lost_8bit"] == lost
    assert eight["perplexity"] == third["perplexity"]  # --skip-ppl keeps the stored perplexities
    assert f"| dense+int8+kv-int8 | 0.0 | - | " in eight["table_md"]
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "accuracy.py"), *args, "--variants", "nope"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "unknown ['nope']" in r.stderr
    (tmp_path / "bad.json").write_text("{bad")
    for extra, msg in ((["--variants", ""], "names no variant"),
                       (["--resume", "--out", str(tmp_path / "bad.json")], "--resume: cannot read")):
        r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "accuracy.py"), *args, *extra],
                           capture_output=True, text=True, cwd=tmp_path)
        assert r.returncode == 2 and msg in r.stderr, r.stderr
    assert (tmp_path / "bad.json").read_text() == "{bad"  # left as it was

