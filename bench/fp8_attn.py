"""Is cuDNN's FP8 flash attention worth using for the retrieval heads' prefill? (GPU only)

Run:  PYTHONUNBUFFERED=1 python bench/fp8_attn.py --out $OUT

For causal GQA attention of one layer's retrieval heads (llama3-8b heads: Hq=16 / Hkv=4, the
pattern's half, D=128, B=1) at each T: cuDNN bf16 flash attention against cuDNN FP8 flash
attention as `lserve_jax.ops.attn8` runs it (K centred, Q and K rotated, per-tensor scales, all
inside the timed function, so the time is what a layer pays). Error of the FP8 output against the bf16 one, relative RMS and max, on two
inputs: i.i.d. normal q/k/v (diffuse attention, the hard case for FP8 probabilities) and
keys with a few strong positions per query block (peaked attention).
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from common import environment, log, timed, write_json  # noqa: E402
from lserve_jax.ops.attn8 import fp8_attention_cudnn  # noqa: E402


def attn_bf16(q, k, v, scale):
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, implementation="cudnn")


def attn_fp8(q, k, v, scale):
    """What prefill impl "cudnn8+triton" runs for retrieval heads (`ops.attn8`): K centred, Q and
    K rotated, per-tensor e4m3, cuDNN's FP8 flash attention, the output back in bf16."""
    lengths = jnp.full((q.shape[0],), q.shape[1], jnp.int32)
    return fp8_attention_cudnn(q, k, v, lengths, scale)


def inputs(t, hq, hkv, d, kind, seed=0):
    kq, kk, kv, _ = jax.random.split(jax.random.key(seed), 4)  # 4 keys: the committed runs' inputs
    q = jax.random.normal(kq, (1, t, hq, d), jnp.float32)
    k = jax.random.normal(kk, (1, t, hkv, d), jnp.float32)
    v = jax.random.normal(kv, (1, t, hkv, d), jnp.float32)
    if kind == "peaked":  # every 64th key aligned with the mean query direction: a few strong keys
        u = jnp.mean(q, axis=(0, 1, 2))
        u = u / jnp.linalg.norm(u)
        strong = (jnp.arange(t) % 64 == 0)[None, :, None, None]
        k = jnp.where(strong, k + 6.0 * u * jnp.sqrt(d), k)
        q = q + 2.0 * u
    return q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ts", default="8192,32768,131072")
    p.add_argument("--heads", default="16x4", help="Hq x Hkv")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    hq, hkv = (int(x) for x in a.heads.split("x"))
    d = 128
    scale = d ** -0.5
    res = {"env": environment(), "heads": [hq, hkv], "points": []}
    f16 = jax.jit(lambda q, k, v: attn_bf16(q, k, v, scale))
    f8 = jax.jit(lambda q, k, v: attn_fp8(q, k, v, scale))
    for t in [int(x) for x in a.ts.split(",")]:
        for kind in ("normal", "peaked"):
            q, k, v = inputs(t, hq, hkv, d, kind)
            pt = {"t": t, "input": kind}
            try:
                ref = f16(q, k, v).astype(jnp.float32)
                got = f8(q, k, v).astype(jnp.float32)
                err = got - ref
                pt["rel_rms"] = float(jnp.sqrt(jnp.mean(err ** 2) / jnp.mean(ref ** 2)))
                pt["max_abs"] = float(jnp.max(jnp.abs(err)))
                pt["ref_rms"] = float(jnp.sqrt(jnp.mean(ref ** 2)))
                if kind == "normal":
                    pt["bf16_ms"] = timed(lambda: f16(q, k, v), warmup=2, iters=a.iters)["median_s"] * 1e3
                    pt["fp8_ms"] = timed(lambda: f8(q, k, v), warmup=2, iters=a.iters)["median_s"] * 1e3
                    pt["speedup"] = pt["bf16_ms"] / pt["fp8_ms"]
            except Exception as e:  # noqa: BLE001 - a probe: record and go on
                pt["error"] = f"{type(e).__name__}: {str(e)[:400]}"
            log(pt)
            res["points"].append(pt)
            if a.out:
                write_json(os.path.join(a.out, "fp8_attn.json"), res)
    print("T       input   bf16 ms   fp8 ms  speedup  rel_rms")
    for pt in res["points"]:
        print(f"{pt['t']:<8}{pt['input']:<8}{pt.get('bf16_ms', float('nan')):9.2f}{pt.get('fp8_ms', float('nan')):9.2f}"
              f"{pt.get('speedup', float('nan')):9.2f}  {pt.get('rel_rms', float('nan')):.4f} {pt.get('error', '')[:80]}")


if __name__ == "__main__":
    main()
