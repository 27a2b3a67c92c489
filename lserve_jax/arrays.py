"""`Arrays`: a pytree of named arrays with attribute access, filled from declarations.

Layer parameters and layer caches are `Arrays` whose names come from their declarations
(`lserve_jax.decl`), so adding a parameter or a cache field is one declaration, not an edit of
a fixed dataclass field list in several files. Key paths are attribute keys (`.wq`), the same
as the flax dataclasses they replace, so orbax checkpoints and shardings see identical trees.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import jax



@jax.tree_util.register_pytree_with_keys_class
class Arrays:
    """Immutable mapping name -> array (or any pytree leaf, e.g. a PartitionSpec)."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, Any] | None = None, /, **kw):
        object.__setattr__(self, "_items", {**(items or {}), **kw})

    def __getattr__(self, name: str):
        try:
            return object.__getattribute__(self, "_items")[name]
        except KeyError:
            raise AttributeError(f"no array {name!r}; these are: {sorted(self._items)}") from None

    def __setattr__(self, name, value):
        raise AttributeError("Arrays is immutable; use .replace(name=...)")

    def __getitem__(self, name: str):
        return self._items[name]

    def get(self, name: str, default=None):
        return self._items.get(name, default)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def items(self):
        return self._items.items()

    def replace(self, **kw) -> "Arrays":
        unknown = set(kw) - set(self._items)
        if unknown:
            raise KeyError(f"replace: no array(s) {sorted(unknown)}; these are: {sorted(self._items)}")
        return Arrays({**self._items, **kw})

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={getattr(v, 'shape', v)}" for k, v in self._items.items())
        return f"Arrays({inner})"

    # Flattening runs on every jitted call, for each layer's params and cache (hundreds of nodes a
    # decode step): the plain flatten skips the key objects, and unflatten skips __init__'s copies.
    def tree_flatten(self):
        items = self._items
        return tuple(items.values()), tuple(items)

    def tree_flatten_with_keys(self):
        names = tuple(self._items)
        return tuple((jax.tree_util.GetAttrKey(n), self._items[n]) for n in names), names

    @classmethod
    def tree_unflatten(cls, names, children):
        new = object.__new__(cls)
        object.__setattr__(new, "_items", dict(zip(names, children)))
        return new
