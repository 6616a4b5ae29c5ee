# make help lists the targets. Each target sets up .venv in the checkout on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The torch build to install; override for another CUDA or a CPU wheel index.
TORCH_PIP ?= torch==2.14.1 torchvision==0.29.1
DEMO_DIR ?= demo_out
NPROC ?= 2

.PHONY: help setup demo test bench lint clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-10s %s\n", $$1, $$2}'

$(VENV)/.installed: setup.cfg
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIP)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.installed ## create .venv and install vsr_ddp with its test tools

demo: $(VENV)/.installed ## make a sample clip with audio and upscale it with $(NPROC) ranks on CPU
	$(PY) -m vsr_ddp.demo --dir $(DEMO_DIR) --nproc $(NPROC)

test: $(VENV)/.installed ## the whole test suite (CPU, gloo)
	$(PY) -m pytest -q

.PHONY: test-slurm
test-slurm: $(VENV)/.installed ## opt-in, root: one-node Slurm from Debian runs launch/*.sbatch on CPU (~10 min)
	$(PY) -m pip install --quiet -e '.[slurm]'
	PYTHON=$(PY) bash tests/slurm/run_slurm_test.sh

bench: $(VENV)/.installed ## benchmarks (not tests): frames/s and stage shares
	$(PY) -m vsr_ddp.bench

.PHONY: train-default
train-default: $(VENV)/.installed ## retrain the shipped x2 model (CPU, under 30 min)
	$(PY) -m vsr_ddp.train_default --out vsr_ddp/weights/compact_x2.safetensors

clean: ## remove demo output and caches (keeps .venv)
	rm -rf $(DEMO_DIR) .pytest_cache
