# Two commands on a fresh machine: `make repro` (set up .venv, run the whole pipeline) and `make test`.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup lock repro exp test test-fast lint format docs review dag serve image

# The venv is (re)installed only when the lock (requirements.txt) or pyproject.toml changed. The lock
# pins every package with its hashes (`make lock` writes it from requirements.in); pip refuses any
# file whose hash is not in it and any package the lock does not pin. The project itself has no
# dependencies of its own to resolve: it goes in with --no-deps.
# pip byte-compiles the installed modules one file after another; compileall -j 0 does the same on
# every core afterwards. The modules must be compiled at install time: where PYTHONDONTWRITEBYTECODE
# is set (as on this project's machine), an import never writes __pycache__ and every stage would compile torch
# again. compileall's exit status is not checked: some packages ship templates that are not valid
# Python, which pip's own compile step skips too.
$(STAMP): requirements.txt pyproject.toml
	@test -x $(BIN)/python || python3 -m venv $(VENV)
	@echo "installing the locked requirements into $(VENV) (log: $(VENV)/pip.log)"
	@{ $(BIN)/python -m pip install --no-compile --require-hashes -r requirements.txt \
		&& $(BIN)/python -m pip install --no-compile --no-deps -e . \
		&& $(BIN)/python -m pip check; } > $(VENV)/pip.log 2>&1 \
		|| { grep -v "is ignored" $(VENV)/pip.log | tail -40; exit 1; }
	@$(BIN)/python -m compileall -q -j 0 $(VENV)/lib > $(VENV)/compileall.log 2>&1 || true
	@touch $(STAMP)

setup: $(STAMP)

# Compile the lock from requirements.in for CPython 3.11 on Linux x86_64 (glibc 2.28 or later), the
# platform of this project's machines and CI, whatever machine runs it. Existing pins are kept unless
# LOCK_FLAGS says otherwise, e.g. LOCK_FLAGS="--upgrade-package fastapi" or LOCK_FLAGS=--upgrade.
# uv runs from a venv of its own, so the project's .venv holds exactly the lock. Extras stay in the
# lock (--no-strip-extras): pip's hash mode refuses a dependency's extra (blosc2 needs
# httpx[http2]) that the lock pins only without it. docs/getting-started.md
# The container image's lock (deploy/requirements.txt, no torch) is compiled from
# deploy/requirements.in with the main lock as constraints: both pin the same versions.
LOCK_VENV := .venv-lock
UV_VERSION := 0.13.9
lock:
	@test -x $(LOCK_VENV)/bin/uv || { python3 -m venv $(LOCK_VENV) \
		&& $(LOCK_VENV)/bin/python -m pip install -q uv==$(UV_VERSION); }
	$(LOCK_VENV)/bin/uv pip compile requirements.in -o requirements.txt --generate-hashes \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 --no-strip-extras \
		--custom-compile-command "make lock" $(LOCK_FLAGS) > /dev/null
	$(LOCK_VENV)/bin/uv pip compile deploy/requirements.in -c requirements.txt \
		-o deploy/requirements.txt --generate-hashes \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 \
		--custom-compile-command "make lock" $(LOCK_FLAGS) > /dev/null

# dvc repro copies a directory output into the cache; --relink then makes the workspace copy a link
# to it (.dvc/config cache.type), so each dataset is stored once.
repro: setup
	dvc repro
	dvc checkout --relink --quiet

# An experiment with a params profile, e.g. `make exp PROFILE=profiles/real-size.yaml`: one
# `dvc exp run --set-param` per key of the profile, checked first (docs/real-size.md). set -f: the
# list values are not file patterns.
exp: setup
	@test -n "$(PROFILE)" || { echo "usage: make exp PROFILE=profiles/NAME.yaml"; exit 2; }
	@set -f; args=$$($(BIN)/python scripts/profile.py $(PROFILE)) && dvc exp run $$args

test: setup
	python -m pytest

test-fast: setup
	python -m pytest -m "not slow"

# The DICOM node next to the PACS (serve.yaml; API tokens: python -m ctpipe.serve.tokens): docs/serving.md
serve: setup
	python -m ctpipe.serve --config serve.yaml

# The container image of the node (deploy/Containerfile) with models/export baked in; the Debian
# base image is made first when podman has none. Needs podman, runc and debootstrap, not the .venv
# (the script uses the standard library only): docs/serving.md.
IMAGE ?= localhost/ctpipe:latest
image:
	python3 scripts/build_image.py --package models/export --tag $(IMAGE)

# What CI checks before the tests: ruff's lint rules and formatting (pyproject.toml [tool.ruff]).
LINTED := ctpipe stages scripts benchmarks tests
lint: setup
	ruff check $(LINTED)
	ruff format --check $(LINTED)

# Rewrite the files as `make lint` wants them (formatting and the safe fixes).
format: setup
	ruff format $(LINTED)
	ruff check --fix $(LINTED)

# The generated parts of the documentation: docs/params.md from the comments of params.yaml, and the
# figures of README.md and docs/ from metrics/*.json (blocks between <!-- render:NAME --> markers).
# Tests fail when either is stale: tests/test_params_declared.py, tests/test_render_docs.py.
docs: setup
	python scripts/params_table.py > docs/params.md.tmp && mv docs/params.md.tmp docs/params.md
	python scripts/render_docs.py

# What a reviewer pastes into a pull request: params and metrics diff against BASE (default main)
# in Markdown, and the plots diff rendered to HTML (review_plots/index.html).
BASE ?= main
review: setup
	@echo "### Params changed against $(BASE)"; dvc params diff $(BASE) --md
	@echo; echo "### Metrics against $(BASE)"; dvc metrics diff $(BASE) --md --precision 4
	@dvc plots diff $(BASE) -o review_plots > /dev/null && echo && echo "plots: review_plots/index.html"

dag: setup
	dvc dag --md
