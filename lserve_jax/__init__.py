"""lserve_jax: long-context Llama-family inference in JAX with LServe's unified sparse attention."""

__version__ = "0.1.0"
