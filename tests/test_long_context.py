"""RULER-style tasks (`lserve_jax.evals.ruler`) and bench/long_context.py: deterministic
generators, needles at the requested depth, token-exact prompts, an exact scorer, intervals, and
the CLI end to end on a tiny checkpoint."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys

import numpy as np
import pytest

from lserve_jax.evals import corpus, ruler
from lserve_jax.evals import passkey as pk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENCODE = pk.byte_encoder(256)  # one token per byte
HAY = ruler.Haystack.from_text(ENCODE, corpus.read_text())
FRAME = ruler.Frame((0, 0, 0), (0, 0), True)  # a stand-in chat template (id 0: no byte encodes to it)


def _text(ids) -> str:
    """The byte-level prompt as text, one character per token (frame tokens as NUL)."""
    return "".join("\x00" if t == 0 else chr(t - 1) for t in ids)


def _smollm2_tokenizer():
    from lserve_jax.default_model import default_cache_dir
    from lserve_jax.tokenizer import Tokenizer

    path = default_cache_dir() / "SmolLM2-135M-Instruct-lserve"
    if not (path / "tokenizer.json").exists():
        pytest.skip("the default model is not converted on this machine")
    return Tokenizer.from_checkpoint_dir(path)


# --- generators ----------------------------------------------------------------------------------

@pytest.mark.parametrize("task", list(ruler.TASKS))
def test_deterministic_for_a_seed_and_token_exact(task):
    a = ruler.make_samples(task, ENCODE, 3000, 3, seed=5, frame=FRAME, haystack=HAY)
    b = ruler.make_samples(task, ENCODE, 3000, 3, seed=5, frame=FRAME, haystack=HAY)
    c = ruler.make_samples(task, ENCODE, 3000, 3, seed=6, frame=FRAME, haystack=HAY)
    assert a == b
    assert [s.answers for s in a] != [s.answers for s in c]
    assert len({s.answers for s in a}) == 3  # samples differ from each other
    # a sample depends on (seed, task, length, index) only, not on how many samples are asked for
    assert ruler.make_sample(task, ENCODE, 3000, 1, 3, seed=5, frame=FRAME, haystack=HAY).answers == a[1].answers
    for s in a:
        assert len(s.ids) + s.max_new_tokens == s.length == 3000
        assert tuple(s.ids[:3]) == FRAME.head
        assert s.score(" ".join(s.answers)) == 1.0 and s.score("nothing here") == 0.0


@pytest.mark.parametrize("length", [1000, 2345, 4096])
@pytest.mark.parametrize("task", ["niah_single_number", "niah_multikey", "vt"])
def test_needle_at_the_requested_depth(task, length):
    n = 5
    spec = ruler.TASKS[task]
    for snap in (False, True):
        samples = ruler.make_samples(task, ENCODE, length, n, seed=1, frame=FRAME, haystack=HAY, snap=snap)
        assert [s.depth for s in samples] == [i / (n - 1) for i in range(n)]  # evenly from 0 to 1
        for s in samples:
            text = _text(s.ids)
            head = len(FRAME.head) + len(ENCODE(ruler.VT_INTRO if spec.kind == "vt" else
                                                ruler.NIAH_INTRO.format(type="numbers")))
            question = text.rindex("\nQuestion:" if spec.kind == "vt" else "\nWhat are all")
            n_fill = question - head - sum(s.needle_lens)
            order = sorted(range(len(s.needle_starts)), key=lambda i: s.needle_starts[i])
            for rank, i in enumerate(order):
                needle = text[s.needle_starts[i]:s.needle_starts[i] + s.needle_lens[i]]
                assert re.fullmatch(r" (One of the special magic numbers for [a-z]+-[a-z]+ is: \d{7}|VAR [A-Z]{5} = "
                                    r"(\d{5}|VAR [A-Z]{5}))\.", needle), needle
                before = sum(s.needle_lens[j] for j in order[:rank])
                pos = s.needle_starts[i] - head - before  # filler tokens before the needle
                assert pos == round(s.needle_depths[i] * n_fill)
            # the queried needle (first target) at the sample's depth; vt's chain at (k + d) / 5
            wanted = [s.depth] if spec.kind == "niah" else [(k + s.depth) / 5 for k in range(5)]
            for i, d in zip(s.targets, wanted):
                pos = round(s.needle_depths[i] * n_fill)
                if snap:  # the sentence start nearest to round(d * F)
                    assert abs(pos - round(d * n_fill)) <= 400
                else:
                    assert pos == round(d * n_fill)
                    assert abs(s.needle_depths[i] - d) <= 1 / n_fill


def test_snapped_needles_start_sentences():
    s = ruler.make_sample("niah_single_number", ENCODE, 4000, 2, 5, frame=FRAME, haystack=HAY)
    st = s.needle_starts[0]
    text = _text(s.ids)
    before, after = text[st - 3:st], text[st + s.needle_lens[0]:st + s.needle_lens[0] + 2]
    assert re.search(r"[.!?]\W?$", before) and after[0] in " \n", (before, after)


def test_haystack_cycles_the_text():
    n = len(HAY) + 500
    ids, bounds = HAY.take(len(HAY.starts) - 1, n)  # from the last sentence: wraps around twice
    s0 = int(HAY.starts[-1])
    flat = HAY.ids.tolist()
    assert ids == (flat * 3)[s0:s0 + n] and len(ids) == n
    assert bounds[0] == 0 and bounds[-1] == n and len(HAY) - s0 in bounds
    assert 0 not in [b for b in bounds[1:]] and bounds == sorted(bounds)
    # needles cut natural text, never a tiled sentence: every sentence appears once in the text
    assert len(ruler.sentences(corpus.read_text())) == len(HAY.starts) > 1000


@pytest.mark.parametrize("length", [1500, 6000, 20000])
def test_cwe_frequencies_and_length(length):
    s = ruler.make_sample("cwe", ENCODE, length, 0, 1, frame=FRAME, haystack=HAY)
    assert len(s.ids) + s.max_new_tokens == length
    text = _text(s.ids)
    words = re.findall(r"\d+\. ([a-z]+)", text)
    counts = {w: words.count(w) for w in set(words)}
    top = counts[s.answers[0]]  # 30 times in a long list, fewer (but at least twice) in a short one
    assert len(s.answers) == ruler.CWE_COMMON and all(counts[w] == top for w in s.answers)
    assert top == (ruler.CWE_FREQ_COMMON if length == 20000 else top) and top >= 2
    assert max(c for w, c in counts.items() if w not in s.answers) <= min(ruler.CWE_FREQ_RARE, max(1, top // 3))
    nums = [int(x) for x in re.findall(r"(\d+)\. [a-z]", text)]
    assert nums == list(range(1, len(nums) + 1))


def test_real_tokenizer_prompts_are_exact():
    tok = _smollm2_tokenizer()
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    frame = ruler.Frame.chat_template(tok)
    hay = ruler.Haystack.from_text(enc, corpus.read_text())
    assert list(frame.head) == tok.encode_chat("x")[:len(frame.head)]
    for task in ruler.TASKS:
        for length in (4096, 8192):
            s = ruler.make_sample(task, enc, length, 3, 4, frame=frame, haystack=hay)
            assert len(s.ids) + s.max_new_tokens == length
            text = tok.decode(s.ids, skip_special_tokens=False)
            assert text.startswith("<|im_start|>system") and text.endswith(
                "are" if task.startswith("niah") else ":") and "<|im_start|>assistant\n" in text
            for st, n in zip(s.needle_starts, s.needle_lens):
                assert tok.decode(s.ids[st:st + n]).strip().startswith(("One of the special", "VAR "))


def test_errors():
    with pytest.raises(ValueError, match="unknown task"):
        ruler.make_sample("niah_double", ENCODE, 2000, 0, 1)
    with pytest.raises(ValueError, match="too short for niah_single_uuid"):
        ruler.make_sample("niah_single_uuid", ENCODE, 300, 0, 1, haystack=HAY)
    with pytest.raises(ValueError, match="too short for cwe"):
        ruler.make_sample("cwe", ENCODE, 700, 0, 1, haystack=HAY)
    with pytest.raises(ValueError, match="num_samples"):
        ruler.make_samples("vt", ENCODE, 2000, 0)


# --- scorer and intervals ------------------------------------------------------------------------

def test_scorer_exact_answers_only():
    assert ruler.score(["1234567"], ": 1234567.") == 1.0
    assert ruler.score(["1234567"], "The number is\n1234567") == 1.0
    for near in ("12345678", "123456", "91234567", "1234568", "1,234,567", "1234 567", "1234567" [::-1]):
        assert ruler.score(["1234567"], f"answer: {near}.") == 0.0, near
    u = "2cedd1dd-f314-438d-ad88-44af8e7448e9"
    assert ruler.score([u], f" {u.upper()}") == 1.0  # case-insensitive, as RULER
    assert ruler.score([u], " " + u[:-1] + "8") == 0.0 and ruler.score([u], " " + u[:-2]) == 0.0
    assert ruler.score(["calm-river"], "calm-river, bold-cloud") == 1.0
    assert ruler.score(["calm-river"], "calm-rivers") == 0.0 and ruler.score(["calm-river"], "xcalm-river") == 0.0
    assert ruler.score(["calm-river"], "calm river") == 0.0
    assert ruler.score(["ABCDE", "FGHIJ", "KLMNO", "PQRST"], "ABCDE, FGHIJX, KLMNO") == 0.5
    assert ruler.score(["king"], "the kingdom") == 0.0 and ruler.score(["king"], "1. king 2. kingdom") == 1.0
    with pytest.raises(ValueError):
        ruler.score([], "x")


def test_intervals():
    lo, hi = ruler.wilson(1.0, 25)
    assert hi == 1.0 and lo == pytest.approx(0.8668, abs=1e-3)  # 25/25
    lo, hi = ruler.wilson(0.5, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    groups = [[1, 1, 0, 1], [0, 0.5, 0, 0.25]]
    a, b = ruler.bootstrap_ci(groups, seed=3), ruler.bootstrap_ci(groups, seed=3)
    mean = np.mean([np.mean(g) for g in groups])
    assert a == b and a[0] <= mean <= a[1] and 0 <= a[0] < a[1] <= 1
    assert ruler.bootstrap_ci([[1, 1, 1]]) == (1.0, 1.0)


# --- bench/long_context.py -----------------------------------------------------------------------

def _cli():
    spec = importlib.util.spec_from_file_location("long_context", os.path.join(ROOT, "bench", "long_context.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["long_context"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_variants_and_knobs():
    lc = _cli()
    ap = lc.argparse.ArgumentParser()
    ap.add_argument("--custom", type=lc._custom, action="append", default=[])
    ap.add_argument("--knob", type=lc._knobs, action="append", default=[])
    args = ap.parse_args(["--custom", "ring1k:decode_local=1024,selection_mode=kv_head",
                          "--knob", "static_sparsity=0.75"])
    shared = tuple(kv for g in args.knob for kv in g)
    vs = {v.name: lc._resolve(v, 5000) for v in lc.build_variants(list(lc.BASE_VARIANTS), args.custom, shared, 1024)}
    assert list(vs) == ["dense", "sparse", "sparse-kv", "random", "decode-only", "budget1024", "ring1k"]
    sc = {n: v.sparse_config(5000) for n, v in vs.items()}
    assert sc["dense"].static_sparsity == 0.0 and not sc["dense"].sparse_decode and sc["dense"].token_budget == 5000
    assert sc["sparse"] == lc.SparseConfig(static_sparsity=0.75)  # the defaults, but for --knob
    assert sc["sparse-kv"].selection_mode == "kv_head" and sc["random"] == sc["sparse"]
    assert sc["decode-only"].prefill_local == 5000 and sc["budget1024"].token_budget == 1024
    assert sc["ring1k"].decode_local == 1024 and sc["ring1k"].selection_mode == "kv_head"
    assert vs["random"].pattern == "random" and vs["ring1k"].pattern == "given"
    for bad in ("ring", "dense:decode_local=1", "x:decode_local", "x:decode_local=big", "x:sparse_decode=maybe"):
        with pytest.raises(lc.argparse.ArgumentTypeError):
            lc._custom(bad)


def test_summary_keys_at_32k():
    lc = _cli()
    res = {"lengths": [4096, 32768], "averages": {
        v: {"4096": {"acc": 0.9}, "32768": {"acc": a}} for v, a in (("dense", 0.8), ("sparse", 0.7), ("random", 0.1))}}
    s = lc.summary(res)
    assert s["long_ctx_avg_dense_32k"] == 0.8 and s["long_ctx_avg_sparse_32k"] == 0.7
    assert s["long_ctx_avg_random_32k"] == 0.1 and s["delta_vs_dense_at_32768"]["sparse"] == pytest.approx(-0.1)
    res["lengths"] = [4096]
    assert not any(k.endswith("_32k") for k in lc.summary(res))


def test_cli_end_to_end_on_a_tiny_checkpoint(tmp_path, capsys):
    """Two tasks at 512 tokens, 2 samples, dense / sparse / random; the JSON, table and plot;
    --resume; then the input errors."""
    import jax
    import jax.numpy as jnp

    from lserve_jax.heads import save_pattern
    from lserve_jax.params import init_params

    from .test_calibrate import write_tiny_checkpoint
    from .tiny import tiny_config

    cfg = tiny_config(vocab_size=256, max_position_embeddings=1024)
    ckpt, pattern, out = tmp_path / "ckpt", tmp_path / "pattern.tsv", tmp_path / "lc.json"
    write_tiny_checkpoint(ckpt, init_params(cfg, jax.random.key(0), jnp.float32, scale=0.3), cfg)
    save_pattern(pattern, np.array([[0.9, 0.1], [0.2, 0.8]]))
    lc = _cli()
    base = ["--checkpoint", str(ckpt), "--pattern", str(pattern), "--out", str(out)]
    knobs = "page_size=16,logical_page_size=4,decode_sink=16,decode_local=32,prefill_sink=16,prefill_local=128"
    rc = lc.main(base + ["--tasks", "niah_single_number,niah_single_word", "--lengths", "512", "--samples", "2",
                         "--variants", "dense,sparse,random", "--knob", knobs, "--batch", "2"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert list(res["results"]) == ["dense", "sparse", "random"]
    cell = res["results"]["random"]["512"]["niah_single_word"]
    assert cell["n"] == 2 and len(cell["scores"]) == 2 and len(cell["outputs"]) == 2
    assert cell["ci95"][0] <= cell["acc"] <= cell["ci95"][1]
    knobs_used = res["variants"]["sparse"]["knobs"]
    assert knobs_used["page_size"] == 16 and knobs_used["decode_local"] == 32
    assert res["variants"]["random"]["alpha_digest"] != res["variants"]["sparse"]["alpha_digest"]
    assert res["variants"]["dense"]["knobs"]["static_sparsity"] == 0.0
    assert set(res["averages"]["dense"]["512"]) == {"acc", "ci95", "tasks"}
    assert res["summary"]["long_ctx_avg"]["sparse"]["512"] == res["averages"]["sparse"]["512"]["acc"]
    assert all(p["prompt_tokens"] + res["max_new_tokens"][t] == 512
               for t, ps in res["prompts"]["512"].items() for p in ps)
    printed = capsys.readouterr()
    assert "| niah_single_number | dense | " in printed.out and "| average | random | " in printed.out
    assert "[6/6] random 512 niah_single_word" in printed.err
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "lc.png").read_bytes()[:4] == b"\x89PNG"

    # --resume keeps every cell of the same prompts and knobs
    assert lc.main(base + ["--tasks", "niah_single_number,vt", "--lengths", "512", "--samples", "2",
                           "--variants", "dense", "--resume"]) == 0
    assert "(kept)" in capsys.readouterr().err

    for argv, msg in ((["--tasks", "niah_double"], "unknown task"),
                      (["--lengths", "2048"], "exceed the model's context"),
                      (["--lengths", "300", "--tasks", "cwe"], "too short for cwe"),
                      (["--variants", "fast"], "unknown variant"),
                      (["--variants", "none"], "no variant to run"),
                      (["--knob", "page_size=48"], "power of two"),
                      (["--knob", "speed=1"], "unknown knob"),
                      (["--samples", "0"], "positive integer")):
        with pytest.raises(SystemExit) as e:
            lc.main(base + argv)
        assert e.value.code == 2
        assert msg in capsys.readouterr().err, argv
