"""What calibration, tests and benchmarks measure a model with, in one place.

* `corpus`: the shipped public-domain text, split into an evaluation half (perplexity) and a
  calibration half (pass-key haystacks, the boundary refinement).
* `passkey`: token-exact pass-key prompts and `passed`.
* `grid`: the pass-key grid (`GRID_LENGTHS` x `GRID_DEPTHS`), run through an engine
  (`run_grid`) or teacher-forced through the gated forward (`passkey_proxy`).
* `nll`: next-token NLL (`next_token_nll`, over the LM head `lm_logits` of `models.layer`), and
  the all-position forward through `prefill_attention` (`forward_hidden`, `token_nll`).
* `ppl`: pooled-window `perplexity` of a head pattern, and the `random_pattern` control.
* `ruler`: RULER-style long-context tasks (needles, variable tracking, common words) in natural
  text, token-exact (`make_samples`, `RulerSample`), their exact scorer and 95% intervals
  (`wilson`, `bootstrap_ci`); run through engines by `bench/long_context.py`.

Names are imported lazily, as in `lserve_jax/__init__.py`: `corpus`, `passkey` and `ruler` stay free of
jax, and `grid` and `ppl` (which use `calibrate.gated`, while calibration uses `passkey`,
`corpus` and `nll`) are loaded only when asked for.
"""

from __future__ import annotations

_EXPORTS = {
    **dict.fromkeys(("TEXT_PATH", "read_text", "split_text", "eval_ids", "haystack_ids"), "corpus"),
    **dict.fromkeys(("Encode", "PasskeyPrompt", "byte_encoder", "random_key", "build_prompt", "passkey_prompt",
                     "multi_passkey_sample", "passed"), "passkey"),
    **dict.fromkeys(("GRID_LENGTHS", "GRID_DEPTHS", "grid_prompts", "run_grid", "passkey_proxy"), "grid"),
    **dict.fromkeys(("next_token_nll", "forward_hidden", "token_nll", "lm_logits"), "nll"),
    **dict.fromkeys(("perplexity", "random_pattern"), "ppl"),
    **dict.fromkeys(("RULER_TASKS", "RulerSample", "Haystack", "Frame", "make_sample", "make_samples", "wilson",
                     "bootstrap_ci"), "ruler"),
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    import importlib

    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
