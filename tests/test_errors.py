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


def test_generate_stops_at_the_context(ckpt, capsys):
    """A prompt that fits with max_new_tokens past the context generates up to the context and
    stops there with finish reason "length" (as HF and llama.cpp do), instead of refusing."""
    import lserve_jax

    engine = lserve_jax.load(ckpt, pattern=None, progress=False)
    prompt = list(range(3, 13))
    out = engine.generate([prompt], lserve_jax.SamplingParams(max_new_tokens=CONTEXT, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == CONTEXT - len(prompt)
    rc, _ = run_generate(capsys, "--checkpoint", ckpt, "--prompt", PROMPT, "--max-new-tokens", str(CONTEXT))
    assert rc == 0


def test_generate_page_pool_exhausted(ckpt, capsys):
    # 16-token pages, 2 pages = scratch + 1 usable; 10 prompt + 16 new tokens need 2
    rc, err = run_generate(capsys, "--checkpoint", ckpt, "--prompt", PROMPT, "--max-new-tokens", "16",
                           "--page-size", "16", "--logical-page-size", "4", "--token-budget", "64",
                           "--num-pages", "2")
    assert rc == 1 and "page pool exhausted" in err and "num_pages" in err


@pytest.mark.parametrize("knobs, message", [
    (["--num-pages", "1"], "at least 2 pages"),
    (["--num-pages", "0"], "at least 2 pages"),  # 0 must not silently mean "the default"
    (["--max-seq-len", "0"], "--max-seq-len must be >= 1"),
    (["--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
    (["--top-p", "0"], "top_p must be in (0, 1]"),
])
def test_generate_invalid_sizes(ckpt, capsys, knobs, message):
    """Bad option values are usage errors: exit 2, before the model loads."""
    rc, err = run_generate(capsys, "--checkpoint", ckpt, "--prompt", PROMPT, "--max-new-tokens", "4", *knobs)
    assert rc == 2 and message in err


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
    assert rc == 2 and message in err


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
    alloc = engine.scheduler.allocator
    with pytest.raises(PoolExhausted, match="needs 4 pages"):
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


# --- malformed sources: one line naming the file and the field (issue 17, item 4) -------------

def assert_one_error_line(err: str, *needles: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def _edit_safetensors_header(src: Path, edit) -> None:
    import struct

    data = (src / WEIGHTS).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    (src / WEIGHTS).write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def _rename_field(old: str, new: str):
    def edit(h):
        h["model.norm.weight"][new] = h["model.norm.weight"].pop(old)
    return edit


def _overlap(h):  # two norms of one size made to share their bytes
    h["model.layers.0.post_attention_layernorm.weight"]["data_offsets"] = \
        list(h["model.layers.0.input_layernorm.weight"]["data_offsets"])


@pytest.mark.parametrize("edit, needles", [
    (lambda h: h["model.norm.weight"].pop("shape"), ["model.norm.weight", "has no 'shape'"]),
    (lambda h: h["model.norm.weight"].pop("dtype"), ["model.norm.weight", "has no 'dtype'"]),
    (lambda h: h["model.norm.weight"].pop("data_offsets"), ["model.norm.weight", "has no 'data_offsets'"]),
    (_rename_field("shape", "shapes"), ["model.norm.weight", "has no 'shape'"]),
    (_rename_field("data_offsets", "offsets"), ["model.norm.weight", "has no 'data_offsets'"]),
    (lambda h: h["model.norm.weight"].update(shape="64"), ["model.norm.weight", "shape must be a list"]),
    (lambda h: h["model.norm.weight"].update(dtype=["F32"]), ["model.norm.weight", "dtype must be a string"]),
    (lambda h: h.update({"model.norm.weight": "F32"}), ["model.norm.weight", "not an object with dtype"]),
    (lambda h: h.update({"model.norm.weight": [0, 256]}), ["model.norm.weight", "not an object with dtype"]),
    (_overlap, ["post_attention_layernorm.weight", "data_offsets", "overlap"]),
    (lambda h: h.pop("model.layers.0.input_layernorm.weight"), ["data_offsets", "belong to no tensor"]),
], ids=["no-shape", "no-dtype", "no-offsets", "shapes", "offsets", "shape-str", "dtype-list", "entry-str",
        "entry-list", "overlap", "gap"])
def test_convert_malformed_safetensors_header(src, tmp_path, capsys, edit, needles):
    _edit_safetensors_header(src, edit)
    rc, err = run_convert(capsys, src, tmp_path / "out")
    assert rc == 1
    assert_one_error_line(err, f"{src / WEIGHTS}:", *needles)
    assert_nothing_written(tmp_path / "out")


def _set(**fields):
    return lambda cfg: {**cfg, **fields}


@pytest.mark.parametrize("edit, needles", [
    (lambda cfg: [cfg], ["expected a JSON object"]),
    (_set(hidden_size=None), ["hidden_size must be a positive integer, got null"]),
    (_set(hidden_size="abc"), ["hidden_size must be a positive integer, got \"abc\""]),
    (_set(hidden_size="64"), ["hidden_size must be a positive integer, got \"64\""]),
    (_set(num_hidden_layers=[2]), ["num_hidden_layers must be a positive integer, got [2]"]),
    (_set(rope_scaling="linear"), ["rope_scaling must be an object or null, got \"linear\""]),
    (_set(eos_token_id=[2, None]), ["eos_token_id", "[2, null]"]),
    (_set(num_attention_heads=0), ["num_attention_heads must be a positive integer, got 0"]),
    (_set(max_position_embeddings=-1), ["max_position_embeddings must be a positive integer, got -1"]),
    (_set(rms_norm_eps=-1e-6), ["rms_norm_eps must be a positive number, got -1e-06"]),
    (_set(tie_word_embeddings="false"), ["tie_word_embeddings must be true or false"]),
    (lambda cfg: {k: v for k, v in cfg.items() if k != "vocab_size"}, ["the field 'vocab_size' is missing"]),
], ids=["list", "hidden-null", "hidden-abc", "hidden-str", "layers-list", "rope-str", "eos-null", "heads-0",
        "max-pos-negative", "eps-negative", "tie-str", "no-vocab"])
def test_convert_malformed_config(src, tmp_path, capsys, edit, needles):
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(edit(cfg)))
    rc, err = run_convert(capsys, src, tmp_path / "out")
    assert rc == 1
    assert_one_error_line(err, f"{src / 'config.json'}:", *needles)
    assert_nothing_written(tmp_path / "out")


def test_convert_config_with_too_many_layers_gives_a_short_message(src, tmp_path, capsys):
    """100000 layers: the missing tensors are listed up to a few, not all 900000 (a 39 MB line)."""
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 100000}))
    rc, err = run_convert(capsys, src, tmp_path / "out")
    assert rc == 1
    line = assert_one_error_line(err, str(src), "num_hidden_layers in config.json is 100000 but the weights hold 2",
                                 "model.layers.2.", "... and 899974 more")
    assert len(line) < 1000
    assert_nothing_written(tmp_path / "out")


def test_convert_non_finite_weights(src, tmp_path, capsys):
    def edit(t):
        t["model.layers.1.mlp.up_proj.weight"][3, 5] = np.inf

    _rewrite_weights(src, edit)
    rc, err = run_convert(capsys, src, tmp_path / "out")
    assert rc == 1
    assert_one_error_line(err, "model.layers.1.mlp.up_proj.weight in model.safetensors: 1 NaN or infinite")
    assert_nothing_written(tmp_path / "out")


def test_convert_index_with_a_list_weight_map(src, tmp_path, capsys):
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": [WEIGHTS]}))
    rc, err = run_convert(capsys, src, tmp_path / "out")
    assert rc == 1
    assert_one_error_line(err, "model.safetensors.index.json: corrupted index: weight_map must map")
    assert_nothing_written(tmp_path / "out")


class NotAWeight:
    """Pickled by reference (tests.test_errors.NotAWeight): torch.load(weights_only=True) refuses it."""


@pytest.mark.parametrize("value, needles", [
    (3, ["entry model.norm.weight is not a tensor (type int)"]),
    ({"weight": 1}, ["entry model.norm.weight is not a tensor (type dict; a nested state dict?)"]),
    (NotAWeight(), ["weights_only=True) refuses its pickle", "NotAWeight"]),
], ids=["int", "nested-dict", "refused-pickle"])
def test_convert_bad_torch_bin(src, tmp_path, capsys, value, needles):
    import torch
    from safetensors.torch import load_file

    state = load_file(src / WEIGHTS)
    (src / WEIGHTS).unlink()
    state["model.norm.weight"] = value
    torch.save(state, src / "pytorch_model.bin")
    rc, err = run_convert(capsys, src, tmp_path / "out")
    assert rc == 1
    assert_one_error_line(err, f"{src / 'pytorch_model.bin'}:", *needles)
    assert_nothing_written(tmp_path / "out")


def _gguf_with(tmp_path: Path, edit) -> Path:
    """The tiny Llama GGUF of test_gguf, edited in place through a writable GGUFReader."""
    import gguf

    from .test_gguf import make_hf_weights, write_gguf

    path = write_gguf(tmp_path / "m.gguf", "llama", make_hf_weights())
    reader = gguf.GGUFReader(str(path), "r+")
    edit(reader)
    reader.data.flush()
    return path


def _gguf_value(key, value):
    def edit(reader):
        field = reader.fields[key]
        field.parts[field.data[0]][0] = value
    return edit


def _gguf_tensor_type(name, ggml_type):
    def edit(reader):
        tensor = next(t for t in reader.tensors if t.name == name)
        tensor.field.parts[4][0] = ggml_type  # name_len, name, n_dims, dims, type, offset
    return edit


@pytest.mark.parametrize("edit, needles", [
    (_gguf_value("llama.attention.head_count", 0), ["'llama.attention.head_count' must be a positive integer, got 0"]),
    (_gguf_value("llama.embedding_length", 60), ["'llama.embedding_length' is 60 but token_embd.weight has shape"]),
    (_gguf_value("llama.block_count", 100000), ["'llama.block_count' is 100000 but the file has tensors for 2 blocks"]),
    (_gguf_value("llama.attention.layer_norm_rms_epsilon", -1.0), ["layer_norm_rms_epsilon' must be a positive"]),
    # F32 -> F64 doubles output_norm's bytes over output.weight's (it read them, as NaN, before)
    (_gguf_tensor_type("output_norm.weight", 28), ["output_norm.weight (F64, dims [64]) ends at", "corrupted"]),
    # F32 -> BF16 halves a norm: the next tensor no longer starts where it ends
    (_gguf_tensor_type("blk.0.attn_norm.weight", 30), ["blk.0.attn_norm.weight (BF16, dims [64]) ends at"]),
    # ... or the last one: its lost half is left over at the end of the file
    (_gguf_tensor_type("blk.1.ffn_down.weight", 1), ["after the last tensor blk.1.ffn_down.weight (F16"]),
], ids=["head-count-0", "embedding-length", "block-count", "eps-negative", "type-overlap", "type-gap",
        "type-last"])
def test_convert_malformed_gguf(tmp_path, capsys, edit, needles):
    path = _gguf_with(tmp_path, edit)
    rc, err = run_convert(capsys, path, tmp_path / "out")
    assert rc == 1
    assert_one_error_line(err, f"{path}:", *needles)
    assert_nothing_written(tmp_path / "out")


def test_convert_gguf_with_nan_weights(tmp_path, capsys):
    from .test_gguf import make_hf_weights, write_gguf

    weights = make_hf_weights()
    weights["model.layers.0.mlp.up_proj.weight"][1, 2] = np.nan
    path = write_gguf(tmp_path / "m.gguf", "llama", weights)
    rc, err = run_convert(capsys, path, tmp_path / "out")
    assert rc == 1
    assert_one_error_line(err, f"{path}:", "blk.0.ffn_up.weight (F32) has 1 NaN or infinite values")
    assert_nothing_written(tmp_path / "out")


def test_python_m_convert_malformed_config(src, tmp_path):
    """The entry point as users run it: one line on stderr, exit 1, no traceback, nothing written."""
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "hidden_size": None}))
    proc = subprocess.run([sys.executable, "-m", "convert", str(src), str(tmp_path / "out"), "--quiet"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert_one_error_line(proc.stderr, f"{src / 'config.json'}: hidden_size must be a positive integer, got null")
    assert_nothing_written(tmp_path / "out")


def test_convert_tensor_stored_twice(src, tmp_path, capsys):
    """Two shards holding one tensor: which copy wins is not for the converter to guess."""
    from safetensors.numpy import load_file, save_file

    norm = load_file(src / WEIGHTS)["model.norm.weight"]
    save_file({"model.norm.weight": norm + 1}, src / "model-extra.safetensors")
    rc, err = run_convert(capsys, src, tmp_path / "out")
    assert rc == 1
    assert_one_error_line(err, str(src), "stored twice: model.norm.weight in model-extra.safetensors and in "
                                         "model.safetensors")
    assert_nothing_written(tmp_path / "out")


def test_convert_float16_overflow(src, tmp_path, capsys):
    """A weight beyond float16's range would become inf under --dtype float16."""
    def edit(t):
        t["model.norm.weight"][0] = 1e6

    _rewrite_weights(src, edit)
    rc, err = run_convert(capsys, src, tmp_path / "out", "--dtype", "float16")
    assert rc == 1
    assert_one_error_line(err, "model.norm.weight in model.safetensors: values overflow float16")
    assert_nothing_written(tmp_path / "out")
