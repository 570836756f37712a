# Raven training backbone. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
INSTALLED := $(VENV)/.installed
# Set to https://download.pytorch.org/whl/cpu to fetch the CPU build of torch
# where no local wheel is configured (PyPI's default build is CUDA, several GB).
TORCH_INDEX ?=
TORCH_ARGS := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))

PROTO_SRC := $(wildcard protos/raven/training/v1/*.proto)
PROTO_OUT := shared/proto/raven/training/v1
PROTO_STAMP := $(PROTO_OUT)/.generated
# Where shared/proto/generate.py also writes: the client package's stubs.
CLIENT_PROTO_OUT := client/raven_client/_proto
CLIENT_PROTO_STAMP := $(CLIENT_PROTO_OUT)/raven/training/v1/.generated
PROTO_STAMPS := $(PROTO_STAMP) $(CLIENT_PROTO_STAMP)

CLIENT_DIST := client/dist

.PHONY: help setup proto client-wheel run up down status test test-unit test-integration test-e2e lint fmt typecheck bench bench-smoke clean certs

help: ## List the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-18s\033[0m %s\n", $$1, $$2}'

setup: $(INSTALLED) $(PROTO_STAMPS) ## Create .venv, install dependencies (mmcv builds once, then comes from pip's cache), generate code

$(INSTALLED): pyproject.toml client/pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip 'setuptools>=77,<81' wheel
	$(PIP) install -q $(TORCH_ARGS) torch==2.13.0
	@# mmcv 2.1.0 has no wheel for this platform: build it against the installed torch.
	@$(PY) -c 'import mmcv.ops' 2>/dev/null || \
	  MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS=$${MAX_JOBS:-2} $(PIP) install --no-build-isolation mmcv==2.1.0
	@# The Python client (client/, import raven_client) too, editable, for the tests.
	$(PIP) install -q $(TORCH_ARGS) -e '.[worker,dev]' -e ./client
	@touch $@

proto: $(PROTO_STAMPS) ## Generate the Python gRPC code (services and client) and reflection's descriptor set from protos/

$(PROTO_STAMP): $(PROTO_SRC) shared/proto/generate.py $(INSTALLED)
	$(PY) -m shared.proto.generate
	@touch $@ $(CLIENT_PROTO_STAMP)

# Only the client's stubs are gone: generate everything again.
$(CLIENT_PROTO_STAMP): $(PROTO_STAMP)
	$(PY) -m shared.proto.generate
	@touch $(PROTO_STAMP) $@

client-wheel: setup ## A wheel of the Python client (client/, import raven_client) in client/dist
	rm -rf client/build
	$(PIP) wheel -q --no-deps --no-build-isolation -w $(CLIENT_DIST) ./client

run: setup ## The demo: start the stack, train a root model, fine-tune it, watch it live
	$(PY) -m cli.main demo

up: setup ## Start infrastructure, both services and a worker in the background (logs in .data/logs)
	$(PY) -m cli.main stack up

down: ## Stop what `make up` started
	@test -x $(PY) && $(PY) -m cli.main stack down || true

status: ## Show what `make up` started
	$(PY) -m cli.main stack status

test: setup ## Run the whole test suite (unit, integration, end to end)
	$(PY) -m pytest -q

test-unit: setup ## Unit tests only (no infrastructure)
	$(PY) -m pytest -q tests/unit

test-integration: setup ## Integration tests (Postgres, NATS, gRPC)
	$(PY) -m pytest -q tests/integration

test-e2e: setup ## End-to-end tests with real MMDetection training on CPU
	$(PY) -m pytest -q tests/e2e

lint: setup ## ruff lint and format check
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

fmt: setup ## Format the code
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

typecheck: setup ## mypy
	$(VENV)/bin/mypy shared services cli trainer_worker client/raven_client benchmarks

clean: down ## Remove generated code and local data (keeps .venv)
	rm -rf .data $(PROTO_OUT) shared/proto/raven $(CLIENT_PROTO_OUT) $(CLIENT_DIST) client/build

bench: setup ## Benchmarks against the real stack (minutes); JSON in .data/bench, report in docs/benchmarks.md
	$(PY) -m benchmarks

bench-smoke: setup ## The benchmark harness in seconds, to keep it working (no figure is meaningful)
	$(PY) -m benchmarks --smoke

certs: setup ## Create the development CA, server and CLI certificates (SPIFFE ids) and policy in ~/.config/raven/certs
	$(PY) -m cli.main certs
