"""lserve_jax against Hugging Face transformers: same weights, same prompts, greedy, one process.

    .venv/bin/python bench/peer_hf.py                       # CPU: the default SmolLM2-135M-Instruct
    python bench/peer_hf.py --shape llama3-8b --random-weights --out $OUT   # GPU (no downloads)

Reports per prompt and variant the time to first token (TTFT: from the generate call to the
first new token, after a warm-up run of the same shapes, so compilation is excluded), the decode
rate (tokens/s after the first token, aggregate over the batch) and whether the greedy tokens
agree with HF's (the first `--agree` tokens, and the length of the common prefix; both run past
EOS). Every measurement is repeated (`--repeats`; on CPU the implementations take turns, one run
each per round, so a changing load from other processes weighs on all alike); the table shows
the best (min TTFT, max tokens/s), the JSON keeps every run. lserve_jax runs with its prefix
cache off (a repeated prompt would reuse its pages and skip the prefill) and its default prefill
chunking.

CPU default (real model): the checkpoint `make demo` uses (`lserve_jax.load()`, fetched and
converted on first use) and the HF directory converted from the same GGUF
(`default_model.default_hf_dir`); prompts: a 37-token chat question and a ~2K-token chat
prompt (an excerpt of lserve_jax/data/eb1911_shakespeare.txt); lserve_jax variants `dense`
(no head pattern) and `sparse` (the default calibrated pattern), both with the default
SparseConfig and cache capacity. Token ids are made once (our tokenizer) and fed to both.

`--random-weights` (GPU, no network): an HF LlamaForCausalLM of `--shape` with random weights in
`--dtype` (bfloat16) on `--device` (cuda), sdpa attention; its weights are copied into lserve_jax
(the converter's name table), so the two compute the same model. Prompts of `--lengths` random
tokens (default 8K, 32K, 128K); TTFT at batch 1, decode at `--batches` (1 and 4). HF runs first
and is freed before lserve_jax allocates (jax does not preallocate: see the environment below).
A configuration that runs out of memory is recorded as such and skipped.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # HF and jax share the GPU

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

CHAT_QUESTION = "What is the capital of France?"
LONG_INSTRUCTION = "Summarize the following text in three sentences.\n\n"
TEXT_FILE = os.path.join(ROOT, "lserve_jax", "data", "eb1911_shakespeare.txt")
GPU_SHAPES = ("llama3-8b", "smollm2-135m")


def log(*a) -> None:
    print(f"[peer_hf {time.strftime('%H:%M:%S')}]", *a, file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default=None, choices=GPU_SHAPES,
                   help="model shape for --random-weights (default: the real default model)")
    p.add_argument("--random-weights", action="store_true", help="random weights of --shape, no downloads")
    p.add_argument("--device", default=None, help="torch device (default: cuda with --random-weights, else cpu)")
    p.add_argument("--dtype", default=None, help="weights dtype (default: float32 real model, bfloat16 random)")
    p.add_argument("--lengths", default="8192,32768,131072", help="--random-weights prompt lengths (tokens)")
    p.add_argument("--batches", default="1,4", help="--random-weights decode batch sizes")
    p.add_argument("--long-tokens", type=int, default=1968, help="CPU: tokens of the long prompt")
    p.add_argument("--prompts", default="chat,long", help="CPU: which prompts (chat, long)")
    p.add_argument("--variants", default="dense,sparse",
                   help="lserve_jax variants: dense, sparse; on CPU each may end in +f32 (--dtype float32, "
                        "weights as stored: transformers' float32 numbers) instead of the defaults")
    p.add_argument("--weights", default="auto",
                   help="CPU: lserve_jax.load's weights= for the variants without +f32 (default auto: "
                        "bfloat16 products on a CPU)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per run (EOS ignored)")
    p.add_argument("--agree", type=int, default=16, help="greedy tokens compared with HF's")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (after a warm-up)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="lserve_jax cache capacity (default: the engine's; --random-weights: the prompt + new tokens)")
    p.add_argument("--no-hf", action="store_true", help="skip the HF side (lserve_jax only)")
    p.add_argument("--engine-per-config", action="store_true",
                   help="--random-weights: an engine sized for each (length, batch) instead of one sized for "
                        "the largest, shared (whose programs compile once)")
    p.add_argument("--impl", default="auto",
                   help="lserve_jax prefill and decode implementations (lserve_jax.ops; e.g. reference: the baseline)")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results"), help="folder for the JSON")
    p.add_argument("--tag", default=None, help="JSON name: peer_hf-<tag>.json (default: <cpu|gpu>-<date>)")
    return p.parse_args(argv)


# -- timing ---------------------------------------------------------------------------------


def summarize(runs: list[dict], batch: int) -> dict:
    """Best and median of the timed runs: TTFT (s) and decode tokens/s (aggregate over the batch)."""
    ttft = [r["ttft_s"] for r in runs]
    rate = [r["decode_tok_s"] for r in runs if r["decode_tok_s"] is not None]
    return {"ttft_s": min(ttft), "ttft_median_s": float(np.median(ttft)),
            "decode_tok_s": max(rate) if rate else None,
            "decode_tok_s_median": float(np.median(rate)) if rate else None,
            "batch": batch, "runs": runs}


def rates(t0: float, stamps: list[float], batch: int) -> dict:
    """stamps: when each new token of row 0 arrived."""
    n = len(stamps)
    dec = batch * (n - 1) / (stamps[-1] - stamps[0]) if n > 1 and stamps[-1] > stamps[0] else None
    return {"ttft_s": stamps[0] - t0, "decode_tok_s": dec, "tokens": n}


class HFRunner:
    """transformers' generate, greedy, timed by a streamer (a timestamp per new token)."""

    def __init__(self, model, device: str):
        import torch

        self.torch, self.model, self.device = torch, model, device
        eos = model.config.eos_token_id
        self.pad_id = eos[0] if isinstance(eos, (list, tuple)) else (eos if eos is not None else 0)

    def _sync(self):
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize()

    def run(self, ids: list[list[int]], new_tokens: int) -> tuple[dict, list[int]]:
        torch = self.torch
        from transformers.generation.streamers import BaseStreamer

        stamps: list[float] = []
        sync = self._sync

        class Stamp(BaseStreamer):
            def __init__(self):
                self.prompt_seen = False

            def put(self, value):  # the prompt [B, T] first, then each step's tokens [B]
                if not self.prompt_seen:
                    self.prompt_seen = True
                    return
                sync()
                stamps.append(time.perf_counter())

            def end(self):
                pass

        x = torch.tensor(ids, dtype=torch.long, device=self.device)
        # eos_token_id=None: run past EOS like lserve_jax's ignore_eos (min_new_tokens would instead
        # forbid EOS, changing the greedy tokens)
        kw = dict(attention_mask=torch.ones_like(x), do_sample=False, pad_token_id=self.pad_id, eos_token_id=None)
        sync()
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model.generate(x, max_new_tokens=new_tokens, streamer=Stamp(), **kw)
        res = rates(t0, stamps, x.shape[0])
        return res, out[0, x.shape[1]:].tolist()


def batch_rates(t0: float, stamps: list[list[float]]) -> dict:
    """stamps[i]: when each new token of row i arrived. The engine admits rows one after another
    (continuous batching: row 0 decodes while row 1 is prefilled), so the batch's TTFT is the
    last row's first token (HF's batch prefill gives every row its first token at once), and
    the decode rate is the tokens of all rows per second over the window in which every row is
    decoding: from the last row's first token to the first row's last. One row: `rates`."""
    if len(stamps) == 1:
        return rates(t0, stamps[0], 1)
    start = max(s[0] for s in stamps)
    end = min(s[-1] for s in stamps)
    n = sum(1 for s in stamps for t in s if start < t <= end)
    dec = n / (end - start) if end > start and n else None
    return {"ttft_s": start - t0, "decode_tok_s": dec, "tokens": len(stamps[0]),
            "first_token_s": [s[0] - t0 for s in stamps], "decode_window_tokens": n}


def lserve_run(engine, ids: list[list[int]], new_tokens: int) -> tuple[dict, list[int]]:
    from lserve_jax import SamplingParams

    stamps: list[list[float]] = [[] for _ in ids]

    def on_token(i, tok):
        stamps[i].append(time.perf_counter())

    t0 = time.perf_counter()
    gens = engine.generate(ids, SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True),
                           on_token=on_token)
    res = batch_rates(t0, stamps)
    res["engine_stats"] = engine.last_stats.line()
    return res, list(gens[0].token_ids)


def measure(run, ids, new_tokens: int, repeats: int, what: str) -> tuple[dict, list[int]]:
    """A warm-up run (compilation, same shapes), then `repeats` timed runs."""
    out = measure_interleaved({what: run}, ids, new_tokens, repeats)
    return out[what]


def measure_interleaved(runs: dict, ids, new_tokens: int, repeats: int) -> dict[str, tuple[dict, list[int]]]:
    """Each of `runs` warmed up (compilation, same shapes), then `repeats` rounds of one timed run
    of each in turn, so that a machine whose load changes (other processes on the CPU) weighs
    on every implementation alike. Returns {name: (summary, greedy tokens)}."""
    toks, timed = {}, {name: [] for name in runs}
    for name, run in runs.items():
        t = time.perf_counter()
        _, toks[name] = run(ids, new_tokens)
        log(f"{name}: warm-up {time.perf_counter() - t:.1f}s")
    for _ in range(repeats):
        for name, run in runs.items():
            r, toks[name] = run(ids, new_tokens)
            timed[name].append(r)
            log(f"{name}: ttft {r['ttft_s'] * 1e3:.1f} ms, decode {(r['decode_tok_s'] or 0):.1f} tok/s")
    return {name: (summarize(timed[name], len(ids)), toks[name]) for name in runs}


def agreement(ours: list[int], hf: list[int] | None, n: int) -> dict:
    if hf is None:
        return {}
    n = min(n, len(ours), len(hf))
    prefix = 0
    for a, b in zip(ours, hf):
        if a != b:
            break
        prefix += 1
    return {"agree_first_n": n, "agree": ours[:n] == hf[:n], "common_prefix": prefix,
            "ours_tokens": ours[:n], "hf_tokens": hf[:n]}


def is_oom(e: BaseException) -> bool:
    s = f"{type(e).__name__}: {e}"
    return "OutOfMemory" in s or "RESOURCE_EXHAUSTED" in s or "out of memory" in s


# -- the real default model (CPU) -----------------------------------------------------------


def real_prompts(tokenizer, names: list[str], long_tokens: int) -> dict[str, list[int]]:
    out = {}
    if "chat" in names:
        out["chat"] = tokenizer.encode_chat(CHAT_QUESTION)
    if "long" in names:
        marker = "\x00BODY\x00"
        head, tail = tokenizer.apply_chat_template([{"role": "user", "content": LONG_INSTRUCTION + marker}]).split(marker)
        pre, post = tokenizer.encode(head, add_special_tokens=False), tokenizer.encode(tail, add_special_tokens=False)
        with open(TEXT_FILE, encoding="utf-8") as f:
            body = tokenizer.encode(f.read(), add_special_tokens=False)
        n = long_tokens - len(pre) - len(post)
        if n < 1 or n > len(body):
            raise SystemExit(f"--long-tokens {long_tokens} does not fit the text ({len(body)} tokens)")
        out["long"] = pre + body[:n] + post
    unknown = set(names) - {"chat", "long"}
    if unknown:
        raise SystemExit(f"unknown prompts {sorted(unknown)}; choose from chat, long")
    return out


def run_real(args) -> dict:
    import torch
    import lserve_jax
    from lserve_jax.default_model import default_hf_dir

    dtype = args.dtype or "float32"  # HF's (its default); lserve_jax gets --dtype only if given
    device = args.device or "cpu"
    hf_dir = default_hf_dir()
    variants = [v for v in args.variants.split(",") if v]
    engines, linear_dtypes = {}, {}
    for v in variants:
        base, _, precision = v.partition("+")
        if base not in ("dense", "sparse") or precision not in ("", "f32"):
            raise SystemExit(f"unknown variant {v!r}; choose from dense, sparse, each optionally +f32")
        exact = precision == "f32"  # float32 products, as transformers computes
        # no prefix cache: a repeated prompt would reuse its pages and skip most of the prefill
        engines[v] = lserve_jax.load(pattern=None if base == "dense" else "auto",
                                     dtype="float32" if exact else args.dtype,
                                     weights=None if exact else args.weights,
                                     max_seq_len=args.max_seq_len, progress=False, prefix_cache=False,
                                     prefill_impl=args.impl, decode_impl=args.impl)
        linear_dtypes[v] = linear_dtype(engines[v].params)
    tokenizer = next(iter(engines.values())).tokenizer
    prompts = real_prompts(tokenizer, [p for p in args.prompts.split(",") if p], args.long_tokens)
    hf = None
    if not args.no_hf:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=getattr(torch, dtype),
                                                     attn_implementation="sdpa").to(device).eval()
        hf = HFRunner(model, device)
    results = []
    for name, ids in prompts.items():
        row = {"prompt": name, "prompt_tokens": len(ids), "new_tokens": args.new_tokens}
        runs = {} if hf is None else {"hf": hf.run}
        for v, eng in engines.items():
            runs[f"lserve_jax-{v}"] = lambda x, n, eng=eng: lserve_run(eng, x, n)
        out = measure_interleaved(runs, [ids], args.new_tokens, args.repeats)
        hf_toks = out["hf"][1] if "hf" in out else None
        for impl, (res, toks) in out.items():
            if impl != "hf":
                res.update(agreement(toks, hf_toks, args.agree))
            row[impl] = res
        log(f"{name} ({len(ids)} tokens): " + ", ".join(
            f"{impl} ttft {r['ttft_s'] * 1e3:.0f} ms {r['decode_tok_s'] or 0:.1f} tok/s" for impl, r in row.items()
            if isinstance(r, dict)))
        results.append(row)
    return {"model": "SmolLM2-135M-Instruct (default checkpoint, GGUF Q4_1 dequantised)", "dtype": dtype,
            "lserve_weights": args.weights, "lserve_linear_dtype": linear_dtypes,
            "device": device, "hf_dir": str(hf_dir), "results": results}


def linear_dtype(params) -> str:
    """The dtype of the first layer's first linear weight (bfloat16 under weights "bf16")."""
    from lserve_jax.quant import LINEAR_NAMES

    layer = params.layers[0]
    w = next(layer[n] for n in layer if n in LINEAR_NAMES)
    return type(w).__name__ if not hasattr(w, "dtype") else str(w.dtype)


# -- random weights of a shape (GPU) --------------------------------------------------------


def shape_hf_config(name: str):
    from transformers import LlamaConfig

    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from common import SHAPES

    s = SHAPES[name]
    return LlamaConfig(vocab_size=s["vocab_size"], hidden_size=s["hidden_size"],
                       intermediate_size=s["intermediate_size"], num_hidden_layers=s["num_layers"],
                       num_attention_heads=s["num_heads"], num_key_value_heads=s["num_kv_heads"],
                       head_dim=s["head_dim"], rope_theta=s["rope_theta"],
                       max_position_embeddings=s["max_position_embeddings"],
                       rms_norm_eps=s.get("rms_norm_eps", 1e-5),
                       tie_word_embeddings=s.get("tie_word_embeddings", False),
                       bos_token_id=1, eos_token_id=2, attn_implementation="sdpa")


def hf_state_to_numpy(model) -> dict[str, np.ndarray]:
    """The model's weights on the host (bfloat16 through ml_dtypes; torch has no numpy bf16)."""
    import ml_dtypes
    import torch

    out = {}
    for k, t in model.state_dict().items():
        t = t.detach()
        if t.dtype == torch.bfloat16:
            out[k] = t.view(torch.int16).cpu().numpy().view(ml_dtypes.bfloat16)
        else:
            out[k] = t.cpu().numpy()
    return out


def lserve_params_from_hf(hf_config, state: dict[str, np.ndarray], dtype: str, variant: str, shape: str):
    """(params, config, head layout) for lserve_jax from the HF weights (the converter's table);
    sparse: the shape's head pattern, KV heads permuted retrieval-first as `lserve_jax.load` does."""
    import jax.numpy as jnp

    from lserve_jax.config import ModelConfig, SparseConfig
    from lserve_jax.convert.hf import map_tensors
    from lserve_jax.heads import binarize, layout_and_permutation, load_pattern
    from lserve_jax.params import from_flat, permute_kv_heads

    cfg = ModelConfig.from_hf(hf_config.to_dict())
    flat = map_tensors(cfg, iter(state.items()), np.dtype(jnp.dtype(dtype)))
    params = from_flat(cfg, {k: jnp.asarray(flat.pop(k)) for k in list(flat)})
    layout = None
    if variant == "sparse":
        from common import PATTERNS

        if shape in PATTERNS:
            alpha = load_pattern(PATTERNS[shape])
        else:  # no published pattern: a fixed random one (speed does not depend on it)
            alpha = np.random.default_rng(0).random((cfg.num_layers, cfg.num_kv_heads))
        layout, perms = layout_and_permutation(binarize(alpha, SparseConfig().static_sparsity))
        params = permute_kv_heads(params, cfg, perms)
    return params, cfg, layout


def run_random(args, on_progress=None) -> dict:
    import torch

    shape = args.shape or "llama3-8b"
    device = args.device or "cuda"
    dtype = args.dtype or "bfloat16"
    lengths = [int(x) for x in args.lengths.split(",") if x]
    batches = [int(x) for x in args.batches.split(",") if x]
    variants = [v for v in args.variants.split(",") if v]
    hf_config = shape_hf_config(shape)
    torch.manual_seed(0)
    from transformers import LlamaForCausalLM

    log(f"random {shape} in {dtype} on {device}")
    with torch.device(device):
        model = LlamaForCausalLM(hf_config).to(getattr(torch, dtype)).eval()
    rng = np.random.default_rng(0)
    prompts = {n: rng.integers(3, hf_config.vocab_size, n).tolist() for n in lengths}
    configs = [(n, b) for n in lengths for b in batches]
    rows = {(n, b): {"prompt": f"random-{n}", "prompt_tokens": n, "batch": b, "new_tokens": args.new_tokens}
            for n, b in configs}
    hf_tokens = {}

    def report(partial: bool) -> dict:
        return {"model": f"{shape} random weights", "dtype": dtype, "device": device, "partial": partial,
                "results": [rows[c] for c in configs]}

    def progress():  # the JSON so far, so that a run stopped by a time limit keeps what it measured
        if on_progress is not None:
            on_progress(report(True))

    if not args.no_hf:
        hf = HFRunner(model, device)
        for n, b in configs:
            try:
                rows[n, b]["hf"], hf_tokens[n, b] = measure(hf.run, [prompts[n]] * b, args.new_tokens,
                                                            args.repeats, f"{n}x{b} hf")
            except Exception as e:  # noqa: BLE001 (an OOM: record it, go on)
                if not is_oom(e):
                    raise
                rows[n, b]["hf"] = {"error": "out of memory"}
                log(f"{n}x{b} hf: out of memory")
            progress()
            gc.collect()
            torch.cuda.empty_cache() if device.startswith("cuda") else None
    state = hf_state_to_numpy(model)
    del model
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    from lserve_jax.engine import Engine

    for v in variants:
        key = f"lserve_jax-{v}"
        params, cfg, layout = lserve_params_from_hf(hf_config, state, dtype, v, shape)
        shared = None  # one engine for every configuration that fits it: its programs compile once
        if not args.engine_per_config:
            try:
                shared = Engine(params, cfg, layout=layout, prefix_cache=False, prefill_impl=args.impl,
                                decode_impl=args.impl, max_slots=max(batches),
                                max_seq_len=args.max_seq_len or max(lengths) + args.new_tokens + 64)
            except Exception as e:  # noqa: BLE001 (the largest cache does not fit: one engine each)
                if not is_oom(e):
                    raise
                log(f"{key}: one engine for the largest configuration is out of memory; one per configuration")
        for n, b in configs:
            eng = None
            try:
                # no prefix cache: a repeated prompt would reuse its pages and skip the prefill
                eng = shared or Engine(params, cfg, layout=layout, prefix_cache=False, prefill_impl=args.impl,
                                       decode_impl=args.impl, max_slots=b,
                                       max_seq_len=args.max_seq_len or n + args.new_tokens + 64)
                res, toks = measure(lambda x, k, eng=eng: lserve_run(eng, x, k), [prompts[n]] * b,
                                    args.new_tokens, args.repeats, f"{n}x{b} {key}")
                res.update(agreement(toks, hf_tokens.get((n, b)), args.agree))
                rows[n, b][key] = res
            except Exception as e:  # noqa: BLE001
                if not is_oom(e):
                    raise
                rows[n, b][key] = {"error": "out of memory"}
                log(f"{n}x{b} {key}: out of memory")
            progress()
            del eng
            gc.collect()
        del params, shared
        gc.collect()
    return report(False)


# -- report ---------------------------------------------------------------------------------


def environment(device: str) -> dict:
    import platform

    import jax
    import torch
    import transformers

    commit = os.environ.get("GIT_COMMIT", "")
    if not commit:
        try:
            import subprocess

            commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                    text=True).stdout.strip()
        except OSError:
            commit = ""
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "jax": jax.__version__, "jax_backend": jax.default_backend(), "torch": torch.__version__,
           "transformers": transformers.__version__, "torch_threads": torch.get_num_threads(),
           "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
           "git_commit": commit or "unknown", "torch_device": device,
           "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def table(report: dict) -> str:
    lines = [f"| prompt | tokens | batch | impl | TTFT ms | decode tok/s | TTFT / HF | tok/s / HF | greedy = HF |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in report["results"]:
        hf = row.get("hf") or {}
        for impl in [k for k in row if k == "hf" or k.startswith("lserve_jax-")]:
            r = row[impl]
            if "error" in r:
                lines.append(f"| {row['prompt']} | {row['prompt_tokens']} | {row.get('batch', 1)} | {impl} | "
                             f"{r['error']} | | | | |")
                continue
            ttft, rate = r["ttft_s"], r["decode_tok_s"]
            rt = f"{ttft / hf['ttft_s']:.2f}x" if impl != "hf" and hf.get("ttft_s") else ""
            rr = f"{rate / hf['decode_tok_s']:.2f}x" if impl != "hf" and hf.get("decode_tok_s") and rate else ""
            agree = "" if "agree" not in r else (
                f"yes ({r['agree_first_n']})" if r["agree"] else f"no (first {r['common_prefix']})")
            lines.append(f"| {row['prompt']} | {row['prompt_tokens']} | {r.get('batch', 1)} | {impl} | "
                         f"{ttft * 1e3:.1f} | {rate or 0:.1f} | {rt} | {rr} | {agree} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.shape and not args.random_weights:
        raise SystemExit("--shape needs --random-weights (the real model is the default checkpoint)")
    load_before = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    env = {}  # made at the first write (git, versions), reused by the later ones

    def write(report: dict) -> str:
        if not env:
            env.update(environment(report["device"]), load_average_before=load_before)  # other processes
        report["environment"] = env
        report["args"] = vars(args)
        report["table"] = table(report)
        tag = args.tag or f"{'gpu' if report['device'].startswith('cuda') else 'cpu'}-{datetime.date.today().isoformat()}"
        path = os.path.join(args.out, f"peer_hf-{tag}.json")
        os.makedirs(args.out, exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(report, f, indent=1, default=float)
        os.replace(path + ".tmp", path)
        return path

    report = run_random(args, on_progress=write) if args.random_weights else run_real(args)
    path = write(report)
    print(report["table"])
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
