"""The OpenAI-compatible HTTP server: `loop` (the engine thread), `api` (the FastAPI routes).
`python -m lserve_jax.serve` runs it."""

from .api import create_app
from .loop import EngineLoop, Metrics

__all__ = ["create_app", "EngineLoop", "Metrics"]
