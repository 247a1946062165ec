# flair-fl developer commands. `make help` lists them.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export FLWR_TELEMETRY_ENABLED := 0

.DEFAULT_GOAL := help
.PHONY: help setup lock run test test-slow test-full lint format typecheck explore clean gpu-bundle

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-12s %s\n", $$1, $$2}'

# The venv is installed from requirements.lock (every package pinned, CI and fresh machines
# alike) by uv; uv itself is bootstrapped with pip at the version the lock pins (flwr needs it).
UV := $(VENV)/bin/uv
UV_VERSION := $(shell sed -n 's/^uv==\([^ ;]*\).*/\1/p' requirements.lock)

$(STAMP): requirements.lock pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "$(PYTHON) not found; set PYTHON=/path/to/python3.11"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	test -x $(UV) || $(PY) -m pip install --quiet --disable-pip-version-check 'uv==$(UV_VERSION)'
	$(UV) pip sync --quiet --python $(PY) requirements.lock
	$(UV) pip install --quiet --python $(PY) --no-deps -e .
	touch $(STAMP)

setup: $(STAMP) ## Create .venv from requirements.lock (flair-fl editable, dev tools); idempotent

lock: ## Re-resolve requirements.lock from pyproject.toml (after changing dependencies)
	test -x $(UV) || $(MAKE) setup
	$(UV) pip compile --quiet pyproject.toml --extra dev --extra hf --universal \
		--python-version 3.11 $(ARGS) -o requirements.lock
	@echo "requirements.lock updated; 'make setup' installs it"

run: setup ## Run the main job on the embedded synthetic default (python -m flair_fl.run)
	$(PY) -m flair_fl.run $(ARGS)

test: setup ## Run the fast test suite
	$(PY) -m pytest -q $(ARGS)

test-slow: setup ## Run only the slow tests (CI runs them after the fast suite)
	$(PY) -m pytest -q -m slow $(ARGS)

test-full: setup ## Run every test, slow ones included
	$(PY) -m pytest -q -m "" $(ARGS)

lint: setup ## ruff lint + format check, mypy
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

format: setup ## Apply ruff formatting and safe fixes
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

explore: setup ## Dataset report: make explore DATA=path/to/raw-dir-or.hdf5
	$(PY) -m flair_fl.explore $(DATA) $(ARGS)

gpu-bundle: setup ## Wheels for a GPU machine without a package index (.gpu_bundle/py3.12)
	$(PY) scripts/gpu_bundle.py $(ARGS)

clean: ## Remove caches (keeps .venv, data and outputs)
	rm -rf .pytest_cache .mypy_cache .ruff_cache
