"""lserve_jax: long-context Llama-family inference in JAX with LServe's unified sparse attention.

The public names are imported lazily so that `import lserve_jax.config` stays free of jax.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "load": "lserve_jax.api",
    "default_checkpoint": "lserve_jax.api",
    "Engine": "lserve_jax.engine",
    "Generation": "lserve_jax.engine",
    "SamplingParams": "lserve_jax.sampling",
    "SparseConfig": "lserve_jax.config",
    "ModelConfig": "lserve_jax.config",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    import importlib

    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    try:  # submodules too: `lserve_jax.api.load` after a plain `import lserve_jax`
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError:
        raise AttributeError(f"module 'lserve_jax' has no attribute {name!r}") from None
