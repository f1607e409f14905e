# Two commands on a fresh machine: `make repro` (set up .venv, run the whole pipeline) and `make test`.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup repro test test-fast lint format review dag serve

# The venv is (re)installed only when requirements.txt or pyproject.toml changed.
# pip byte-compiles the installed modules one file after another; compileall -j 0 does the same on
# every core afterwards. The modules must be compiled at install time: where PYTHONDONTWRITEBYTECODE
# is set (as on this project's machine), an import never writes __pycache__ and every stage would compile torch
# again. compileall's exit status is not checked: some packages ship templates that are not valid
# Python, which pip's own compile step skips too.
$(STAMP): requirements.txt pyproject.toml
	@test -x $(BIN)/python || python3 -m venv $(VENV)
	@echo "installing pinned requirements into $(VENV) (log: $(VENV)/pip.log)"
	@$(BIN)/python -m pip install --no-compile -r requirements.txt > $(VENV)/pip.log 2>&1 \
		|| { grep -v "is ignored" $(VENV)/pip.log | tail -40; exit 1; }
	@$(BIN)/python -m compileall -q -j 0 $(VENV)/lib > $(VENV)/compileall.log 2>&1 || true
	@touch $(STAMP)

setup: $(STAMP)

repro: setup
	dvc repro

test: setup
	python -m pytest

test-fast: setup
	python -m pytest -m "not slow"

# The DICOM node next to the PACS (serve.yaml; the token from $$CTPIPE_SERVE_TOKEN): docs/serving.md
serve: setup
	python -m ctpipe.serve --config serve.yaml

# What CI checks before the tests: ruff's lint rules and formatting (pyproject.toml [tool.ruff]).
LINTED := ctpipe stages scripts benchmarks tests
lint: setup
	ruff check $(LINTED)
	ruff format --check $(LINTED)

# Rewrite the files as `make lint` wants them (formatting and the safe fixes).
format: setup
	ruff format $(LINTED)
	ruff check --fix $(LINTED)

# What a reviewer pastes into a pull request: params and metrics diff against BASE (default main)
# in Markdown, and the plots diff rendered to HTML (review_plots/index.html).
BASE ?= main
review: setup
	@echo "### Params changed against $(BASE)"; dvc params diff $(BASE) --md
	@echo; echo "### Metrics against $(BASE)"; dvc metrics diff $(BASE) --md --precision 4
	@dvc plots diff $(BASE) -o review_plots > /dev/null && echo && echo "plots: review_plots/index.html"

dag: setup
	dvc dag --md
