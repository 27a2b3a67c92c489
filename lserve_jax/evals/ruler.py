"""RULER-style long-context tasks (Hsieh et al. 2024, "RULER: What's the Real Context Size of Your
Long-Context Language Models?"), generated offline with a fixed seed, token-exact, into natural text.

Tasks (`TASKS`), after RULER's synthetic set:

* `niah_single_number` / `niah_single_word` / `niah_single_uuid`: one needle "One of the special
  magic numbers for <key> is: <value>." in the haystack; the question asks for <key>'s value (a
  7-digit number, an adjective-noun word or a UUID).
* `niah_multikey`: the queried needle and 3 distractor needles with other keys (RULER's multikey_1).
* `niah_multivalue`: 4 needles with the same key and 4 values; all 4 are asked for.
* `niah_multiquery`: 4 needles with 4 keys; all 4 keys are asked for at once.
* `vt` (variable tracking): a chain "VAR A = 12345.", "VAR B = VAR A.", ... (4 hops: 5 names)
  spread over the haystack; asked: every variable that holds the value.
* `cwe` (common-words extraction): a numbered list of words (taken from the text's vocabulary):
  10 of them appear 30 times each, the others 3 times; asked: the 10 most common. As in RULER
  this list is the whole context (no haystack).

Layout of a prompt, built from token ids so that its length and the needles' positions are exact:

    [frame head][intro][haystack with needles][question][frame tail][answer prefix]

The frame is the model's chat template around the user message (`Frame.chat`) or plain text
(`Frame.plain`); the answer prefix ("The special magic numbers for <key> mentioned in the provided
text are") is put after the assistant header, as RULER does, so that even a small model answers
at once. A task `length` L counts the prompt *and* the generation budget (RULER's convention): the
prompt is exactly `L - max_new_tokens` tokens, so an L-token task fits a model of context L.

The haystack (`Haystack`) is natural text (default: the public-domain text shipped in
`lserve_jax/data/`, reflowed), tokenized sentence by sentence; a sample takes a run of it from a
seeded sentence, cycling to the start when the text is shorter than the context. A needle at
depth d goes to filler token `round(d * F)` (F: the haystack tokens of the prompt), moved to the
nearest sentence start with `snap=True` (the default, as RULER inserts at sentence boundaries);
`RulerSample.needle_depths` has where each needle really is. The queried needle of sample i of n
is at depth `i / (n - 1)` (evenly spread from 0 to 1); the other needles of a sample (distractors,
extra values or keys) at seeded depths on RULER's 40-point grid; the 5 statements of a `vt` chain
at depths `(k + d_i) / 5`, k = 0..4 (evenly over the context, shifted by the sample).

Scoring (`score`): RULER's string_match_all, the fraction of expected answers found in the output,
made exact: an answer counts only as a whole token of the output (case-insensitive, no letter or
digit right before or after it), so "12345678" or "1234567" in "91234567" do not pass for
"1234567". `wilson` and `bootstrap_ci` give 95% intervals.

Pure Python and numpy (no jax), like `passkey`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import uuid
import zlib
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np

from . import corpus

Encode = Callable[[str], list[int]]

DEFAULT_LENGTHS = (4096, 8192, 16384, 24576, 32768)
DEFAULT_SAMPLES = 25
DEPTH_GRID = tuple(float(x) for x in np.linspace(0.0, 1.0, 40))  # RULER's DEPTHS, as fractions


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    description: str
    kind: str  # "niah" | "vt" | "cwe"
    value: str = "number"  # niah: "number" | "word" | "uuid"
    keys: int = 1  # niah: needles with distinct keys (the first `queries` are asked for)
    values: int = 1  # niah: values per key
    queries: int = 1  # niah: keys asked for


TASKS: dict[str, TaskSpec] = {
    "niah_single_number": TaskSpec("one needle, a 7-digit number", "niah", "number"),
    "niah_single_word": TaskSpec("one needle, an adjective-noun word", "niah", "word"),
    "niah_single_uuid": TaskSpec("one needle, a UUID", "niah", "uuid"),
    "niah_multikey": TaskSpec("the queried needle among 3 distractors with other keys", "niah", "number", keys=4),
    "niah_multivalue": TaskSpec("4 values of one key, all asked for", "niah", "number", values=4),
    "niah_multiquery": TaskSpec("4 keys asked for at once", "niah", "number", keys=4, queries=4),
    "vt": TaskSpec("variable tracking: a chain of 4 hops (5 variables)", "vt"),
    "cwe": TaskSpec("common-words extraction: the 10 words that appear 30 times in a list", "cwe"),
}
RULER_TASKS = TASKS  # the name `lserve_jax.evals` exports

# --- the texts (RULER's templates) ---------------------------------------------------------------

NIAH_INTRO = ("Some special magic {type} are hidden within the following text. Make sure to memorize it. "
              "I will quiz you about the {type} afterwards.\n")
NIAH_NEEDLE = " One of the special magic {type1} for {key} is: {value}."
NIAH_QUESTION = "\nWhat are all the special magic {type} for {query} mentioned in the provided text?"
NIAH_PREFIX = "The special magic {type} for {query} mentioned in the provided text are"
NIAH_TYPES = {"number": ("numbers", "numbers"), "word": ("words", "words"), "uuid": ("uuids", "uuids")}

VT_INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n"
VT_FIRST = " VAR {name} = {value}."
VT_HOP = " VAR {name} = VAR {prev}."
VT_QUESTION = "\nQuestion: Find all variables that are assigned the value {value} in the text above."
VT_PREFIX = ("Answer: According to the chain(s) of variable assignment in the text above, {n} variables "
             "are assigned the value {value}, they are:")
VT_HOPS = 4

CWE_INTRO = ("Below is a numbered list of words. In these words, some appear more often than others. "
             "Memorize the ones that appear most often.\n")
CWE_QUESTION = "\nQuestion: What are the {n} most common words in the above list?"
CWE_PREFIX = "Answer: The top {n} words that appear most often in the list are:"
CWE_COMMON, CWE_FREQ_COMMON, CWE_FREQ_RARE = 10, 30, 3

# keys and word values: "adjective-noun", as RULER's (wonderwords) keys
ADJECTIVES = ("amber", "ancient", "bitter", "bold", "brave", "bright", "calm", "clever", "cold", "curious",
              "damp", "dark", "eager", "early", "fancy", "fierce", "gentle", "giant", "golden", "grumpy",
              "happy", "hollow", "humble", "icy", "jolly", "kind", "lazy", "little", "lively", "loud",
              "lucky", "mellow", "misty", "modern", "noisy", "odd", "pale", "patient", "polite", "proud",
              "quick", "quiet", "rapid", "rough", "rusty", "shiny", "silent", "silver", "sleepy", "smooth",
              "sour", "steady", "sticky", "sunny", "swift", "tall", "tender", "tidy", "tiny", "vast",
              "warm", "wild", "wise", "young")
NOUNS = ("anchor", "apple", "badger", "basket", "beacon", "blanket", "bottle", "bridge", "bucket", "button",
         "camera", "candle", "canyon", "carpet", "castle", "cedar", "chimney", "cloud", "comet", "cookie",
         "copper", "crayon", "desert", "dolphin", "donkey", "dragon", "drum", "eagle", "engine", "falcon",
         "feather", "forest", "fountain", "garden", "glacier", "guitar", "hammer", "harbor", "helmet", "island",
         "jacket", "kettle", "kitten", "ladder", "lantern", "lemon", "lizard", "magnet", "meadow", "mirror",
         "monkey", "mountain", "needle", "noodle", "ocean", "orchard", "otter", "paddle", "panda", "parrot",
         "pebble", "pencil", "pepper", "piano", "pillow", "planet", "pocket", "pumpkin", "puzzle", "rabbit",
         "river", "rocket", "saddle", "sandal", "scarf", "shadow", "spider", "spoon", "squirrel", "statue",
         "sunset", "teapot", "thunder", "tiger", "tomato", "tractor", "trumpet", "tulip", "turtle", "umbrella",
         "valley", "violin", "wagon", "walrus", "whistle", "window", "wizard", "zebra")

_WORD_RE = re.compile(r"[A-Za-z]{4,12}")


# --- frame ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Frame:
    """Token ids around the user message: the chat template's head (system prompt, user header)
    and tail (end of turn, assistant header)."""

    head: tuple[int, ...] = ()
    tail: tuple[int, ...] = ()
    chat: bool = False

    SENTINEL = "\u2063RULER-CONTENT\u2063"

    @classmethod
    def plain(cls, encode: Encode) -> "Frame":
        """No template: the answer prefix follows the question after a line break."""
        return cls((), tuple(encode("\n")), False)

    @classmethod
    def chat_template(cls, tokenizer, system: str | None = None) -> "Frame":
        """The model's chat template (`lserve_jax.tokenizer.Tokenizer`) around one user message,
        as `Tokenizer.encode_chat` renders it."""
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": cls.SENTINEL}]
        text = tokenizer.apply_chat_template(messages)
        if text.count(cls.SENTINEL) != 1:
            raise ValueError("the chat template does not render the user message verbatim once")
        head, tail = text.split(cls.SENTINEL)
        enc = lambda s: tokenizer.encode(s, add_special_tokens=False) if s else []  # noqa: E731
        return cls(tuple(enc(head)), tuple(enc(tail)), True)


# --- haystack ------------------------------------------------------------------------------------


def sentences(text: str) -> list[str]:
    """The text reflowed (hard line breaks inside a paragraph become spaces) and split into
    sentences; each sentence carries its separator ("\\n" at a paragraph start, else " "), so the
    pieces joined are the reflowed text."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        para = " ".join(para.split())
        if not para:
            continue
        for j, s in enumerate(re.split(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[])", para)):
            out.append(("\n" if j == 0 else " ") + s)
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class Haystack:
    """Natural text as token ids, with the token index where each sentence starts."""

    ids: np.ndarray  # int32 [N]
    starts: np.ndarray  # int64 [S]: sentence starts, starts[0] == 0
    words: tuple[str, ...]  # the text's vocabulary (lower case, 4-12 letters, sorted): cwe's words

    @classmethod
    def from_text(cls, encode: Encode, text: str) -> "Haystack":
        pieces = [encode(s) for s in sentences(text)]
        pieces = [p for p in pieces if p]
        if not pieces:
            raise ValueError("the haystack text is empty")
        lens = np.asarray([len(p) for p in pieces])
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
        words = tuple(sorted({w.lower() for w in _WORD_RE.findall(text)}))
        return cls(np.asarray([t for p in pieces for t in p], np.int32), starts, words)

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, first: int, n: int) -> tuple[list[int], list[int]]:
        """n tokens from sentence `first` on, cycling to the start of the text as often as needed;
        returns (ids, sentence starts in [0, n], n included: where a needle may go)."""
        s0 = int(self.starts[first % len(self.starts)])
        total = len(self.ids)
        reps = (s0 + n) // total + 1
        ids = np.tile(self.ids, reps)[s0:s0 + n]
        bounds = (np.concatenate([self.starts + r * total for r in range(reps)]) - s0)
        bounds = bounds[(bounds >= 0) & (bounds <= n)]
        return ids.tolist(), sorted(set(bounds.tolist()) | {n})


@lru_cache(maxsize=4)
def _default_haystack(encode: Encode) -> Haystack:
    return Haystack.from_text(encode, corpus.read_text())


def default_haystack(encode: Encode) -> Haystack:
    """The shipped public-domain text (both halves: 53K SmolLM2 tokens), reflowed."""
    return _default_haystack(encode)


# --- samples -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RulerSample:
    task: str
    length: int  # prompt + max_new_tokens
    index: int
    ids: list[int]  # the prompt: exactly length - max_new_tokens tokens
    answers: tuple[str, ...]
    max_new_tokens: int
    depth: float | None  # requested depth of the (first) queried needle; None for cwe
    needle_starts: tuple[int, ...] = ()  # token index of each needle in `ids` (queried first)
    needle_lens: tuple[int, ...] = ()
    needle_depths: tuple[float, ...] = ()  # where each needle is: filler tokens before it / filler tokens
    targets: tuple[int, ...] = ()  # the needles that hold answers (indices into the above)

    @property
    def prompt_tokens(self) -> int:
        return len(self.ids)

    def score(self, output: str) -> float:
        return score(self.answers, output)


def matches(answer: str, output: str) -> bool:
    """`answer` appears in `output` as a whole (case-insensitive; no letter or digit adjoining)."""
    return re.search(rf"(?<![0-9A-Za-z]){re.escape(answer)}(?![0-9A-Za-z])", output, re.IGNORECASE) is not None


def score(answers: Sequence[str], output: str) -> float:
    """RULER's string_match_all: the fraction of `answers` found (`matches`) in the output."""
    if not answers:
        raise ValueError("no answers to score against")
    return sum(matches(a, output) for a in answers) / len(answers)


def task_rng(seed: int, task: str, length: int, index: int) -> np.random.Generator:
    """The generator of one sample: depends on (seed, task, length, index) only, so a sample is
    the same whatever other tasks, lengths or sample counts a run asks for."""
    return np.random.default_rng([seed, zlib.crc32(task.encode()), length, index])


def sample_depth(index: int, n: int) -> float:
    """Depth of sample `index` of n: evenly from 0 to 1 (0.5 for a single sample)."""
    return 0.5 if n == 1 else index / (n - 1)


def _number(rng, digits: int = 7) -> str:
    return str(int(rng.integers(10 ** (digits - 1), 10 ** digits)))


def _word(rng) -> str:
    return f"{ADJECTIVES[int(rng.integers(len(ADJECTIVES)))]}-{NOUNS[int(rng.integers(len(NOUNS)))]}"


def _uuid(rng) -> str:
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


def _distinct(make, rng, n: int, avoid=()) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        v = make(rng)
        if v not in out and v not in avoid:
            out.append(v)
    return out


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def max_new_tokens(task: str, encode: Encode) -> int:
    """The generation budget of a task: twice the tokens of a written-out answer, plus 16."""
    spec = TASKS[task]
    if spec.kind == "niah":
        v = {"number": "8765432", "word": "patient-squirrel",
             "uuid": "3f2b8e9a-61c4-4d7e-9b0a-5c8d2e4f1a6b"}[spec.value]
        rep = ": " + _join([v] * (spec.values * spec.queries)) + "."
    elif spec.kind == "vt":
        rep = " " + ", ".join(["QWERT"] * (VT_HOPS + 1)) + "."
    else:
        rep = " " + " ".join(f"{i + 1}. shakespeare" for i in range(CWE_COMMON))
    return 2 * len(encode(rep)) + 16


def _place(frame: Frame, head: list[int], filler: list[int], bounds: list[int],
           needles: Sequence[tuple[float, list[int]]], rest: list[int], snap: bool):
    """[frame head][head][filler with the needles][rest][frame tail]... : the needles go to
    `round(depth * F)` filler tokens in (F = len(filler)), to the nearest entry of `bounds` when
    snapping. Returns (ids, needle starts, needle depths), needles in the given order."""
    n = len(filler)
    cuts = []
    for d, _ in needles:
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {d}")
        t = int(round(d * n))
        if snap:
            i = int(np.searchsorted(bounds, t))
            cand = [bounds[j] for j in (i - 1, i) if 0 <= j < len(bounds)]
            t = min(cand, key=lambda b: (abs(b - t), b))
        cuts.append(t)
    order = sorted(range(len(needles)), key=lambda i: (cuts[i], needles[i][0], i))
    ids = list(frame.head) + head
    starts = [0] * len(needles)
    used = 0
    for i in order:
        ids += filler[used:cuts[i]]
        used = cuts[i]
        starts[i] = len(ids)
        ids += needles[i][1]
    ids += filler[used:] + rest
    return ids, starts, [c / n if n else 0.0 for c in cuts]


def make_sample(task: str, encode: Encode, length: int, index: int, num_samples: int, *, seed: int = 0,
                frame: Frame | None = None, haystack: Haystack | None = None, snap: bool = True) -> RulerSample:
    """Sample `index` of `num_samples` of `task` at `length` (prompt + generation budget)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    spec = TASKS[task]
    frame = frame or Frame.plain(encode)
    rng = task_rng(seed, task, length, index)
    new = max_new_tokens(task, encode)
    budget = length - new  # prompt tokens
    depth = sample_depth(index, num_samples)

    if spec.kind == "cwe":
        return _cwe_sample(task, encode, length, index, new, budget, rng, frame, haystack or default_haystack(encode))

    if spec.kind == "niah":
        typ, typ1 = NIAH_TYPES[spec.value]
        make = {"number": _number, "word": _word, "uuid": _uuid}[spec.value]
        keys = _distinct(_word, rng, spec.keys)
        flat = _distinct(make, rng, spec.keys * spec.values, avoid=keys)  # all values distinct
        vals = [flat[k * spec.values:(k + 1) * spec.values] for k in range(spec.keys)]
        texts, targets = [], []
        for k, (key, vs) in enumerate(zip(keys, vals)):
            for v in vs:
                if k < spec.queries:
                    targets.append(len(texts))
                texts.append(NIAH_NEEDLE.format(type1=typ1, key=key, value=v))
        query = _join(keys[:spec.queries])
        answers = tuple(v for k in range(spec.queries) for v in vals[k])
        intro = NIAH_INTRO.format(type=typ)
        question = NIAH_QUESTION.format(type=typ, query=query)
        prefix = NIAH_PREFIX.format(type=typ, query=query)
        # the first queried needle at the sample's depth; the others at seeded grid depths
        others = [float(DEPTH_GRID[int(rng.integers(len(DEPTH_GRID)))]) for _ in texts[1:]]
        depths = [depth] + others
    else:  # vt
        names = _distinct(lambda r: "".join(chr(65 + int(c)) for c in r.integers(0, 26, 5)), rng, VT_HOPS + 1)
        value = _number(rng, 5)
        texts = [VT_FIRST.format(name=names[0], value=value)] + [
            VT_HOP.format(name=names[k], prev=names[k - 1]) for k in range(1, VT_HOPS + 1)]
        targets = list(range(len(texts)))
        answers = tuple(names)
        intro, question = VT_INTRO, VT_QUESTION.format(value=value)
        prefix = VT_PREFIX.format(n=len(names), value=value)
        depths = [(k + depth) / len(texts) for k in range(len(texts))]

    needle_ids = [encode(t) for t in texts]
    head = encode(intro)
    rest = encode(question) + list(frame.tail) + encode(prefix)
    fixed = len(frame.head) + len(head) + len(rest) + sum(len(n) for n in needle_ids)
    n_fill = budget - fixed
    if n_fill < 1:
        raise ValueError(f"length={length} is too short for {task}: the prompt's fixed part is {fixed} tokens "
                         f"and {new} are kept for the answer")
    hay = haystack or default_haystack(encode)
    filler, bounds = hay.take(int(rng.integers(len(hay.starts))), n_fill)
    ids, starts, actual = _place(frame, head, filler, bounds, list(zip(depths, needle_ids)), rest, snap)
    assert len(ids) == budget, (len(ids), budget)
    return RulerSample(task, length, index, ids, answers, new, depth, tuple(starts),
                       tuple(len(n) for n in needle_ids), tuple(actual), tuple(targets))


def _cwe_sample(task, encode, length, index, new, budget, rng, frame: Frame, hay: Haystack) -> RulerSample:
    """A numbered list "1. w 2. w ..." of exactly the tokens left: CWE_COMMON words CWE_FREQ_COMMON
    times each and rare words CWE_FREQ_RARE times (fewer of each when the list is short), shuffled;
    the tokens a whole rare word does not fill are filled with single extra words, then spaces."""
    vocab = [hay.words[i] for i in rng.permutation(len(hay.words))]
    head = encode(CWE_INTRO)
    rest = encode(CWE_QUESTION.format(n=CWE_COMMON)) + list(frame.tail) + encode(CWE_PREFIX.format(n=CWE_COMMON))
    room = budget - len(frame.head) - len(head) - len(rest)
    pad = encode(" ")
    if len(pad) != 1:
        raise ValueError("cwe needs a tokenizer that encodes ' ' as one token (to fill the last tokens)")
    num_cache: dict[int, list[int]] = {}
    word_cache: dict[str, list[int]] = {}

    def num(i: int) -> list[int]:  # entry i (0-based): "i+1." after a space (none before the first)
        if i not in num_cache:
            num_cache[i] = encode(f"{' ' if i else ''}{i + 1}.")
        return num_cache[i]

    def word(w: str) -> list[int]:
        if w not in word_cache:
            word_cache[w] = encode(" " + w)
        return word_cache[w]

    if len(vocab) < CWE_COMMON + 1:
        raise ValueError(f"the haystack text has only {len(vocab)} distinct words; cwe needs more")
    common, pool = vocab[:CWE_COMMON], vocab[CWE_COMMON:]
    per_entry = np.mean([len(num(i)) + len(word(w)) for i, w in enumerate(vocab[:64])])
    entries = room / per_entry
    freq_c = int(min(CWE_FREQ_COMMON, entries // (2 * CWE_COMMON)))  # the common words: at most half the list
    if freq_c < 2:
        raise ValueError(f"length={length} is too short for {task}: {room} tokens hold about {int(entries)} "
                         f"list entries, fewer than {4 * CWE_COMMON}")
    freq_r = max(1, min(CWE_FREQ_RARE, freq_c // 3))
    n_rare = int(max(0, entries - CWE_COMMON * freq_c) // freq_r)
    shuffle_seed = int(rng.integers(1 << 31))
    while True:
        n_rare = min(n_rare, len(pool))
        words = common * freq_c + pool[:n_rare] * freq_r
        order = [words[i] for i in np.random.default_rng([shuffle_seed, n_rare]).permutation(len(words))]
        cost = sum(len(num(i)) + len(word(w)) for i, w in enumerate(order))
        if cost <= room:
            break
        if n_rare == 0:
            raise ValueError(f"length={length} is too short for {task}")
        n_rare = max(0, n_rare - max(1, math.ceil((cost - room) / (freq_r * per_entry))))
    for w in pool[n_rare:]:  # fill with single rare words while a whole entry fits
        c = len(num(len(order))) + len(word(w))
        if cost + c > room:
            break
        order.append(w)
        cost += c
    body = [t for i, w in enumerate(order) for t in num(i) + word(w)]
    ids = list(frame.head) + head + body + pad * (room - cost) + rest
    assert len(ids) == budget, (len(ids), budget)
    return RulerSample(task, length, index, ids, tuple(common), new, None)


def make_samples(task: str, encode: Encode, length: int, num_samples: int = DEFAULT_SAMPLES, *, seed: int = 0,
                 frame: Frame | None = None, haystack: Haystack | None = None, snap: bool = True) -> list[RulerSample]:
    """`num_samples` samples of `task` at `length` (see `make_sample`)."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    return [make_sample(task, encode, length, i, num_samples, seed=seed, frame=frame, haystack=haystack, snap=snap)
            for i in range(num_samples)]


# --- intervals -----------------------------------------------------------------------------------

Z95 = 1.959963984540054


def wilson(mean: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion `mean` over n trials (for fractional scores, as
    RULER's multi-answer tasks give, a conservative interval: their variance is at most p(1-p))."""
    if n <= 0:
        return (0.0, 1.0)
    denom = 1 + z * z / n
    centre = (mean + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(mean * (1 - mean), 0.0) / n + z * z / (4 * n * n)) / denom
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    return (0.0 if mean <= 0 else lo, 1.0 if mean >= 1 else hi)  # exact ends, not 1 - 1e-16


def bootstrap_ci(groups: Sequence[Sequence[float]], reps: int = 2000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over groups of each group's mean (e.g. the
    average accuracy over tasks), resampling within each group; deterministic for a seed."""
    groups = [np.asarray(g, float) for g in groups if len(g)]
    if not groups:
        raise ValueError("no scores")
    rng = np.random.default_rng(seed)
    stats = np.zeros(reps)
    for g in groups:
        stats += g[rng.integers(0, len(g), (reps, len(g)))].mean(axis=1)
    stats /= len(groups)
    a = (1 - level) / 2
    return float(np.quantile(stats, a)), float(np.quantile(stats, 1 - a))
