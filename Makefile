# KubeLoRA developer entry points. Everything installs into .venv from nothing on Debian 12 / Python 3.11.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: cluster-build venv test test-unit test-integration test-e2e lint generate demo demo-down cluster-up cluster-down bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: the CPU wheel is on local disk; an unpinned torch would pull CUDA.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	hack/install-kube-tools.sh $(BIN)
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy operator/kubelora server_image/kubelora_server
	$(BIN)/kubelora-crdgen --check

generate: $(STAMP)
	$(BIN)/kubelora-crdgen

# The README's test command: every tier (unit, integration with real torch/peft/trl, e2e on a real
# kube-apiserver that is built from source once and cached in ~/.cache/kubelora).
test: lint cluster-build
	$(BIN)/python -m pytest tests/unit tests/integration tests/e2e -q -rfEs --durations=15

test-unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit -q

test-integration: $(STAMP)
	$(BIN)/python -m pytest tests/integration -q

test-e2e: cluster-build
	$(BIN)/python -m pytest tests/e2e -q -rfEs

# kube-apiserver + kube-controller-manager v1.20.2 from Debian's source package: ~7 min once, then cached.
cluster-build: $(STAMP)
	$(BIN)/kubelora-local build

cluster-up: $(STAMP)
	$(BIN)/kubelora-local up

cluster-down: $(STAMP)
	$(BIN)/kubelora-local down

demo: $(STAMP)
	$(BIN)/python -m kubelora_local.demo

demo-down: $(STAMP)
	$(BIN)/python -m kubelora_local.demo --down

bench: $(STAMP)
	$(BIN)/python bench/trainer_throughput.py
	$(BIN)/python bench/adapter_attach.py
	$(BIN)/python bench/cluster_start.py
	$(BIN)/python bench/operator_scale.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
