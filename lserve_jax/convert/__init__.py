"""Checkpoint converters (GGUF -> Hugging Face layout); see lserve_jax.convert.gguf."""
