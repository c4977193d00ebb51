# s2d: a newcomer needs two commands, `make demo` and `make test`; each sets up what it needs.
# Every target is idempotent: the venv is rebuilt only when pyproject.toml changes.

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.s2d-installed
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
FASHION_MNIST := /usr/share/datasets/fashion-mnist

# torch uses one thread per core by default; keep OpenMP/MKL in line with it (override: make demo OMP_NUM_THREADS=1).
NPROC := $(shell nproc 2>/dev/null || echo 2)
export OMP_NUM_THREADS ?= $(NPROC)
export MKL_NUM_THREADS ?= $(OMP_NUM_THREADS)

.PHONY: help venv data test test-all demo lint clean

help:
	@echo "make demo      set up, then convert the zoo's resnet20 (Fashion-MNIST, small budget, 6-12 min; 6.1 on an idle machine)"
	@echo "make test      set up, then run the test suite (without the slow tests)"
	@echo "make test-all  the test suite including slow tests"
	@echo "make venv      create $(VENV) and install s2d (editable) with its dev tools"
	@echo "make data      install the Fashion-MNIST Debian package (as root) or say how to get it"
	@echo "make lint      ruff check s2d envs tests"
	@echo "make clean     remove $(VENV) and caches (keeps runs/ and model_zoo/)"

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(BIN)/python -m pip --version >/dev/null 2>&1 || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install $(TORCH_PINS)
	$(BIN)/python -m pip install -e '.[dev,search,timm,distributed]'
	@touch $@

data:
	@if [ -d "$(FASHION_MNIST)" ] || [ -n "$${S2D_DATA:-}" ]; then \
		exit 0; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update && apt-get install -y dataset-fashion-mnist; \
	else \
		echo "Fashion-MNIST is not installed. Either run (as root):" >&2; \
		echo "    apt-get update && apt-get install -y dataset-fashion-mnist" >&2; \
		echo "or put the four IDX files (train-images-idx3-ubyte[.gz], ...) in a folder and" >&2; \
		echo "    export S2D_DATA=/that/folder" >&2; \
		exit 1; \
	fi

# Two test files at a time: each test runs single-threaded (tests/conftest.py), and a file's module fixtures
# (one tiny conversion serves a whole file) stay in one worker with --dist loadfile.
TEST_WORKERS ?= 2

test: venv data
	$(BIN)/python -m pytest -m "not slow" -q -n $(TEST_WORKERS) --dist loadfile

test-all: venv data
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

demo: venv data
	$(BIN)/s2d zoo
	@echo
	$(BIN)/s2d convert --model resnet20 --dataset fashion-mnist --budget small --run-dir runs/demo

lint: venv
	$(BIN)/ruff check s2d envs tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info build dist
	find s2d envs tests -name __pycache__ -type d -prune -exec rm -rf {} +
