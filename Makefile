# mmpipe: `make run` sets up and runs the nightly flow once; `make test` sets up and runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mmpipe-installed
# Project-local state for Prefect and the model hubs (offline); MLflow lives in .mmpipe/ too.
export PREFECT_HOME := $(CURDIR)/.mmpipe/prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup run test test-fast lint bench ui schedule results docs clean

setup: $(STAMP)

# Re-install only when the dependency pins change. torch==2.13.0 is the CPU wheel here; for CUDA
# see docs/gpu.md.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev,bench]'
	@test -d .git || git init -q
	@test -d .dvc || dvc init -q
	$(PY) deploy/offline_plots.py  # dvc plots show without a CDN (.dvc/plots-offline.html)
	touch $@

run: setup
	$(PY) -m flows.nightly

test: setup
	$(PY) -m pytest -q

# the unit tests only (no integration, faults or slow ones): the quick check before a commit
test-fast: setup
	$(PY) -m pytest -q tests/unit -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) -m benchmarks

# `make ui PORT=5001 ARGS="--set tracking.experiment=other"`; `make schedule PORT=4201 ARGS="--cron '0 3 * * *'"`
# Each recipe is one command, so the shell execs it and make's SIGTERM/SIGHUP reach mmpipe,
# which stops its server (the MLflow UI, the Prefect server) before exiting.
ui: setup
	$(PY) -m mmpipe ui --port $(or $(PORT),5000) $(ARGS)

schedule: setup
	$(PY) -m mmpipe schedule --port $(or $(PORT),4200) $(ARGS)

# README's results section from the last run's reports (reports/run.json, metrics.json, plots/)
results: setup
	$(PY) -m mmpipe.results --readme README.md

# docs/params.md, every param, from the pydantic models in mmpipe/config.py (a unit test fails
# when the committed page is stale). PHONY: docs/ is also a directory.
docs: setup
	$(PY) -m mmpipe.paramsdoc --output docs/params.md

clean:
	rm -rf data models reports .mmpipe
