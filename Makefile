# rtcnn — every target creates the virtual environment first if it is missing.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV   ?= .venv
PY     := $(VENV)/bin/python
# CPU machines get the local CPU wheel in seconds; on a GPU machine PyPI's
# torch==2.13.0 is a CUDA build. Override with `make TORCH_SPEC='torch==2.x' ...`.
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: help env demo test test-full test-gpu train bench format clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

env: $(STAMP)  ## create .venv and install rtcnn (editable) with test extras

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,sweep,roman]"  # test: romanisim for tests/test_asdf.py
	@touch $(STAMP)

demo: env  ## simulate the default data (if absent), train attn5 briefly on CPU, evaluate
	$(PY) -m rtcnn.demo

test: env  ## run the fast test suite on CPU
	@.ci/browser-deps $(PY)  # chromium + chromedriver + selenium for tests/test_vet.py, when missing
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-full: env  ## run every test, slow ones included
	$(PY) -m pytest -q -m "not gpu" $(PYTEST_ARGS)

test-gpu: env  ## run the GPU tests (trainer=gpu, CUDA vs CPU outputs; skipped without CUDA)
	$(PY) -m pytest -q -m gpu $(PYTEST_ARGS)

train: env  ## train with the default config (pass ARGS="model=attn5 trainer=gpu ...")
	$(PY) -m rtcnn.train $(ARGS)

bench: env  ## print data / train / inference throughput on this machine
	$(PY) -m rtcnn.bench all

format: env  ## format the code with ruff
	$(PY) -m pip install -q ruff && $(PY) -m ruff format rtcnn tests && $(PY) -m ruff check --fix rtcnn tests

clean:  ## remove caches and generated outputs (keeps .venv and outputs/data)
	rm -rf .pytest_cache lightning_logs multirun
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
	find outputs -mindepth 1 -maxdepth 1 ! -name .gitkeep ! -name data -exec rm -rf {} +
