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
