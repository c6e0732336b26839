# KubeLoRA developer entry points. Everything installs into .venv from nothing on Debian 12 / Python 3.11.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# No CPU build of torch is on local disk here (pip also looks in $$PIP_FIND_LINKS), so the regular
# build (~3 GB with its CUDA libraries; it runs on CPU) is downloaded once into this folder and every
# later venv installs from it offline.
TORCH_WHEELS := $(HOME)/.cache/kubelora/wheels/torch-2.13.0
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: checkov cluster-build venv test test-unit test-integration test-e2e test-reliability lint generate demo demo-down cluster-up cluster-down bench clean prometheus

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	test -f $(TORCH_WHEELS)/.complete || { $(BIN)/pip download --quiet -d $(TORCH_WHEELS) torch==2.13.0 \
	  && touch $(TORCH_WHEELS)/.complete; }
	$(BIN)/pip install --quiet --no-index --find-links $(TORCH_WHEELS) torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	hack/install-kube-tools.sh $(BIN)
	touch $(STAMP)

venv: $(STAMP)

# checkov in a virtualenv of its own: its pins would downgrade boto3 and packaging in .venv.
CHECKOV_STAMP := $(VENV)/tools/checkov/.installed
$(CHECKOV_STAMP):
	$(PY) -m venv $(VENV)/tools/checkov
	$(VENV)/tools/checkov/bin/pip install --quiet checkov==3.3.30
	touch $@

checkov: $(CHECKOV_STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy operator/kubelora server_image/kubelora_server
	$(BIN)/kubelora-crdgen --check

generate: $(STAMP)
	$(BIN)/kubelora-crdgen

# The README's test command: every tier (unit, integration with real torch/peft/trl, e2e on a real
# Kubernetes v1.37 cluster that is built from Go modules once and cached in ~/.cache/kubelora).
test: lint image-deps cluster-build prometheus checkov
	$(BIN)/python -m pytest tests/unit tests/integration tests/e2e tests/reliability -q -rfEs --durations=15

test-unit: $(STAMP) checkov
	$(BIN)/python -m pytest tests/unit -q

test-integration: $(STAMP)
	$(BIN)/python -m pytest tests/integration -q

test-e2e: cluster-build prometheus
	$(BIN)/python -m pytest tests/e2e -q -rfEs

# Faults (operator killed per phase, API server restart, full disk, S3 down) on the same local cluster.
test-reliability: cluster-build
	$(BIN)/python -m pytest tests/reliability -q -rfEs

# What ships is what is tested: each image's Python set (vLLM's, KubeLoRA's venv beside it, the trainer's)
# resolved from PyPI metadata for the image's Python and platform; a conflict fails (kubelora_local.image_deps).
UV_VERSION := 0.13.9
$(BIN)/uv: $(STAMP)
	$(BIN)/pip install --quiet uv==$(UV_VERSION)

image-deps: $(BIN)/uv
	$(BIN)/python -m kubelora_local.image_deps

# The e2e tests scrape the operator with a real Prometheus: Debian's package, installed when missing (as root,
# like the rest of `make test`). Its service is left stopped; the tests start their own on a free port.
prometheus:
	command -v prometheus >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq --no-install-recommends prometheus \
	  && { systemctl disable --now prometheus 2>/dev/null || true; }; }

# etcd, kube-apiserver, -controller-manager, -scheduler v1.37.2, CoreDNS, kstatus and Kueue from Go modules:
# ~15 min once on 2 cores, then cached.
cluster-build: $(STAMP)
	$(BIN)/kubelora-local build --all

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

# Wheels bench/gpu_check.sh installs on the GPU machine, which has no network (Python 3.12, manylinux x86_64,
# ~63 MiB; bench/gpu_requirements.txt says what and why). Downloaded, not committed: carry the folder along.
GPU_WHEELS := bench/gpu_wheels
gpu-wheels: $(STAMP)
	$(BIN)/pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 -d $(GPU_WHEELS) -r bench/gpu_requirements.txt
	du -ch $(GPU_WHEELS)/*.whl | tail -1
