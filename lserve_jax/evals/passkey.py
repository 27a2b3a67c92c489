"""Passkey prompts, token-exact: shared by head-pattern calibration and the accuracy grid.

A prompt is built from token ids, not text, so its length and the needle's position are exact:

    [intro][filler ... ][needle][ ... filler][question]            (+ [answer] for calibration)

The filler is either one short paragraph tiled without seams (the part after the needle continues
the tiling), the "repeated-filler" prompt of the passkey literature (Mohtashami & Jaggi 2023), or
a run of natural text (`haystack`: token ids, e.g. `corpus.haystack_ids`), as DuoAttention's
calibration samples use; the needles then interrupt the text where they land.
`depth` is the fraction of the filler that comes before the needle: 0.0 puts the needle right
after the intro, 1.0 right before the question.

Everything takes an `encode: str -> list[int]` (no special tokens), so a tiny random model in a
test can use a toy byte-level encoder (`byte_encoder`). Pure Python and numpy (no jax).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

Encode = Callable[[str], list[int]]

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? The pass key is"
ANSWER = " {key}."

MULTI_NEEDLE = "The pass key number {i} is {key}. Remember it. "
MULTI_QUESTION = "\n\nWhat are the pass keys, in order? The pass keys are"
MULTI_ANSWER = " {keys}."


@dataclasses.dataclass(frozen=True)
class PasskeyPrompt:
    ids: list[int]  # the prompt, exactly `length` tokens (answer excluded)
    keys: tuple[str, ...]  # the pass keys, in order of appearance
    needle_starts: tuple[int, ...]  # token index where each needle begins
    needle_lens: tuple[int, ...]
    depths: tuple[float, ...]  # requested depth of each needle
    answer_ids: list[int]  # the expected continuation (calibration targets)

    @property
    def length(self) -> int:
        return len(self.ids)

    @property
    def key_ids(self) -> list[int]:
        """The answer without its final period: the tokens a retrieval must produce."""
        return list(self.answer_ids[:-1] or self.answer_ids)


def byte_encoder(vocab_size: int) -> Encode:
    """A toy tokenizer for tests: one token per byte, folded into [1, vocab_size)."""
    def encode(text: str) -> list[int]:
        return [1 + b % (vocab_size - 1) for b in text.encode()]
    return encode


def random_key(rng: np.random.Generator, digits: int = 5) -> str:
    return str(int(rng.integers(10 ** (digits - 1), 10 ** digits)))


def _tile(unit: list[int], start: int, n: int) -> list[int]:
    """n tokens of `unit` repeated forever, starting at offset `start`."""
    if n <= 0:
        return []
    reps = (start + n) // len(unit) + 1
    return (unit * reps)[start:start + n]


def build_prompt(encode: Encode, length: int, needles: Sequence[tuple[float, list[int]]], *,
                 intro: str = INTRO, filler: str = FILLER, question: str = QUESTION,
                 haystack: Sequence[int] | None = None) -> tuple[list[int], list[int]]:
    """Token-exact layout of needles (depth, ids) in filler; returns (ids, needle starts).

    Needles are placed in order of depth; each needle's start is `len(intro) + round(depth * F)`
    filler tokens in, where F is the filler length, shifted past the needles before it. The
    filler is `filler` tiled, or the first F tokens of `haystack` when given.
    """
    intro_ids, question_ids = encode(intro), encode(question)
    fixed = len(intro_ids) + len(question_ids) + sum(len(n) for _, n in needles)
    n_fill = length - fixed
    if n_fill < 0:
        raise ValueError(f"length={length} is below the fixed part of the prompt ({fixed} tokens)")
    if haystack is None:
        unit = encode(filler)
    else:
        unit = list(haystack[:n_fill])
        if len(unit) < n_fill:
            raise ValueError(f"the haystack has {len(haystack)} tokens, {n_fill} are needed for length={length}")
    order = sorted(range(len(needles)), key=lambda i: needles[i][0])
    ids = list(intro_ids)
    starts = [0] * len(needles)
    used = 0
    for i in order:
        depth, nid = needles[i]
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {depth}")
        cut = max(used, int(round(depth * n_fill)))
        ids += _tile(unit, used, cut - used)
        used = cut
        starts[i] = len(ids)
        ids += nid
    ids += _tile(unit, used, n_fill - used)
    ids += question_ids
    assert len(ids) == length, (len(ids), length)
    return ids, starts


def passkey_prompt(encode: Encode, length: int, depth: float, key: str) -> PasskeyPrompt:
    """One pass key at `depth` in a prompt of exactly `length` tokens."""
    needle = encode(NEEDLE.format(key=key))
    ids, starts = build_prompt(encode, length, [(depth, needle)])
    return PasskeyPrompt(ids, (key,), tuple(starts), (len(needle),), (float(depth),),
                         encode(ANSWER.format(key=key)))


def multi_passkey_sample(encode: Encode, length: int, num_keys: int, rng: np.random.Generator,
                         digits: int = 5, *, fit_answer: bool = False,
                         haystack: Sequence[int] | None = None) -> PasskeyPrompt:
    """Calibration sample: `num_keys` pass keys at random depths; the answer lists them in order.

    fit_answer: shorten the prompt so that prompt + answer is exactly `length` tokens.
    haystack: natural-text token ids; the filler is a run of them from a random offset."""
    if haystack is not None:
        if len(haystack) < length:
            raise ValueError(f"the haystack has {len(haystack)} tokens, fewer than length={length}")
        start = int(rng.integers(0, len(haystack) - length + 1))
        haystack = haystack[start:start + length]
    keys = [random_key(rng, digits) for _ in range(num_keys)]
    depths = sorted(float(d) for d in rng.uniform(0.0, 1.0, num_keys))
    needles = [(d, encode(MULTI_NEEDLE.format(i=i + 1, key=k))) for i, (d, k) in enumerate(zip(depths, keys))]
    answer = encode(MULTI_ANSWER.format(keys=", ".join(keys)))
    ids, starts = build_prompt(encode, length - len(answer) if fit_answer else length, needles,
                               question=MULTI_QUESTION, haystack=haystack)
    return PasskeyPrompt(ids, tuple(keys), tuple(starts), tuple(len(n) for _, n in needles), tuple(depths), answer)


def passed(prompt: PasskeyPrompt, output_text: str | None = None, output_ids: Sequence[int] | None = None) -> bool:
    """Whether a generation retrieved the key: the key's digits in the text (or the answer's
    first tokens in the ids, for models without a tokenizer)."""
    if output_text is not None:
        return all(k in output_text for k in prompt.keys)
    if output_ids is None:
        raise ValueError("pass output_text or output_ids")
    want = prompt.key_ids
    got = list(output_ids)
    return any(got[i:i + len(want)] == want for i in range(max(1, len(got) - len(want) + 1)))
