# Quick start: `make demo` (generation with the default real model), `make serve` (HTTP server) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROMPT ?= What is the capital of France?

.PHONY: demo serve test venv clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch==2.13.0 first: a local CPU build; a plain "torch" would pull a multi-GB CUDA build
	$(PY) -m pip install -q "torch==2.13.0" || $(PY) -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m lserve_jax.generate --chat --prompt "$(PROMPT)" --max-new-tokens 64

serve: $(STAMP)
	$(PY) -m lserve_jax.serve

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=25 tests

clean:
	rm -rf $(VENV)
