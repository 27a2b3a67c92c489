"""The fused decode-append kernel (interpret mode) equals the jnp scatters of cache.append, over
appends that open pages and logical pages, wrap the ring, and layers with R = 0 or S = 0."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from lserve_jax import cache as kvc
from lserve_jax.config import SparseConfig


@pytest.mark.parametrize("r,s", [(2, 1), (0, 3), (3, 0), (1, 1)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fused_append_equals_reference(r, s, dtype):
    rng = np.random.default_rng(r * 10 + s)
    sp = SparseConfig(page_size=16, logical_page_size=4, decode_sink=4, decode_local=12)
    b, d, n, p = 3, 32, 5, 17
    c = lambda x: jnp.asarray(x, dtype)
    lc = kvc.LayerCache(
        k_pages=c(rng.standard_normal((r, p, 16, d))), v_pages=c(rng.standard_normal((r, p, 16, d))),
        k_min=c(rng.standard_normal((r, p, 4, d))), k_max=c(rng.standard_normal((r, p, 4, d))),
        ring_k=c(rng.standard_normal((s, b, 16, d))), ring_v=c(rng.standard_normal((s, b, 16, d))),
        sel_pages=jnp.zeros((b, max(r, 1), 2), jnp.int32), sel_count=jnp.zeros((b, max(r, 1)), jnp.int32))
    table = jnp.asarray(rng.permutation(np.arange(1, p))[: b * n].reshape(b, n), jnp.int32)
    pos = np.array([14, 3, 30], np.int32)  # crosses a page (16, 32) and logical pages; ring wraps
    ref = got = lc
    for _ in range(6):
        k = c(rng.standard_normal((b, r + s, d)))
        v = c(rng.standard_normal((b, r + s, d)))
        ref = kvc.append(ref, k, v, table, jnp.asarray(pos), sp, impl="reference")
        got = kvc.append(got, k, v, table, jnp.asarray(pos), sp, impl="pallas")
        pos = pos + 1
        for name in ("k_pages", "v_pages", "k_min", "k_max", "ring_k", "ring_v"):
            np.testing.assert_array_equal(np.asarray(getattr(got, name), np.float32),
                                          np.asarray(getattr(ref, name), np.float32), err_msg=name)


def test_append_rejects_unknown_impl():
    with pytest.raises(ValueError, match="append impl"):
        kvc.append(None, None, None, None, None, SparseConfig(), impl="triton")


@pytest.mark.parametrize("impl", ["reference", "pallas"])
def test_key_statistics_equal_recomputation_after_appends(impl):
    """After a prefill and appends that cross logical and physical page boundaries, every logical
    page's k_min / k_max equal the min / max recomputed from the keys stored in the pages (over
    the valid tokens only), and the pages hold every token at its position."""
    from lserve_jax.config import ModelConfig
    from lserve_jax.heads import HeadLayout

    cfg = ModelConfig(architecture="llama", vocab_size=32, hidden_size=32, intermediate_size=32, num_layers=1,
                      num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=256)
    sp = SparseConfig(page_size=16, logical_page_size=4, decode_sink=4, decode_local=12)
    b, n = 2, 5
    cache = kvc.init_cache(cfg, HeadLayout(2, (2,)), sp, batch=b, num_pages=b * n + 1, max_pages_per_seq=n,
                           dtype=jnp.float32)
    table = jnp.asarray(np.arange(1, b * n + 1)[::-1].reshape(b, n).copy(), jnp.int32)
    rng = np.random.default_rng(7)
    lengths = np.array([13, 30], np.int32)
    keys = rng.standard_normal((b, n * 16, 2, 16)).astype(np.float32)
    lc = kvc.write_prefill(cache.layers[0], jnp.asarray(keys[:, :32]), jnp.asarray(keys[:, :32]), table,
                           jnp.asarray(lengths), sp)
    for step in range(22):  # row 0: 13 -> 35 (pages 0..2), row 1: 30 -> 52 (pages 1..3)
        pos = lengths + step
        k = jnp.asarray(keys[np.arange(b), pos])
        lc = kvc.append(lc, k, k, table, jnp.asarray(pos), sp, impl=impl)
    final = lengths + 22
    kp, kmin, kmax = (np.asarray(x) for x in (lc.k_pages, lc.k_min, lc.k_max))
    tab = np.asarray(table)
    for bi in range(b):
        for t in range(final[bi]):
            np.testing.assert_array_equal(kp[:, tab[bi, t // 16], t % 16], keys[bi, t])
        for j in range(-(-final[bi] // 16)):
            for lpg in range(4):
                lo, hi = j * 16 + lpg * 4, min(j * 16 + lpg * 4 + 4, final[bi])
                if hi <= lo:
                    continue
                stored = kp[:, tab[bi, j], lo % 16: lo % 16 + (hi - lo)]  # [R, tokens, D]
                np.testing.assert_array_equal(kmin[:, tab[bi, j], lpg], stored.min(axis=1))
                np.testing.assert_array_equal(kmax[:, tab[bi, j], lpg], stored.max(axis=1))
