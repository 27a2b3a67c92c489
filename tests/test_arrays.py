"""`Arrays`: the plain flatten (jit's fast path) and the keyed flatten (orbax, shardings) must
agree on order, and unflatten must give back an equal, immutable `Arrays`."""

import jax
import numpy as np
import pytest

from lserve_jax.arrays import Arrays


def test_plain_and_keyed_flatten_agree_and_round_trip():
    a = Arrays(wq=np.ones(2), wk=np.zeros(3), norm=Arrays(scale=np.full(4, 2.0)))
    leaves, treedef = jax.tree.flatten(a)
    keyed, _ = jax.tree_util.tree_flatten_with_path(a)
    assert [p for p, _ in keyed] == [(jax.tree_util.GetAttrKey("wq"),), (jax.tree_util.GetAttrKey("wk"),),
                                     (jax.tree_util.GetAttrKey("norm"), jax.tree_util.GetAttrKey("scale"))]
    for (_, x), y in zip(keyed, leaves):
        assert x is y
    b = jax.tree.unflatten(treedef, [x + 1 for x in leaves])
    assert isinstance(b, Arrays) and list(b) == ["wq", "wk", "norm"]
    np.testing.assert_array_equal(b.norm.scale, np.full(4, 3.0))
    with pytest.raises(AttributeError, match="immutable"):
        b.wq = None
    # through jit: the same names and values come back
    out = jax.jit(lambda t: t)(a)
    assert list(out) == list(a) and float(out.wk.sum()) == 0.0
