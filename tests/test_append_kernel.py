"""The fused decode-append kernel (interpreted on CPU, compiled under the `gpu` marker) equals
the jnp scatters of its reference, over appends that open pages and logical pages, wrap the
ring, and layers with R = 0 or S = 0, into bf16/float32 and 8-bit (int8, e4m3) pages and rings;
cache.append through the ops API."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from lserve_jax import cache as kvc
from lserve_jax.config import SparseConfig
from lserve_jax.kv8 import INT8, KV8, quantize_tokens
from lserve_jax.quant import FP8
from lserve_jax.ops import OpChoice, Unsupported, append_token
from lserve_jax.pallas.append import append_reference, fused_append

from .kernel_base import COMPILED, GPU_MARKS, INTERPRET, kernel_cases

_FIELDS = ("k_pages", "v_pages", "k_min", "k_max", "ring_k", "ring_v")

# (r, s, dtype, page, lp, sink, local, d): small layers on CPU; llama3-8b-like ones on the GPU
# (r, s, dtype, page, lp, sink, local, d, kv): kv the 8-bit storage dtype (None: dtype)
_CASES = [(r, s, dtype, 16, 4, 4, 12, 32, None) for r, s in [(2, 1), (0, 3), (3, 0), (1, 1)]
          for dtype in (jnp.float32, jnp.bfloat16)] \
    + [(r, s, jnp.bfloat16, 16, 4, 4, 12, 32, kv) for r, s in [(2, 1), (0, 3), (3, 0)] for kv in (INT8, FP8)]
_GPU_CASES = [(4, 4, jnp.bfloat16, 64, 16, 128, 256, 128, None), (8, 0, jnp.bfloat16, 64, 16, 128, 256, 128, None),
              (3, 5, jnp.float32, 64, 16, 128, 256, 64, None), (4, 4, jnp.bfloat16, 64, 16, 128, 256, 128, INT8),
              (4, 4, jnp.bfloat16, 64, 16, 128, 256, 128, FP8), (0, 8, jnp.float32, 64, 16, 128, 256, 64, INT8)]


def _case_id(c):
    kv = "" if c[8] is None else f"-kv{jnp.dtype(c[8]).name}"
    return f"R{c[0]}S{c[1]}-page{c[3]}-D{c[7]}-{jnp.dtype(c[2]).name}{kv}"


def _as_stored(x, kv):
    """x [..., D] as the cache holds it: the array, or 8-bit values with per-token scales."""
    return x if kv is None else KV8(*quantize_tokens(x, kv))


def _plain(x):
    """Every array a cache entry stands for, float32 (a KV8: its values and its scales)."""
    return [np.asarray(x.values, np.float32), np.asarray(x.scale)] if isinstance(x, KV8) else [np.asarray(x, np.float32)]


@pytest.mark.parametrize("runner,case", kernel_cases(_CASES, _GPU_CASES, ids=_case_id))
def test_fused_append_equals_reference(runner, case):
    r, s, dtype, page, lp, sink, local, d, kv = case
    rng = np.random.default_rng(r * 10 + s)
    b, w, steps = 3, sink + local, 6
    # crosses a page and logical pages; the ring wraps (positions past sink + local)
    pos = np.array([page - 2, 3, 2 * page - 2 + w], np.int32)
    n = -(-(int(pos.max()) + steps) // page)  # table columns: every position stays inside the table
    p = b * n + 2
    c = lambda x: jnp.asarray(x, dtype)
    kvs = lambda x: _as_stored(c(x), kv)
    cache = (kvs(rng.standard_normal((r, p, page, d))), kvs(rng.standard_normal((r, p, page, d))),
             c(rng.standard_normal((r, p, page // lp, d))), c(rng.standard_normal((r, p, page // lp, d))),
             kvs(rng.standard_normal((s, b, w, d))), kvs(rng.standard_normal((s, b, w, d))))
    table = jnp.asarray(rng.permutation(np.arange(1, p))[: b * n].reshape(b, n), jnp.int32)
    kw = dict(page=page, lp=lp, sink=sink, local=local)
    ref = got = cache
    for _ in range(steps):
        k = c(rng.standard_normal((b, r + s, d)))
        v = c(rng.standard_normal((b, r + s, d)))
        ref = append_reference(k, v, jnp.asarray(pos), table, *ref, **kw)
        got = fused_append(k, v, jnp.asarray(pos), table, *got, **kw, **runner.kw)
        pos = pos + 1
        for name, a, z in zip(_FIELDS, got, ref):
            assert isinstance(a, KV8) == isinstance(z, KV8) == (kv is not None and name not in ("k_min", "k_max"))
            _assert_stored_equal(_plain(a), _plain(z), name, exact=runner.interpret, kv=kv)


def _assert_stored_equal(got, want, name, exact: bool, kv=None):
    """Interpreted: bit for bit. Compiled, 8-bit entries (values and scales): the kernel quantises
    in-register, where Triton's float32 division may round differently from XLA's: an ulp of the
    scale, and at worst one quantisation step (int8: 1; e4m3: 2**-3 relative) of a few values."""
    if exact or len(got) == 1:
        for x, y in zip(got, want):
            np.testing.assert_array_equal(x, y, err_msg=name)
        return
    (qx, sx), (qy, sy) = got, want
    np.testing.assert_allclose(sx, sy, rtol=1e-6, err_msg=name)
    step = 1.0 if jnp.dtype(kv) == jnp.dtype(INT8) else np.abs(qy) * 2.0 ** -3
    assert np.all(np.abs(qx - qy) <= step + 1e-6), name
    # rare: only values on a rounding boundary (a field with no heads of its kind is empty)
    assert qx.size == 0 or np.mean(qx != qy) < 1e-3, name


def test_append_choices_say_why():
    """Unknown implementation names and unsupported shapes say why."""
    with pytest.raises(ValueError, match="unknown append implementation"):
        kvc.append(None, None, None, None, None, SparseConfig(), choice=OpChoice(("mosaic",)))
    sp = SparseConfig(page_size=16, logical_page_size=4, decode_sink=4, decode_local=12)
    b, d = 2, 24  # a head_dim the fused kernel does not store (not a power of 2)
    args = (jnp.zeros((b, 2, d)), jnp.zeros((b, 2, d)), jnp.asarray([0, 5], jnp.int32), jnp.ones((b, 2), jnp.int32),
            jnp.zeros((1, 3, 16, d)), jnp.zeros((1, 3, 16, d)), jnp.zeros((1, 3, 4, d)), jnp.zeros((1, 3, 4, d)),
            jnp.zeros((1, b, 16, d)), jnp.zeros((1, b, 16, d)))
    kw = dict(page=sp.page_size, lp=sp.logical_page_size, sink=sp.decode_sink, local=sp.decode_local)
    with pytest.raises(Unsupported, match="power-of-2 head_dim"):
        append_token(*args, **kw, choice=INTERPRET.choice("triton"))
    with pytest.raises(ValueError, match="k_min"):
        append_token(*args[:6], args[6][:, :, :2], *args[7:], **kw)
    out = append_token(*args, **kw, choice=OpChoice())  # default order: the reference runs it
    assert out[4].shape == (1, b, 16, d)


@pytest.mark.parametrize("impl", ["reference", "pallas", pytest.param("gpu", marks=GPU_MARKS)])
def test_key_statistics_equal_recomputation_after_appends(impl):
    """After a prefill and appends that cross logical and physical page boundaries, every logical
    page's k_min / k_max equal the min / max recomputed from the keys stored in the pages (over
    the valid tokens only), and the pages hold every token at its position."""
    from lserve_jax.heads import HeadLayout

    from .tiny import tiny_config

    cfg = tiny_config(vocab_size=32, hidden_size=32, intermediate_size=32, num_layers=1, max_position_embeddings=256)
    sp = SparseConfig(page_size=16, logical_page_size=4, decode_sink=4, decode_local=12)
    b, n = 2, 5
    cache = kvc.init_cache(cfg, HeadLayout(2, (2,)), sp, batch=b, num_pages=b * n + 1, max_pages_per_seq=n,
                           dtype=jnp.float32)
    table = jnp.asarray(np.arange(1, b * n + 1)[::-1].reshape(b, n).copy(), jnp.int32)
    rng = np.random.default_rng(7)
    lengths = np.array([13, 30], np.int32)
    keys = rng.standard_normal((b, n * 16, 2, 16)).astype(np.float32)
    lc = kvc.write_chunk(cache.layers[0], jnp.asarray(keys[:, :32]), jnp.asarray(keys[:, :32]), table,
                         jnp.zeros_like(table), jnp.zeros((b,), jnp.int32), jnp.asarray(lengths), sp)
    for step in range(22):  # row 0: 13 -> 35 (pages 0..2), row 1: 30 -> 52 (pages 1..3)
        pos = lengths + step
        k = jnp.asarray(keys[np.arange(b), pos])
        if impl == "gpu":  # compiled, through the ops API
            arrays = append_token(k, k, jnp.asarray(pos), table, *(getattr(lc, f) for f in _FIELDS),
                                  page=16, lp=4, sink=4, local=12, choice=COMPILED.choice("triton"))
            lc = lc.replace(**dict(zip(_FIELDS, arrays)))
        else:
            lc = kvc.append(lc, k, k, table, jnp.asarray(pos), sp, choice=OpChoice.from_name("append", impl))
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


@pytest.mark.parametrize("dtype", [INT8, FP8])
def test_in_kernel_quantiser_equals_the_writers_quantiser(dtype):
    """The append kernel's quantiser (`quantize_amax` rounding through `round_half_even`, ops
    Triton lowers) gives the values and scales of `kv8.quantize_tokens` exactly: random rows,
    rows whose values land on .5 steps (ties round to even), an all-zero row and a row with one
    huge value."""
    from lserve_jax.quant import quantize_amax, round_half_even

    rng = np.random.default_rng(3)
    rows = [rng.standard_normal((64, 32)) * 3, np.zeros((1, 32)), np.r_[[1e6], np.ones(31)][None]]
    ties = (np.arange(-127, 128) + 0.5)[None, :32] * np.ones((4, 1))  # y = x / (127 / 127) lands on halves
    ties[:, 0] = 127.0  # amax 127 -> scale 1
    rows.append(ties)
    x = jnp.asarray(np.concatenate([np.resize(r, (len(r), 32)) for r in rows]), jnp.float32)
    q, s = quantize_amax(x, -1, dtype, rounding=round_half_even)
    want_q, want_s = quantize_tokens(x, dtype)
    np.testing.assert_array_equal(np.asarray(q, np.float32), np.asarray(want_q, np.float32))
    np.testing.assert_array_equal(np.asarray(s)[:, 0], np.asarray(want_s))
