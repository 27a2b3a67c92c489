"""What `Engine.generate` accepts, brought to the one form it runs: a list of prompts, each a
string or a list of token ids, and a complete `SamplingParams`.

Accepted, as vLLM's `LLM.generate` does for text:

    "Hello"                                    one text prompt (not five one-character prompts)
    [5, 6, 7]                                  one token-id prompt
    [{"role": "system", ...}, {"role": "user", ...}]
                                               one chat: rendered with the model's chat template
    ["Hello", [5, 6, 7], [{"role": ...}, ...]] a batch of any of the above
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from numbers import Integral
from typing import Any, Union

import numpy as np

from .sampling import SamplingParams, random_seed

Prompt = Union[str, Sequence[int], Sequence[Mapping[str, str]]]


def normalize_request(prompts: Any, sampling: SamplingParams | None,
                      tokenizer=None) -> tuple[list[str | list[int]], SamplingParams]:
    """(prompts, sampling) as `Engine.generate` runs them: see the module docstring. Chat
    conversations are rendered and tokenized here (they need `tokenizer`); text prompts are left
    for `Engine.tokenize`. A sampling seed of None becomes a fresh random seed."""
    return normalize_prompts(prompts, tokenizer), normalize_sampling(sampling)


def normalize_prompts(prompts: Any, tokenizer=None) -> list[str | list[int]]:
    if isinstance(prompts, np.ndarray):
        prompts = prompts.tolist()  # [T] one prompt, [B, T] a batch
    if isinstance(prompts, str) or _is_token_ids(prompts) or _is_chat(prompts):
        prompts = [prompts]
    elif isinstance(prompts, (bytes, Mapping)) or not isinstance(prompts, Iterable):
        raise TypeError(_what(prompts, "prompts"))
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, np.ndarray):
            p = p.tolist()
        if isinstance(p, str):
            out.append(p)
        elif _is_chat(p):
            out.append(_render_chat(p, i, tokenizer))
        elif _is_token_ids(p) or (isinstance(p, Sequence) and not isinstance(p, (str, bytes)) and not p):
            out.append([int(t) for t in p])  # [] stays empty: Engine.tokenize rejects it by name
        else:
            raise TypeError(_what(p, f"prompt {i}"))
    return out


def normalize_sampling(sampling: SamplingParams | None) -> SamplingParams:
    if sampling is None:
        return SamplingParams()
    if not isinstance(sampling, SamplingParams):
        raise TypeError(f"sampling must be a lserve_jax.SamplingParams, got {type(sampling).__name__}")
    if sampling.seed is None:
        sampling = dataclasses.replace(sampling, seed=random_seed())
    return sampling


def _is_token_ids(p) -> bool:
    return (isinstance(p, Sequence) and not isinstance(p, (str, bytes)) and len(p) > 0
            and all(isinstance(t, Integral) and not isinstance(t, bool) for t in p))


def _is_chat(p) -> bool:
    return (isinstance(p, Sequence) and not isinstance(p, (str, bytes)) and len(p) > 0
            and all(isinstance(m, Mapping) for m in p))


def _render_chat(messages: Sequence[Mapping[str, str]], i: int, tokenizer) -> list[int]:
    for j, m in enumerate(messages):
        if not (isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f"prompt {i}: chat message {j} needs 'role' and 'content' strings, got {dict(m)!r:.200}")
    if not any(m["content"].strip() for m in messages):
        raise ValueError(f"prompt {i} is empty (every chat message has empty content)")
    if tokenizer is None:
        raise ValueError("chat messages need a tokenizer; pass token ids instead")
    text = tokenizer.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in messages])
    return tokenizer.encode(text, add_special_tokens=False)


def _what(x, name: str) -> str:
    return (f"{name} must be a string, a list of token ids, a list of chat messages "
            f"({{'role': ..., 'content': ...}}) or a list of those; got {type(x).__name__} {x!r:.80}")
