"""Which scales should FP8 (e4m3) KV pages carry? Perplexity with K and V fake-quantised the way
each layout would store them, on real weights (the choice asked for in issue #18).

Attention reads back exactly what a layout stores: K (after RoPE) and V go through e4m3 with
  none            no quantisation (the reference),
  cast            e4m3 with scale 1 (vLLM's default fp8 KV cache),
  token           one scale per token and head (amax over the head's channels / 448),
  page-channel    one scale per page (64 tokens), head and channel (amax over the page's tokens),
  channel         one per head and channel over the whole window (not causal: a bound),
  token-centred   keys minus their per-head channel mean (softmax-invariant), then per token
                  (the mean over the whole window: not causal, a bound),
  token-centred-page0  the same with the mean of the sequence's first page only (causal: what a
                  cache can store per sequence after its first 64 tokens),
  token, first 4 tokens exact  per token, the attention sinks (first 4 tokens) unquantised,
  K token-centred-calibrated  keys minus a per-layer, per-head channel mean taken once from 1024
                  tokens of calibration text (a model constant: causal, prefix sharing unchanged),
  int8 token      INT8 instead of e4m3, one scale per token and head (amax / 127),
  K smooth-sqrt / smooth-amax  SmoothAttention-style: key channels divided by a calibrated
                  amax**0.5 / amax before the per-token scale (q would take the factor back),
and the perplexity ratio over the unquantised model is reported per combination.

    python bench/kv8_scales.py [--checkpoint DIR] [--length 2048] [--windows 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from common import environment, log, write_json  # noqa: E402

from lserve_jax.checkpoint import open_checkpoint  # noqa: E402
from lserve_jax.evals.corpus import eval_ids  # noqa: E402
from lserve_jax.evals.nll import next_token_nll  # noqa: E402
from lserve_jax.kv8 import fake_quantize  # noqa: E402
from lserve_jax.models.layer import causal_attention, decoder_layer, final_norm  # noqa: E402
from lserve_jax.tokenizer import Tokenizer  # noqa: E402

F8, F8_MAX, PAGE = jnp.float8_e4m3fn, 448.0, 64


def _q(x, amax):
    s = jnp.maximum(amax, 1e-12) / F8_MAX
    return (x / s).astype(F8).astype(x.dtype) * s


def int8_token(x):
    """INT8 with one scale per token and head (amax / 127, round to nearest): LServe's own KV8
    (QServe stores 8-bit integer KV with per-head scales and zero points); the library's quantiser."""
    return fake_quantize(x, jnp.int8)


def none(x):
    return x


def cast(x):
    return x.astype(F8).astype(x.dtype)


def token(x):  # x [B, T, H, D]: what `lserve_jax.kv8` stores
    return fake_quantize(x, F8)


def page_channel(x):
    b, t, h, d = x.shape
    xr = x.reshape(b, t // PAGE, PAGE, h, d)
    return _q(xr, jnp.max(jnp.abs(xr), 2, keepdims=True)).reshape(x.shape)


def channel(x):
    return _q(x, jnp.max(jnp.abs(x), 1, keepdims=True))


def token_centred(x):
    mu = jnp.mean(x, 1, keepdims=True)
    return token(x - mu) + mu


def token_centred_page0(x):
    mu = jnp.mean(x[:, :PAGE], 1, keepdims=True)
    return token(x - mu) + mu


def token_sink4(x):
    """Per token, the sequence's first 4 tokens (the attention sinks) kept exact: what a cache
    that stores the sink in the compute dtype would read."""
    return token(x).at[:, :4].set(x[:, :4])


def per_layer(fn):
    """Marks a layout that takes the layer index too: fn(x, layer)."""
    fn.per_layer = True
    return fn


def calibrated(stats):
    """Layouts from per-layer key statistics of a calibration window (model constants, the same
    for every sequence: prefix sharing stays exact). stats[layer] = (mean [H, D] over tokens 4..,
    amax [H, D])."""
    @per_layer
    def centred(x, i):  # keys minus a calibrated per-head channel mean (softmax-invariant)
        mu = stats[i][0]
        return token(x - mu) + mu

    @per_layer
    def centred_int8(x, i):
        mu = stats[i][0]
        return int8_token(x - mu) + mu

    def smooth(power):
        @per_layer
        def f(x, i):  # SmoothAttention-style: channels divided by amax**power before the per-token scale
            lam = jnp.maximum(stats[i][1], 1e-6) ** power
            return token(x / lam) * lam
        return f

    return {"K token-centred-calibrated, V token": (centred, token),
            "K smooth-sqrt, V token": (smooth(0.5), token),
            "K smooth-amax, V token": (smooth(1.0), token),
            "int8 K token-centred-calibrated, V token": (centred_int8, int8_token)}


CALIBRATED = ("K token-centred-calibrated, V token", "K smooth-sqrt, V token", "K smooth-amax, V token",
              "int8 K token-centred-calibrated, V token")
CALIB_TOKENS = 1024

# (K layout, V layout)
VARIANTS = {"none": (none, none), "cast": (cast, cast), "token": (token, token),
            "K token, V none": (token, none), "K none, V token": (none, token),
            "page-channel": (page_channel, page_channel), "K channel, V token": (channel, token),
            "K token-centred, V token": (token_centred, token),
            "K token-centred-page0, V token": (token_centred_page0, token),
            "token, first 4 tokens exact": (token_sink4, token_sink4),
            "int8 token": (int8_token, int8_token)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="converted checkpoint (default: the default model)")
    ap.add_argument("--length", type=int, default=2048, help="tokens per window (a multiple of 64)")
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--variants", help="subset of the variants, separated by ';' (default: all)")
    ap.add_argument("--tag", default="", help="suffix of the JSON name")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    if args.length % PAGE:
        ap.error(f"--length must be a multiple of {PAGE}")
    if args.checkpoint is None:
        from lserve_jax.api import default_checkpoint

        args.checkpoint = default_checkpoint()
    ckpt = open_checkpoint(args.checkpoint)
    cfg, tok = ckpt.config, Tokenizer.from_checkpoint_dir(ckpt.path)
    ids = eval_ids(lambda s: tok.encode(s, add_special_tokens=False))
    toks = np.asarray(ids[: args.windows * args.length], np.int32).reshape(args.windows, args.length)
    params = ckpt.load_params("float32")
    positions = jnp.arange(args.length)[None]

    def nll_fn(fk, fv):
        call = lambda f, x, i: f(x, i) if getattr(f, "per_layer", False) else f(x)

        @jax.jit
        def nll(params, t):
            x = params.embed[t]
            for i, lp in enumerate(params.layers):
                x, _ = decoder_layer(lp, x, positions, cfg,
                                     lambda q, k, v, i=i: (causal_attention(q, call(fk, k, i), call(fv, v, i)), None))
            return next_token_nll(params, final_norm(params, x, cfg), t)
        return nll

    variants = dict(VARIANTS)
    chosen = list(VARIANTS) + list(CALIBRATED) if not args.variants else \
        ["none"] + [v.strip() for v in args.variants.split(";") if v.strip() not in ("", "none")]
    if set(chosen) & set(CALIBRATED):
        # key statistics per layer from the text after the evaluation windows
        calib = np.asarray(ids[args.windows * args.length:][:CALIB_TOKENS], np.int32)[None]
        if calib.shape[1] < CALIB_TOKENS:
            ap.error(f"the corpus has no {CALIB_TOKENS} tokens left after the windows for calibration")
        stats = []

        def collect(q, k, v):
            stats.append((jnp.mean(k[0, 4:], 0), jnp.max(jnp.abs(k[0]), 0)))
            return causal_attention(q, k, v), None

        x = params.embed[jnp.asarray(calib)]
        for lp in params.layers:
            x, _ = decoder_layer(lp, x, jnp.arange(calib.shape[1])[None], cfg, collect)
        variants.update(calibrated(stats))
    unknown = set(chosen) - set(variants)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS) + list(CALIBRATED)}")
    rows, base = [], None
    for name in chosen:
        fk, fv = variants[name]
        t0, fn = time.perf_counter(), nll_fn(fk, fv)
        nll = np.concatenate([np.asarray(fn(params, jnp.asarray(toks[i:i + 1]))) for i in range(args.windows)])
        ppl = float(np.exp(nll.mean()))
        base = base or ppl
        rows.append(dict(variant=name, ppl=ppl, ratio=ppl / base))
        log(f"{name:26s} ppl {ppl:.4f}  x{ppl / base:.5f}  ({time.perf_counter() - t0:.0f} s)")
    res = dict(env=environment(), checkpoint=str(ckpt.path), model=ckpt.meta.get("source"),
               length=args.length, windows=args.windows, rows=rows)
    path = os.path.join(args.out, f"kv8_scales-{cfg.num_layers}L-{res['env']['date'][:10]}{args.tag}.json")
    write_json(path, res)
    print("| K, V layout | ppl | ratio |\n|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['ppl']:.4f} | {r['ratio']:.4f} |")
    print("wrote", path)


if __name__ == "__main__":
    main()
