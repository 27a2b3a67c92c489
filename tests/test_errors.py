"""Bad inputs give a clear one-line message and a non-zero exit, and leave nothing half-written.

Both CLIs are called in-process (`main([...])`, checking the return code and stderr) and the
`python -m convert` entry point once as a subprocess.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lserve_jax.checkpoint import open_checkpoint
from lserve_jax.convert import cli as convert_cli
from lserve_jax import generate as generate_cli

from .hf_models import make_hf_model

REPO = Path(__file__).resolve().parents[1]
CONTEXT = 64  # the tiny model's max_position_embeddings: a long prompt is cheap to write
WEIGHTS = "model.safetensors"


def word_tokenizer_json(path: Path, vocab_size: int = 128) -> None:
    """A WordLevel tokenizer: id i <-> "w{i:03d}", split on whitespace."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, **{f"w{i:03d}": i for i in range(1, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))


def words(n: int) -> str:
    return " ".join(f"w{1 + i % 100:03d}" for i in range(n))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A tiny random HF checkpoint (safetensors) with a 64-token context."""
    d = tmp_path_factory.mktemp("hf") / "model"
    make_hf_model("mistral", d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["max_position_embeddings"] = CONTEXT
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.fixture(scope="module")
def ckpt(hf_dir, tmp_path_factory) -> Path:
    """hf_dir converted (float32), with a tokenizer.json written into it."""
    d = tmp_path_factory.mktemp("ckpt") / "tiny"
    assert convert_cli.main([str(hf_dir), str(d), "--dtype", "float32", "--quiet"]) == 0
    word_tokenizer_json(d / "tokenizer.json")
    return d


@pytest.fixture
def src(hf_dir, tmp_path) -> Path:
    """A private copy of the HF checkpoint that a test may damage."""
    return Path(shutil.copytree(hf_dir, tmp_path / "src"))


def assert_nothing_written(dest: Path) -> None:
    assert not dest.exists(), f"{dest} was created by a failed conversion"
    leftovers = [p.name for p in dest.parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]
    assert not leftovers, f"temporary directories left behind: {leftovers}"


def run_convert(capsys, *args) -> tuple[int, str]:
    rc = convert_cli.main([*map(str, args), "--quiet"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


def run_generate(capsys, *args) -> tuple[int, str]:
    rc = generate_cli.main([*map(str, args), "--quiet"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


# --- converter -------------------------------------------------------------------------------

def _rewrite_weights(src: Path, edit) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(src / WEIGHTS)
    edit(tensors)
    save_file(tensors, src / WEIGHTS)


def test_convert_missing_tensor(src, tmp_path, capsys):
    _rewrite_weights(src, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    rc, err = run_convert(capsys, src, tmp_path / "out")
    assert rc == 1
    assert "error:" in err and "missing: model.layers.1.mlp.up_proj.weight" in err
    assert_nothing_written(tmp_path / "out")


def test_convert_wrong_shape(src, tmp_path, capsys):
    def edit(t):  # k_proj of a 2-KV-head model stored as if it had 1 KV head
        name = "model.layers.0.self_attn.k_proj.weight"
        t[name] = np.ascontiguousarray(t[name][: t[name].shape[0] // 2])

    _rewrite_weights(src, edit)
    rc, err = run_convert(capsys, src, tmp_path / "out")
    assert rc == 1
    assert "wrong shape" in err and "model.layers.0.self_attn.k_proj.weight: (8, 64) (expected (16, 64))" in err
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("keep, message", [
    (4, "truncated safetensors file (no header)"),
    (0.5, "ends past the end of the file"),  # header intact, data cut
    (100, "truncated safetensors file (header of"),  # header cut
])
def test_convert_truncated_safetensors(src, tmp_path, capsys, keep, message):
    data = (src / WEIGHTS).read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep
    (src / WEIGHTS).write_bytes(data[:n])
    rc, err = run_convert(capsys, src, tmp_path / "out")
    assert rc == 1 and message in err and WEIGHTS in err
    assert_nothing_written(tmp_path / "out")


def test_convert_unknown_architecture(src, tmp_path, capsys):
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (src / "config.json").write_text(json.dumps(cfg))
    rc, err = run_convert(capsys, src, tmp_path / "out")
    assert rc == 1
    assert "unsupported architecture" in err and "GPT2LMHeadModel" in err and "LlamaForCausalLM" in err
    assert_nothing_written(tmp_path / "out")


def test_convert_missing_source(tmp_path, capsys):
    rc, err = run_convert(capsys, tmp_path / "nope", tmp_path / "out")
    assert rc == 1 and "source not found" in err and "nope" in err
    assert_nothing_written(tmp_path / "out")


def test_convert_source_without_weights(src, tmp_path, capsys):
    (src / WEIGHTS).unlink()
    rc, err = run_convert(capsys, src, tmp_path / "out")
    assert rc == 1 and "no weights" in err
    assert_nothing_written(tmp_path / "out")


def test_convert_corrupt_gguf(tmp_path, capsys):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)
    rc, err = run_convert(capsys, bad, tmp_path / "out")
    assert rc == 1 and "not a readable GGUF file" in err
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("index, message", [
    ("{not json", "corrupted index"),
    (json.dumps({"metadata": {}}), "corrupted index"),  # no weight_map
    (json.dumps({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}),
     "names shards that are missing"),
])
def test_convert_corrupted_index(src, tmp_path, capsys, index, message):
    (src / "model.safetensors.index.json").write_text(index)
    rc, err = run_convert(capsys, src, tmp_path / "out")
    assert rc == 1 and message in err and "model.safetensors.index.json" in err
    assert_nothing_written(tmp_path / "out")


def test_convert_destination_exists_needs_force(hf_dir, tmp_path, capsys):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep.txt").write_text("user data")
    rc, err = run_convert(capsys, hf_dir, dest)
    assert rc == 1 and "already exists" in err and "--force" in err
    assert (dest / "keep.txt").read_text() == "user data"  # untouched
    rc, err = run_convert(capsys, hf_dir, dest, "--force")
    assert rc == 0, err
    assert not (dest / "keep.txt").exists()
    assert open_checkpoint(dest).config.max_position_embeddings == CONTEXT
    assert not [p.name for p in tmp_path.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def test_convert_failing_write_keeps_the_old_destination(hf_dir, ckpt, tmp_path, capsys, monkeypatch):
    """A write that dies half-way (disk full) removes its temp dir; with --force, the checkpoint
    being replaced survives intact."""
    def half_write(tmp, *args, **kwargs):
        (tmp / "params").mkdir()
        (tmp / "params" / "shard").write_bytes(b"\0" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(convert_cli, "write_checkpoint", half_write)
    rc, err = run_convert(capsys, hf_dir, tmp_path / "fresh")
    assert rc == 1 and "No space left on device" in err
    assert_nothing_written(tmp_path / "fresh")

    old = Path(shutil.copytree(ckpt, tmp_path / "old"))
    before = (old / "lserve.json").read_text()
    rc, err = run_convert(capsys, hf_dir, old, "--force")
    assert rc == 1 and "No space left on device" in err
    assert (old / "lserve.json").read_text() == before and (old / "params").is_dir()
    assert not [p.name for p in tmp_path.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def test_convert_bad_pattern(hf_dir, tmp_path, capsys):
    pat = tmp_path / "heads.tsv"
    pat.write_text("1\t0\t1\n0\t1\t0\n")  # 2 x 3, the model has 2 x 2
    rc, err = run_convert(capsys, hf_dir, tmp_path / "out", "--pattern", pat)
    assert rc == 1 and "head pattern has shape (2, 3)" in err
    assert_nothing_written(tmp_path / "out")


def test_python_m_convert_entry_point(tmp_path):
    """`python -m convert` from the repo root: a clean error and exit 1, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "convert", str(tmp_path / "nope"), str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "error: source not found" in proc.stderr and "Traceback" not in proc.stderr
    assert_nothing_written(tmp_path / "out")


def test_python_m_convert_usage_error():
    """argparse errors (no arguments) exit 2 with usage text, not a traceback."""
    with pytest.raises(SystemExit) as e:
        convert_cli.main([])
    assert e.value.code == 2


# --- generate CLI ----------------------------------------------------------------------------

PROMPT = words(10)


def test_generate_succeeds_on_the_tiny_checkpoint(ckpt, capsys):
    """The baseline the failures below differ from: this checkpoint and prompt do work, and the
    streamed stdout is exactly the generated text."""
    import lserve_jax

    rc = generate_cli.main(["--checkpoint", str(ckpt), "--prompt", PROMPT, "--max-new-tokens", "6"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "[stats]" in err
    want = lserve_jax.load(ckpt, progress=False).generate([PROMPT], lserve_jax.SamplingParams(max_new_tokens=6))
    assert want[0].text and out == want[0].text + "\n"


def test_generate_missing_checkpoint(tmp_path, capsys):
    rc, err = run_generate(capsys, "--checkpoint", tmp_path / "nope", "--prompt", PROMPT)
    assert rc == 1 and "checkpoint directory not found" in err


def test_generate_dir_that_is_not_a_checkpoint(hf_dir, capsys):
    rc, err = run_generate(capsys, "--checkpoint", hf_dir, "--prompt", PROMPT)
    assert rc == 1 and "is not an lserve_jax checkpoint" in err and "python -m convert" in err


@pytest.mark.parametrize("content, message", [
    ('{"format": 1, "model": {"vocab', "corrupted"),  # truncated JSON
    ('{"format": 1, "dtype": "float32"}', "corrupted"),  # no model config
    ('{"format": 1, "dtype": "float32", "model": {"architecture": "llama"}}', "corrupted"),
    (None, "checkpoint format 99"),  # written by a future version
    (None, "unknown dtype"),
])
def test_generate_corrupted_meta(ckpt, tmp_path, capsys, content, message):
    bad = Path(shutil.copytree(ckpt, tmp_path / "bad"))
    meta = json.loads((bad / "lserve.json").read_text())
    if message.startswith("checkpoint format"):
        content = json.dumps({**meta, "format": 99})
    elif message == "unknown dtype":
        content = json.dumps({**meta, "dtype": "int3"})
    (bad / "lserve.json").write_text(content)
    rc, err = run_generate(capsys, "--checkpoint", bad, "--prompt", PROMPT)
    assert rc == 1 and message in err


def test_generate_missing_params(ckpt, tmp_path, capsys):
    bad = Path(shutil.copytree(ckpt, tmp_path / "bad"))
    shutil.rmtree(bad / "params")
    rc, err = run_generate(capsys, "--checkpoint", bad, "--prompt", PROMPT)
    assert rc == 1 and "incomplete" in err and "params" in err


def test_generate_damaged_params(ckpt, tmp_path, capsys):
    bad = Path(shutil.copytree(ckpt, tmp_path / "bad"))
    for f in (bad / "params").rglob("*"):  # orbax's data files, emptied
        if f.is_file() and f.stat().st_size > 0 and f.suffix != ".json":
            f.write_bytes(b"")
    rc, err = run_generate(capsys, "--checkpoint", bad, "--prompt", PROMPT)
    assert rc == 1 and "cannot restore the parameters" in err


def test_generate_no_tokenizer(ckpt, tmp_path, capsys):
    bad = Path(shutil.copytree(ckpt, tmp_path / "bad"))
    (bad / "tokenizer.json").unlink()
    rc, err = run_generate(capsys, "--checkpoint", bad, "--prompt", PROMPT)
    assert rc == 1 and "no tokenizer.json" in err


@pytest.mark.parametrize("prompt", ["", "   \n"])
def test_generate_empty_prompt(ckpt, capsys, prompt):
    rc, err = run_generate(capsys, "--checkpoint", ckpt, "--prompt", prompt)
    assert rc == 2 and "prompt 0 is empty" in err


def test_generate_unreadable_prompt_file(ckpt, tmp_path, capsys):
    rc, err = run_generate(capsys, "--checkpoint", ckpt, "--prompt-file", tmp_path / "nope.txt")
    assert rc == 2 and "cannot read --prompt-file" in err


def test_generate_prompt_longer_than_context(ckpt, capsys):
    rc, err = run_generate(capsys, "--checkpoint", ckpt, "--prompt", words(CONTEXT + 6), "--max-new-tokens", "4")
    assert rc == 1
    assert f"prompt 0 has {CONTEXT + 6} tokens" in err and f"the limit is {CONTEXT}" in err


def test_generate_prompt_plus_new_tokens_over_context(ckpt, capsys):
    rc, err = run_generate(capsys, "--checkpoint", ckpt, "--prompt", PROMPT, "--max-new-tokens", str(CONTEXT))
    assert rc == 1 and f"needs {10 + CONTEXT} positions but the limit is {CONTEXT}" in err


def test_generate_page_pool_exhausted(ckpt, capsys):
    # 16-token pages, 2 pages = scratch + 1 usable; 10 prompt + 16 new tokens need 2
    rc, err = run_generate(capsys, "--checkpoint", ckpt, "--prompt", PROMPT, "--max-new-tokens", "16",
                           "--page-size", "16", "--logical-page-size", "4", "--token-budget", "64",
                           "--num-pages", "2")
    assert rc == 1 and "page pool exhausted" in err and "num_pages" in err


@pytest.mark.parametrize("knobs, message", [
    (["--num-pages", "1"], "at least 2 pages"),
    (["--num-pages", "0"], "at least 2 pages"),  # 0 must not silently mean "the default"
    (["--max-seq-len", "0"], "max_seq_len must be positive"),
    (["--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
    (["--top-p", "0"], "top_p must be in (0, 1]"),
])
def test_generate_invalid_sizes(ckpt, capsys, knobs, message):
    rc, err = run_generate(capsys, "--checkpoint", ckpt, "--prompt", PROMPT, "--max-new-tokens", "4", *knobs)
    assert rc == 1 and message in err


@pytest.mark.parametrize("knobs, message", [
    (["--page-size", "16", "--logical-page-size", "32"], "page_size=16 must be a multiple of logical_page_size=32"),
    (["--page-size", "48", "--logical-page-size", "16"], "page_size must be a power of two"),
    (["--token-budget", "8"], "token_budget=8 is below one page (64)"),
    (["--static-sparsity", "1.5"], "static_sparsity must be in [0, 1]"),
    (["--decode-local", "0"], "decode_local must be >= 1"),
    (["--prefill-sink", "-1"], "prefill_sink must be >= 0"),
])
def test_generate_invalid_sparse_knobs(ckpt, capsys, knobs, message):
    rc, err = run_generate(capsys, "--checkpoint", ckpt, "--prompt", PROMPT, *knobs)
    assert rc == 1 and message in err


@pytest.mark.parametrize("content, message", [
    (None, "head pattern file not found"),
    ("0.1\tabc\n0.2\t0.3\n", "cannot parse head pattern"),
    ("0.1\t0.2\t0.3\n0.4\t0.5\t0.6\n", "head pattern has shape (2, 3)"),  # model: 2 layers x 2 KV heads
    ("0.1\tnan\n0.2\t0.3\n", "finite 2-D"),
    ("", "finite 2-D"),
])
@pytest.mark.filterwarnings("ignore:loadtxt")  # numpy warns on the empty file before we reject it
def test_generate_bad_pattern(ckpt, tmp_path, capsys, content, message):
    pat = tmp_path / "full_attention_heads.tsv"
    if content is not None:
        pat.write_text(content)
    rc, err = run_generate(capsys, "--checkpoint", ckpt, "--prompt", PROMPT, "--pattern", pat)
    assert rc == 1 and message in err


# --- Python API ------------------------------------------------------------------------------

def test_pool_exhausted_leaves_the_engine_usable(ckpt):
    """A request that cannot fit fails before any work and changes nothing: a smaller request
    afterwards gives exactly what a fresh engine gives."""
    import lserve_jax
    from lserve_jax.engine import PoolExhausted

    sparse = lserve_jax.SparseConfig(page_size=16, logical_page_size=4, token_budget=64)
    small, sp_small = [list(range(3, 8))], lserve_jax.SamplingParams(max_new_tokens=6)
    expected = lserve_jax.load(ckpt, pattern=None, sparse=sparse, progress=False).generate(small, sp_small)

    engine = lserve_jax.load(ckpt, pattern=None, sparse=sparse, num_pages=3, progress=False)  # 2 usable pages
    engine.generate(small, sp_small)  # the cache exists and has run once
    _, alloc = engine._caches[1]
    with pytest.raises(PoolExhausted, match="need 4 pages"):
        engine.generate([list(range(1, 31))], lserve_jax.SamplingParams(max_new_tokens=20))
    assert alloc.free_pages == 2
    got = engine.generate(small, sp_small)
    assert [g.token_ids for g in got] == [g.token_ids for g in expected]
    assert alloc.free_pages == 2


def test_failure_mid_generation_leaves_the_engine_usable(ckpt):
    """An exception from the streaming callback mid-decode (after the cache was donated) must
    not break the next call."""
    import lserve_jax

    sparse = lserve_jax.SparseConfig(page_size=16, logical_page_size=4, token_budget=64)
    engine = lserve_jax.load(ckpt, pattern=None, sparse=sparse, progress=False)
    prompt, sp = [list(range(3, 12))], lserve_jax.SamplingParams(max_new_tokens=8)
    expected = engine.generate(prompt, sp)

    def boom(i, tok):
        raise RuntimeError("client went away")

    with pytest.raises(RuntimeError, match="client went away"):
        engine.generate(prompt, sp, on_token=boom)
    assert [g.token_ids for g in engine.generate(prompt, sp)] == [g.token_ids for g in expected]


@pytest.mark.parametrize("prompts, message", [
    ([], "no prompts"), ([""], "empty prompt"), (["  "], "empty prompt"), ([[]], "empty prompt"),
])
def test_api_rejects_empty_prompts(ckpt, prompts, message):
    import lserve_jax

    engine = lserve_jax.load(ckpt, pattern=None, progress=False)
    with pytest.raises(ValueError, match=message):
        engine.generate(prompts)


def test_api_rejects_unknown_dtype(ckpt):
    import lserve_jax

    with pytest.raises(ValueError, match="dtype must be one of"):
        lserve_jax.load(ckpt, dtype="int8", progress=False)


def test_safetensors_header_size_mismatch_names_the_tensor(tmp_path):
    """A header whose byte range does not fit the tensor's shape is a named corruption error."""
    import json as _json
    import struct

    from lserve_jax.convert.hf import ConversionError, read_safetensors

    header = _json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 32]}}).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    with pytest.raises(ConversionError, match="tensor w of shape"):
        list(read_safetensors(path))


def test_sliding_window_models_are_refused():
    from lserve_jax.config import ConfigError, ModelConfig

    base = dict(architectures=["MistralForCausalLM"], vocab_size=32, hidden_size=64, intermediate_size=64,
                num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768)
    with pytest.raises(ConfigError, match="sliding-window"):
        ModelConfig.from_hf({**base, "sliding_window": 4096})
    assert ModelConfig.from_hf({**base, "sliding_window": None}).architecture == "mistral"
    # Qwen2 configs name a window but switch it off
    qwen = {**base, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 4096, "use_sliding_window": False}
    assert ModelConfig.from_hf(qwen).architecture == "qwen2"
