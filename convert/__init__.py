"""`python -m convert`: thin entry point; the converter lives in `lserve_jax.convert`."""
