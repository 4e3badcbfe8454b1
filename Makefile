# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
DEMO_DIR ?= results
FMNIST_PKG := dataset-fashion-mnist

XLA_PY := .venv-xla/bin/python
XLA_STAMP := .venv-xla/.installed

.PHONY: install data tools lint format test test-fast test-xla demo bench clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): requirements.txt requirements-dev.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1 || $(PY) -m pip install -q torch torchvision
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	@touch $(STAMP)

install: $(STAMP) data  ## create .venv and install everything (Python packages, Fashion-MNIST)

tools:  ## Debian's shellcheck (the tests lint the shell scripts with it)
	@command -v shellcheck >/dev/null 2>&1 || \
		(command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
		 (apt-get install -y -qq shellcheck >/dev/null 2>&1 || \
		  (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq shellcheck >/dev/null 2>&1))) || \
		echo "shellcheck: not installed and apt is not usable; the shell-script lint test will fail"

data:  ## install Debian's Fashion-MNIST package when apt is usable
	@if dpkg -s $(FMNIST_PKG) >/dev/null 2>&1; then \
		echo "Fashion-MNIST: Debian package $(FMNIST_PKG) present"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "Fashion-MNIST: installing Debian package $(FMNIST_PKG)"; \
		(apt-get install -y -qq $(FMNIST_PKG) >/dev/null 2>&1 || \
		 (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq $(FMNIST_PKG) >/dev/null 2>&1)) || \
		echo "Fashion-MNIST: apt-get install $(FMNIST_PKG) failed; place the IDX files in Data/FashionMNIST/raw/ (see Data/README.md)"; \
	else \
		echo "Fashion-MNIST: apt is not usable here; place the IDX files in Data/FashionMNIST/raw/ (see Data/README.md)"; \
	fi

lint: $(STAMP)  ## black --check and ruff
	$(PY) -m black --check --quiet .
	$(PY) -m ruff check .

format: $(STAMP)  ## reformat with black and fix what ruff can
	$(PY) -m black --quiet .
	$(PY) -m ruff check --fix .

test: install tools lint  ## install, lint, run the whole test suite (slow tests included)
	$(PY) -m pytest -n 2 -q $(PYTEST_ARGS)

test-fast: install tools  ## the suite without tests marked slow
	$(PY) -m pytest -n 2 -q -m "not slow" $(PYTEST_ARGS)

$(XLA_STAMP): requirements.txt requirements-tpu.txt
	@test -x $(XLA_PY) || $(PYTHON) -m venv .venv-xla
	$(XLA_PY) -m pip install -q --upgrade pip
	$(XLA_PY) -m pip install -q -r requirements-tpu.txt pytest
	@touch $(XLA_STAMP)

test-xla: $(XLA_STAMP) data  ## torch-xla tests on XLA's CPU device (own venv with torch 2.9, ~7 GB)
	PJRT_DEVICE=CPU OMP_NUM_THREADS=1 $(XLA_PY) -m pytest -q tests_xla

demo: install  ## train the demo model on Fashion-MNIST, extract, cache, plot
	$(PY) scripts/demo.py --save-dir $(DEMO_DIR)

bench: install  ## print the benchmark table (ratios measured side by side)
	$(PY) scripts/bench.py

clean:  ## remove caches (keeps .venv and results)
	rm -rf .pytest_cache .ruff_cache $$(find . -name __pycache__ -not -path './.venv/*')
