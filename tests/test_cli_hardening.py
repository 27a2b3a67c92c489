"""Issue 17 hardening: relative paths everywhere a user gives one; the generate CLI's usage
errors (one line, exit 2), a closed stdout, a damaged checkpoint, seeds, --system and
--ignore-eos; SamplingParams validation; what `Engine.generate` accepts as prompts; the
compilation cache for API users.

A tiny random checkpoint (tests/tiny.py) with the word tokenizer and a toy chat template that
renders a system message as "w001 <content>", a user message as "w002 <content>" and the
generation prompt as "w003", so a rendered conversation is a known list of token ids.
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import lserve_jax
from lserve_jax import api
from lserve_jax import generate as generate_cli
from lserve_jax.checkpoint import DEBUG_ENV, open_checkpoint, write_checkpoint
from lserve_jax.convert import cli as convert_cli
from lserve_jax.heads import load_pattern, save_pattern
from lserve_jax.sampling import SamplingParams
from lserve_jax.sharding import ShardingError

from .tiny import TINY, TINY_SPARSE, tiny_params, word_tokenizer_json

REPO = Path(__file__).resolve().parents[1]
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'system' %}w001 {% else %}w002 {% endif %}"
                 "{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w003{% endif %}")
SYSTEM, USER = "w010", "w020 w021"
CHAT_IDS = [1, 10, 2, 20, 21, 3]  # [system] w001 w010, [user] w002 w020 w021, [assistant] w003
PROMPT = "w005 w006 w007 w008"
HEADS = np.array([[0.9, 0.1], [0.2, 0.8]])  # [layers, kv_heads] of the tiny model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("models") / "tiny"
    d.mkdir()
    write_checkpoint(d, tiny_params(TINY), TINY, "float32")
    word_tokenizer_json(d / "tokenizer.json")
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    return d


@pytest.fixture(scope="module")
def engine(ckpt):
    return lserve_jax.load(ckpt, pattern=None, sparse=TINY_SPARSE, progress=False)


def run_generate(capsys, *args) -> tuple[int, str, str]:
    rc = generate_cli.main([*map(str, args)])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err


# --- 1. relative paths -----------------------------------------------------------------------

def test_load_a_relative_checkpoint(ckpt, engine, monkeypatch):
    monkeypatch.chdir(ckpt.parent)
    assert open_checkpoint("tiny").path == ckpt
    got = lserve_jax.load("tiny", pattern=None, sparse=TINY_SPARSE, progress=False).generate(
        [PROMPT], SamplingParams(max_new_tokens=4))
    assert got[0].token_ids == engine.generate([PROMPT], SamplingParams(max_new_tokens=4))[0].token_ids


def test_load_a_relative_pattern_file(ckpt, monkeypatch):
    monkeypatch.chdir(ckpt.parent)
    save_pattern("heads.tsv", HEADS)
    eng = lserve_jax.load("tiny", pattern="heads.tsv", sparse=TINY_SPARSE, progress=False)
    assert not eng.spec.layout.is_dense  # the pattern was read: half the heads stream


def test_generate_cli_with_relative_checkpoint_and_pattern(ckpt, capsys, monkeypatch):
    monkeypatch.chdir(ckpt.parent)
    save_pattern("heads.tsv", HEADS)
    rc, out, err = run_generate(capsys, "--checkpoint", "tiny", "--pattern", "heads.tsv", "--prompt", PROMPT,
                                "--max-new-tokens", "4", "--page-size", "16", "--logical-page-size", "4",
                                "--token-budget", "64", "--quiet")
    assert rc == 0, err
    assert out.strip() and "absolute" not in err


def test_convert_with_relative_source_destination_and_pattern(tmp_path, monkeypatch):
    from .hf_models import make_hf_model

    make_hf_model("mistral", tmp_path / "hf")
    monkeypatch.chdir(tmp_path)
    save_pattern("heads.tsv", HEADS)
    assert convert_cli.main(["hf", "out", "--dtype", "float32", "--pattern", "heads.tsv", "--quiet"]) == 0
    ck = open_checkpoint("out")
    assert ck.path == tmp_path / "out"
    assert Path(ck.meta["source"]) == tmp_path / "hf"  # recorded absolute: meaningful from anywhere
    np.testing.assert_allclose(ck.head_pattern(), HEADS)
    ck.load_params()


def test_calibrate_with_relative_checkpoint_and_output(ckpt, monkeypatch):
    from lserve_jax.calibrate import cli as calibrate_cli

    monkeypatch.chdir(ckpt.parent)
    rc = calibrate_cli.main(["tiny", "--method", "attention-mass", "--steps", "1", "--lengths", "96", "--sink", "4",
                             "--local", "8", "--refine-band", "0", "--output", "calib/heads.tsv"])
    assert rc == 0
    assert load_pattern("calib/heads.tsv").shape == (TINY.num_layers, TINY.num_kv_heads)
    assert json.loads(Path("calib/heads.json").read_text())["checkpoint"] == str(ckpt)


# --- 5. generate CLI -------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--seed", str(2**70)], "seed must be a 64-bit integer"),
    (["--seed", str(2**63)], "seed must be a 64-bit integer"),
    (["--tp", "0"], "--tp must be >= 1"),
    (["--tp", "-2"], "--tp must be >= 1"),
    (["--temperature", "nan"], "temperature must be a finite number >= 0"),
    (["--temperature", "inf"], "temperature must be a finite number >= 0"),
    (["--temperature", "-1"], "temperature must be a finite number >= 0"),
    (["--top-p", "nan"], "top_p must be in (0, 1]"),
    (["--top-k", "-1"], "top_k must be >= 0"),
    (["--stop", ""], "stop strings must be non-empty"),
    (["--stop", "ok", "--stop", ""], "stop strings must be non-empty"),
    (["--whole-file"], "--whole-file needs --prompt-file"),
    (["--system", "be brief"], "--system needs --chat"),
    (["--num-pages", "1"], "at least 2 pages"),
    (["--max-seq-len", "-4"], "--max-seq-len must be >= 1"),
    (["--weights", "fp8", "--tp", "2"], "runs with --tp 1 only"),
    (["--kv-dtype", "int8", "--tp", "2"], "runs with --tp 1 only"),
    (["--no-center-keys"], "--no-center-keys applies to 8-bit KV"),
])
def test_usage_errors_are_one_line_with_exit_2(capsys, args, message):
    """Checked before the checkpoint is even opened (it does not exist here)."""
    rc, out, err = run_generate(capsys, "--checkpoint", "/nonexistent/ckpt", "--prompt", PROMPT, *args)
    assert rc == 2 and out == ""
    assert err.strip().count("\n") == 0 and err.startswith("error: ") and message in err, err


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's abandoned reads
def test_damaged_params_file_is_one_line(ckpt, tmp_path, capsys, monkeypatch):
    bad = Path(shutil.copytree(ckpt, tmp_path / "bad"))
    data = max((f for f in (bad / "params").rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    data.write_bytes(data.read_bytes()[:1000])  # a truncated download or copy
    rc, _, err = run_generate(capsys, "--checkpoint", bad, "--prompt", PROMPT, "--quiet")
    assert rc == 1
    assert err.strip().count("\n") == 0, err
    assert f"checkpoint {bad} is damaged" in err and "convert the model again" in err and DEBUG_ENV in err
    monkeypatch.setenv(DEBUG_ENV, "1")  # the full orbax/TensorStore text on request
    rc, _, err = run_generate(capsys, "--checkpoint", bad, "--prompt", PROMPT, "--quiet")
    assert rc == 1 and "orbax:" in err and err.strip().count("\n") > 1
    gc.collect()  # orbax's failed restore leaves coroutines behind: collect them under this test's filter


def test_closed_stdout_exits_quietly(ckpt):
    """`lserve-generate ... | head -1`: a reader that goes away ends the run without a traceback."""
    env = {**os.environ, "LSERVE_JAX_NO_JIT_CACHE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lserve_jax.generate", "--checkpoint", str(ckpt), "--prompt",
                             PROMPT, "--max-new-tokens", "16", "--quiet"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # before the first token: the first write meets a closed pipe
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 141, err
    assert err == "", err


def test_sampling_without_seed_prints_a_seed_that_repeats_the_run(ckpt, capsys):
    base = ["--checkpoint", ckpt, "--prompt", PROMPT, "--max-new-tokens", "8", "--temperature", "1.5", "--quiet"]
    rc, out, err = run_generate(capsys, *base)
    assert rc == 0, err
    lines = [ln for ln in err.splitlines() if ln.startswith("[seed] ")]
    assert len(lines) == 1, err
    seed = int(lines[0].split()[1])
    rc, again, err = run_generate(capsys, *base, "--seed", seed)
    assert rc == 0 and again == out and "[seed]" not in err


@pytest.mark.parametrize("mode", ["fp8", "int8"])
def test_8bit_weights_generate(ckpt, capsys, mode):
    rc, out, err = run_generate(capsys, "--checkpoint", ckpt, "--prompt", PROMPT, "--max-new-tokens", "4",
                                "--weights", mode, "--quiet")
    assert rc == 0 and len(out.split()) == 4, err
    with pytest.raises(SystemExit) as e:  # argparse: an unknown choice is a usage error
        generate_cli.main(["--checkpoint", str(ckpt), "--prompt", PROMPT, "--weights", "int4"])
    assert e.value.code == 2


def test_weights_choices_are_the_load_choices():
    """--weights lists its choices literally (the CLI imports no jax for --help): they must be
    quant.WEIGHT_CHOICES, what lserve_jax.load takes (every quantisation mode among them)."""
    from lserve_jax.quant import MODES, WEIGHT_CHOICES

    action = next(a for a in generate_cli.build_parser()._actions if "--weights" in a.option_strings)
    assert tuple(action.choices) == tuple(WEIGHT_CHOICES)
    assert set(MODES) <= set(WEIGHT_CHOICES) and action.default == "auto"


def test_greedy_prints_no_seed(ckpt, capsys):
    rc, _, err = run_generate(capsys, "--checkpoint", ckpt, "--prompt", PROMPT, "--max-new-tokens", "2", "--quiet")
    assert rc == 0 and "[seed]" not in err


def test_system_message_goes_into_the_chat_template(ckpt, engine, capsys):
    rc, out, err = run_generate(capsys, "--checkpoint", ckpt, "--chat", "--system", SYSTEM, "--prompt", USER,
                                "--max-new-tokens", "5")
    assert rc == 0, err
    assert f"prompt tokens {len(CHAT_IDS)} " in err
    assert out == engine.generate([CHAT_IDS], SamplingParams(max_new_tokens=5))[0].text + "\n"


def test_ignore_eos_reaches_sampling_params():
    parse = generate_cli.build_parser().parse_args
    _, sp = generate_cli.settings(parse(["--prompt", "x", "--ignore-eos"]))
    assert sp.ignore_eos is True
    _, sp = generate_cli.settings(parse(["--prompt", "x"]))
    assert sp.ignore_eos is False and sp.seed == 0  # greedy: the seed does not matter


# --- 5. SamplingParams -----------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=math.nan), "temperature must be a finite number"),
    (dict(temperature=math.inf), "temperature must be a finite number"),
    (dict(temperature="0.5"), "temperature must be a finite number"),
    (dict(top_p=math.nan), "top_p must be in"),
    (dict(top_k=1.5), "top_k must be >= 0"),
    (dict(max_new_tokens=2.0), "max_new_tokens must be >= 1"),
    (dict(max_new_tokens=True), "max_new_tokens must be >= 1"),
    (dict(seed=2**70), "seed must be a 64-bit integer"),
    (dict(seed=-(2**63) - 1), "seed must be a 64-bit integer"),
    (dict(seed=1.0), "seed must be a 64-bit integer"),
    (dict(stop=("",)), "stop strings must be non-empty"),
    (dict(stop=""), "stop strings must be non-empty"),
    (dict(stop=(3,)), "stop strings must be non-empty"),
    (dict(stop=3), "stop must be a string or a sequence"),
    (dict(ignore_eos="yes"), "ignore_eos must be True or False"),
])
def test_sampling_params_rejects(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        SamplingParams(**kwargs)


def test_sampling_params_accepts_and_normalises():
    assert SamplingParams(seed=None).seed is None
    assert SamplingParams(seed=2**63 - 1).seed == 2**63 - 1 and SamplingParams(seed=-(2**63)).seed == -(2**63)
    assert SamplingParams(seed=np.int64(3), max_new_tokens=np.int32(2), temperature=np.float32(0.5)).seed == 3
    assert SamplingParams(stop="END").stop == ("END",)  # one stop string, not three one-letter ones
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    hash(SamplingParams(stop=["a"]))  # still hashable
    assert SamplingParams(ignore_eos=True).ignore_eos


# --- 6. Python API ---------------------------------------------------------------------------

SP = SamplingParams(max_new_tokens=4)


def test_a_bare_string_is_one_prompt(engine):
    got = engine.generate(PROMPT, SP)
    assert len(got) == 1 and got[0].prompt_tokens == 4
    assert got[0].token_ids == engine.generate([PROMPT], SP)[0].token_ids


def test_a_flat_list_of_token_ids_is_one_prompt(engine):
    got = engine.generate([5, 6, 7], SP)
    assert len(got) == 1 and got[0].token_ids == engine.generate([[5, 6, 7]], SP)[0].token_ids
    assert engine.generate(np.array([5, 6, 7]), SP)[0].token_ids == got[0].token_ids


def test_chat_messages_are_one_chat_prompt(engine):
    conv = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]
    want = engine.generate([CHAT_IDS], SP)[0]
    got = engine.generate(conv, SP)
    assert len(got) == 1 and got[0].prompt_tokens == len(CHAT_IDS) and got[0].token_ids == want.token_ids
    batch = engine.generate([conv, PROMPT, [5, 6, 7]], SP)  # a batch may mix the three kinds
    assert [g.prompt_tokens for g in batch] == [len(CHAT_IDS), 4, 3]
    assert batch[0].token_ids == want.token_ids


@pytest.mark.parametrize("prompts, error, message", [
    ([{"role": "user"}], ValueError, "chat message 0 needs 'role' and 'content'"),
    ([{"role": "user", "content": "  "}], ValueError, "prompt 0 is empty"),
    ({"role": "user", "content": "w005"}, TypeError, "prompts must be a string"),
    (42, TypeError, "prompts must be a string"),
    (b"w005", TypeError, "prompts must be a string"),
    ([1, "w005"], TypeError, "prompt 0 must be a string"),
    (["w005", 3.5], TypeError, "prompt 1 must be a string"),
])
def test_bad_prompts_are_named(engine, prompts, error, message):
    with pytest.raises(error, match=message):
        engine.generate(prompts, SP)


def test_chat_messages_need_a_tokenizer(params):
    eng = lserve_jax.Engine(params, TINY, sparse=TINY_SPARSE)
    with pytest.raises(ValueError, match="chat messages need a tokenizer"):
        eng.generate([{"role": "user", "content": "hi"}], SP)


def test_seed_none_draws_a_fresh_seed(engine, monkeypatch):
    from lserve_jax import prompts

    monkeypatch.setattr(prompts, "random_seed", lambda: 7)
    hot = dict(max_new_tokens=6, temperature=2.0)
    got = engine.generate([PROMPT], SamplingParams(seed=None, **hot))
    assert got[0].token_ids == engine.generate([PROMPT], SamplingParams(seed=7, **hot))[0].token_ids
    assert prompts.normalize_sampling(None) == SamplingParams()  # None: the defaults


@pytest.mark.parametrize("tp", [0, -2, 1.5, True])
def test_load_rejects_a_bad_tp_first(tp):
    with pytest.raises(ShardingError, match="tp must be an integer >= 1"):
        lserve_jax.load("/nonexistent/ckpt", tp=tp)


def test_load_turns_on_the_compilation_cache(ckpt, tmp_path, monkeypatch):
    import jax

    calls = []
    monkeypatch.setattr(api, "enable_compilation_cache", lambda: calls.append(1))
    lserve_jax.load(ckpt, pattern=None, progress=False)
    assert calls == [1]
    monkeypatch.undo()

    old = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs,
           jax.config.jax_compilation_cache_max_size)
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        jax.config.update("jax_compilation_cache_max_size", -1)
        monkeypatch.setenv("LSERVE_JAX_CACHE", str(tmp_path))
        monkeypatch.setenv(api.NO_JIT_CACHE_ENV, "1")
        api.enable_compilation_cache()
        assert jax.config.jax_compilation_cache_dir is None  # turned off
        monkeypatch.delenv(api.NO_JIT_CACHE_ENV)
        (tmp_path / "jit").mkdir()
        (tmp_path / "jit" / "jit_f-abc-cache").write_bytes(b"x")  # an unbounded cache's entry
        api.enable_compilation_cache()
        assert (tmp_path / "jit" / "jit_f-abc-atime").stat().st_size == 8  # dated for eviction
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "jit")
        # bounded, so jax takes its file lock around reads and writes (safe across processes)
        assert jax.config.jax_compilation_cache_max_size == api.JIT_CACHE_MAX_BYTES
        jax.config.update("jax_compilation_cache_dir", "/elsewhere")
        api.enable_compilation_cache()
        assert jax.config.jax_compilation_cache_dir == "/elsewhere"  # the user's own choice stays
    finally:
        jax.config.update("jax_compilation_cache_dir", old[0])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])
        jax.config.update("jax_compilation_cache_max_size", old[2])


def test_decode_steps_option_is_checked_and_passed_on():
    from lserve_jax.generate import build_parser, engine_options

    p = build_parser()
    assert engine_options(p.parse_args([]))["decode_steps"] == "auto"
    assert engine_options(p.parse_args(["--decode-steps", "8"]))["decode_steps"] == 8
    for bad, msg in (("0", "must be positive"), ("x", "number of steps or 'auto'")):
        with pytest.raises(ValueError, match=msg):
            engine_options(p.parse_args(["--decode-steps", bad]))
