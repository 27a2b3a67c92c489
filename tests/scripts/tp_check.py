"""Sharded prefill + decode vs one device (run by tests/test_sharding.py in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=4). Prints one line per case, exits 1 on a mismatch."""

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from lserve_jax import cache as kvc
from lserve_jax.config import ModelConfig, SparseConfig
from lserve_jax.engine import Engine
from lserve_jax.heads import layout_and_permutation
from lserve_jax.model import ModelSpec, decode_step, prefill
from lserve_jax.ops import Kernels
from lserve_jax.params import init_params, permute_kv_heads
from lserve_jax.sampling import SamplingParams
from lserve_jax.sharding import balance_retrieval, shard_cache, shard_params, tp_permutation

jax.config.update("jax_default_matmul_precision", "highest")
REFERENCE = Kernels.from_names(prefill="reference", decode="reference")


def run(params, cfg, layout, sparse, tp, prompts, steps):
    spec = ModelSpec(cfg, layout, sparse, REFERENCE, tp)
    b, max_pages = len(prompts), 8
    cache = kvc.init_cache(cfg, layout, sparse, batch=b, num_pages=b * max_pages + 1, max_pages_per_seq=max_pages,
                           dtype=jnp.float32)
    cache = cache.replace(page_table=jnp.arange(1, b * max_pages + 1, dtype=jnp.int32).reshape(b, max_pages))
    cache, params = shard_cache(cache, tp), shard_params(params, cfg, tp)
    tokens = np.zeros((b, 64), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
    pf = jax.jit(functools.partial(prefill, spec=spec))
    dec = jax.jit(functools.partial(decode_step, spec=spec))
    logits, cache = pf(params, cache, jnp.asarray(tokens), lengths)
    out = [np.asarray(logits)]
    for s in range(steps.shape[1]):
        logits, cache = dec(params, cache, jnp.asarray(steps[:, s]))
        out.append(np.asarray(logits))
    return np.stack(out)


def main():
    assert len(jax.devices()) >= 4, jax.devices()
    rng = np.random.default_rng(0)
    failures = 0
    for hkv, g in ((4, 2), (8, 1)):
        cfg = ModelConfig("llama", vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2,
                          num_heads=hkv * g, num_kv_heads=hkv, head_dim=16, max_position_embeddings=512)
        params = init_params(cfg, jax.random.key(1), jnp.float32, scale=0.2)
        alpha = rng.random((cfg.num_layers, hkv))
        prompts = [list(rng.integers(0, 96, n)) for n in (37, 11)]
        steps = rng.integers(0, 96, (2, 6)).astype(np.int32)
        for kind, retrieval, sparse in (
            ("dense", np.ones_like(alpha, bool), SparseConfig(page_size=16, logical_page_size=4, token_budget=512)),
            ("sparse", alpha > 0.5, SparseConfig(page_size=16, logical_page_size=4, token_budget=32,
                                                 prefill_sink=4, prefill_local=12, decode_sink=4, decode_local=12,
                                                 selector_interval=2)),
        ):
            for tp in (2, 4):
                if hkv % tp:
                    continue
                balanced = balance_retrieval(retrieval, tp, alpha)
                # one device: the usual retrieval-first order of the same head split
                layout1, perms1 = layout_and_permutation(balanced)
                one = run(permute_kv_heads(params, cfg, perms1), cfg, layout1, sparse, 1, prompts, steps)
                # tp devices: each device's slice retrieval-first
                layout, perms = tp_permutation(balanced, tp)
                many = run(permute_kv_heads(params, cfg, perms), cfg, layout, sparse, tp, prompts, steps)
                err = float(np.abs(one - many).max())
                ok = err <= 1e-4
                failures += not ok
                print(f"hkv={hkv} g={g} {kind} tp={tp} retrieval/layer={layout.num_retrieval} max|dlogit|={err:.2e} "
                      f"{'ok' if ok else 'MISMATCH'}", flush=True)
                if kind == "sparse" and tp == 2:
                    # the engine's several decode steps per dispatch (a fori_loop over the sharded step)
                    toks = {}
                    for n in (1, 3):
                        eng = Engine(permute_kv_heads(params, cfg, perms), cfg, layout=layout, sparse=sparse, tp=tp,
                                     max_slots=2, max_seq_len=128, decode_steps=n)
                        gens = eng.generate([[int(t) for t in p] for p in prompts], SamplingParams(max_new_tokens=7))
                        toks[n] = [g_.token_ids for g_ in gens]
                    ok = toks[1] == toks[3]
                    failures += not ok
                    print(f"hkv={hkv} g={g} engine tp={tp} decode_steps 3 vs 1: {'ok' if ok else 'MISMATCH'}", flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
