# The two commands of the README: `make demo` and `make test`. Both set everything up from scratch on a fresh
# machine (a virtual environment with the CPU build of torch, the package, the offline assets) and work offline.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo test test-fast benchmarks lint

setup: $(VENV)/.installed

# torch first: `pip install torch==2.13.0` takes the CPU build; a bare `torch` requirement would pull a CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test,dev]"
	$(BIN)/dualroute fetch-assets
	touch $@

demo: setup
	$(BIN)/dualroute demo

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

benchmarks: setup
	cd benchmarks && ../$(BIN)/python bench_attention.py

lint: setup
	$(BIN)/ruff check modeling_dualroute tests benchmarks metrics model_cards
