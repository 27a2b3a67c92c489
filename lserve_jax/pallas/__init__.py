"""Pallas kernels, each beside its pure-jnp reference. They know nothing of models or caches."""
