"""Rebuild a Hugging Face ``tokenizer.json`` from a GGUF file's ``tokenizer.ggml.*`` fields.

A GGUF file carries the vocabulary, the BPE merges and the per-token types, but not the
tokenizer *pipeline* (normaliser, pre-tokeniser regex, decoder).  llama.cpp encodes the
pipeline as a name in ``tokenizer.ggml.pre``; this module maps the names we support to the
``tokenizers`` components the original Hugging Face tokenizer used, so that text encodes to
the same ids the model was trained on.  Only byte-level BPE (``tokenizer.ggml.model ==
"gpt2"``) is supported — that covers SmolLM/SmolLM2, Qwen2/2.5 and Llama-3.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
from tokenizers import pre_tokenizers, processors

log = logging.getLogger(__name__)

# llama.cpp token types (gguf.TokenType); repeated here so the mapping reads on its own.
TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5
TOKEN_BYTE = 6

# Split regexes used by the original tokenizers (the same ones llama.cpp hard-codes per
# ``tokenizer.ggml.pre`` value).  Llama-3 groups digits by up to three, Qwen2 splits every
# digit on its own; both are applied before the byte-level mapping.
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_LLAMA3_REGEX = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclasses.dataclass(frozen=True)
class _Pipeline:
    """How one ``tokenizer.ggml.pre`` family pre-tokenises / normalises text."""

    kind: str  # "digits+bytelevel" | "bytelevel" | "split"
    regex: str | None = None
    nfc: bool = False
    ignore_merges: bool = False


_PIPELINES: dict[str, _Pipeline] = {
    # SmolLM, SmolLM2 and StarCoder: every digit is its own pre-token, then GPT-2's
    # byte-level regex split (this is exactly how their tokenizer.json is set up).
    "smollm": _Pipeline("digits+bytelevel"),
    "starcoder": _Pipeline("digits+bytelevel"),
    # Plain GPT-2 byte-level BPE.  "default" is what llama.cpp assumes when the field is
    # absent; it is closest to GPT-2, so we treat it the same (with a warning).
    "gpt-2": _Pipeline("bytelevel"),
    "default": _Pipeline("bytelevel"),
    "qwen2": _Pipeline("split", _QWEN2_REGEX, nfc=True),
    "deepseek-r1-qwen": _Pipeline("split", _QWEN2_REGEX, nfc=True),
    # Llama-3's tokenizer.json sets ignore_merges: whole words that are in the vocab win.
    "llama-bpe": _Pipeline("split", _LLAMA3_REGEX, ignore_merges=True),
    "llama3": _Pipeline("split", _LLAMA3_REGEX, ignore_merges=True),
    "smaug-bpe": _Pipeline("split", _LLAMA3_REGEX, ignore_merges=True),
}

SUPPORTED_PRE_TOKENIZERS = tuple(sorted(_PIPELINES))


class TokenizerConversionError(ValueError):
    """The GGUF tokenizer metadata cannot be turned into a Hugging Face tokenizer."""


@dataclasses.dataclass
class GGUFTokenizerInfo:
    """Everything taken from the ``tokenizer.ggml.*`` fields, plus the built tokenizer."""

    tokenizer_json: str
    tokens: list[str]
    bos_token_id: int | None
    eos_token_id: int | None
    unk_token_id: int | None
    pad_token_id: int | None
    add_bos_token: bool
    add_eos_token: bool
    pre: str
    special_token_ids: list[int]  # control/unknown tokens, added as special AddedTokens

    def token(self, idx: int | None) -> str | None:
        return None if idx is None else self.tokens[idx]


def _pre_tokenizer(pipe: _Pipeline):
    if pipe.kind == "digits+bytelevel":
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ])
    if pipe.kind == "bytelevel":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    # The regex does the splitting, so ByteLevel must only remap bytes (use_regex=False).
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pipe.regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])


def _parse_merges(merges: Sequence[str]) -> list[tuple[str, str]]:
    out = []
    for i, m in enumerate(merges):
        # Byte-level tokens never contain a literal space (it is mapped to 'Ġ'), so the
        # single space is an unambiguous separator.
        parts = m.split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise TokenizerConversionError(f"tokenizer.ggml.merges[{i}] = {m!r} is not 'left right'")
        out.append((parts[0], parts[1]))
    return out


def _opt_id(fields: dict, key: str, n_vocab: int) -> int | None:
    v = fields.get(key)
    if v is None:
        return None
    v = int(v)
    if not 0 <= v < n_vocab:
        # Some converters write -1 / out-of-range ids to mean "none".
        log.warning("%s = %d is outside the vocabulary (%d); ignoring it", key, v, n_vocab)
        return None
    return v


def build_tokenizer(fields: dict) -> GGUFTokenizerInfo:
    """Build a ``tokenizers`` tokenizer from GGUF metadata.

    ``fields`` maps GGUF keys (``"tokenizer.ggml.tokens"``, ...) to plain Python values
    (strings, ints, lists).  Raises :class:`TokenizerConversionError` for unsupported or
    inconsistent metadata.
    """
    model = fields.get("tokenizer.ggml.model")
    if model is None:
        raise TokenizerConversionError("the GGUF file has no tokenizer (tokenizer.ggml.model missing)")
    if model != "gpt2":
        raise TokenizerConversionError(
            f"tokenizer.ggml.model = {model!r} is not supported; only byte-level BPE ('gpt2') "
            "tokenizers can be converted (SentencePiece 'llama' vocabularies are not)")
    pre = fields.get("tokenizer.ggml.pre") or "default"
    pipe = _PIPELINES.get(pre)
    if pipe is None:
        raise TokenizerConversionError(
            f"tokenizer.ggml.pre = {pre!r} is not a known pre-tokenizer; supported: "
            f"{', '.join(SUPPORTED_PRE_TOKENIZERS)}")
    if pre == "default":
        log.warning("tokenizer.ggml.pre is missing/'default'; assuming GPT-2 byte-level splitting")

    tokens = list(fields.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise TokenizerConversionError("tokenizer.ggml.tokens is missing or empty")
    n = len(tokens)
    types = list(fields.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * n)
    if len(types) != n:
        raise TokenizerConversionError(
            f"tokenizer.ggml.token_type has {len(types)} entries but there are {n} tokens")
    merges = _parse_merges(fields.get("tokenizer.ggml.merges") or [])
    if not merges:
        raise TokenizerConversionError("tokenizer.ggml.merges is missing; a BPE tokenizer needs merges")

    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if t in vocab:
            # BPE needs a bijection; keep the first id (llama.cpp does the same lookup).
            log.warning("duplicate token %r at ids %d and %d; keeping %d", t, vocab[t], i, vocab[t])
            continue
        vocab[t] = i
    for a, b in merges:
        if a not in vocab or b not in vocab or (a + b) not in vocab:
            raise TokenizerConversionError(f"merge {a!r} {b!r} uses tokens missing from the vocabulary")

    bpe = models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                     fuse_unk=False, byte_fallback=False, ignore_merges=pipe.ignore_merges)
    tok = Tokenizer(bpe)
    if pipe.nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = _pre_tokenizer(pipe)
    tok.decoder = decoders.ByteLevel()

    # Control / unknown tokens are "special": matched before pre-tokenisation (so
    # "<|im_start|>" stays one id) and skipped by decode(skip_special_tokens=True).
    # User-defined tokens are matched verbatim too but are not special, as in HF.
    added, special_ids = [], []
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty in (TOKEN_CONTROL, TOKEN_UNKNOWN):
            added.append(AddedToken(t, special=True, normalized=False))
            special_ids.append(i)
        elif ty == TOKEN_USER_DEFINED:
            added.append(AddedToken(t, special=False, normalized=False))
    specials = [a for a in added if a.special]
    plain = [a for a in added if not a.special]
    if specials:
        tok.add_special_tokens(specials)
    if plain:
        tok.add_tokens(plain)

    bos = _opt_id(fields, "tokenizer.ggml.bos_token_id", n)
    eos = _opt_id(fields, "tokenizer.ggml.eos_token_id", n)
    unk = _opt_id(fields, "tokenizer.ggml.unknown_token_id", n)
    pad = _opt_id(fields, "tokenizer.ggml.padding_token_id", n)
    add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", False))
    add_eos = bool(fields.get("tokenizer.ggml.add_eos_token", False))
    if add_bos and bos is None:
        raise TokenizerConversionError("tokenizer.ggml.add_bos_token is set but there is no bos token id")
    if add_eos and eos is None:
        raise TokenizerConversionError("tokenizer.ggml.add_eos_token is set but there is no eos token id")

    # ByteLevel post-processing only fixes offsets; BOS/EOS insertion (when the GGUF asks
    # for it, e.g. Llama-3) is a template on top.
    procs = [processors.ByteLevel(trim_offsets=False)]
    if add_bos or add_eos:
        def seq(piece: str, type_id: int) -> list[str]:
            return ([f"{tokens[bos]}:{type_id}"] if add_bos else []) + [f"{piece}:{type_id}"] + (
                [f"{tokens[eos]}:{type_id}"] if add_eos else [])
        sp = {tokens[i]: i for i, on in ((bos, add_bos), (eos, add_eos)) if on}
        procs.append(processors.TemplateProcessing(
            single=" ".join(seq("$A", 0)), pair=" ".join(seq("$A", 0) + seq("$B", 1)),
            special_tokens=list(sp.items())))
    tok.post_processor = procs[0] if len(procs) == 1 else processors.Sequence(procs)

    # Sanity check: ids must map back to their tokens, else ids drift from the embedding rows.
    for i in sorted({0, n // 2, n - 1, *special_ids}):
        if vocab.get(tokens[i]) == i and tok.id_to_token(i) != tokens[i]:
            raise TokenizerConversionError(f"token id {i} ({tokens[i]!r}) does not round-trip")

    return GGUFTokenizerInfo(
        tokenizer_json=tok.to_str(), tokens=tokens, bos_token_id=bos, eos_token_id=eos,
        unk_token_id=unk, pad_token_id=pad, add_bos_token=add_bos, add_eos_token=add_eos,
        pre=pre, special_token_ids=special_ids)


def tokenizer_config(info: GGUFTokenizerInfo, chat_template: str | None,
                     model_max_length: int | None) -> dict:
    """A ``tokenizer_config.json`` dict that makes transformers load ``tokenizer.json`` as-is.

    ``PreTrainedTokenizerFast`` is named explicitly: model-specific tokenizer classes
    (e.g. LlamaTokenizer) may rebuild the pipeline and lose the pre-tokenizer set up here.
    """
    cfg: dict = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": info.add_bos_token,
        "add_eos_token": info.add_eos_token,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            str(i): {"content": info.tokens[i], "special": True, "normalized": False,
                     "lstrip": False, "rstrip": False, "single_word": False}
            for i in info.special_token_ids
        },
    }
    for name, idx in (("bos_token", info.bos_token_id), ("eos_token", info.eos_token_id),
                      ("unk_token", info.unk_token_id), ("pad_token", info.pad_token_id)):
        if idx is not None:
            cfg[name] = info.tokens[idx]
    if model_max_length:
        cfg["model_max_length"] = int(model_max_length)
    if chat_template:
        cfg["chat_template"] = chat_template
    return cfg
