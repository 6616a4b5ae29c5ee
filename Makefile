# make help lists the targets. Each target sets up .venv in the checkout on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The torch build to install; override for another CUDA or a CPU wheel index.
TORCH_PIP ?= torch==2.14.1 torchvision==0.29.1
DEMO_DIR ?= demo_out
NPROC ?= 2

.PHONY: help setup demo test test-fast bench lint clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-10s %s\n", $$1, $$2}'

$(VENV)/.installed: setup.cfg
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIP)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.installed ## create .venv and install vsr_ddp with its test tools

demo: $(VENV)/.installed ## upscale a sample of natural pictures x2 with Real-ESRGAN (fetched once) on $(NPROC) CPU ranks
	$(PY) -m vsr_ddp.demo --dir $(DEMO_DIR) --nproc $(NPROC)

test: $(VENV)/.installed ## the whole test suite (CPU, gloo; the slowest 20 tests listed at the end)
	$(PY) -m pytest -q

test-fast: $(VENV)/.installed ## the suite without vsr_ddp processes (torchrun, kills) or the package index, under 2 min
	$(PY) -m pytest -q -m "not slow and not network"

lint: $(VENV)/.installed ## flake8 at the project's 110 columns (setup.cfg)
	$(PY) -m flake8 vsr_ddp tests

.PHONY: test-slurm
test-slurm: $(VENV)/.installed ## opt-in, root: one-node Slurm from Debian runs launch/*.sbatch on CPU (~10 min)
	$(PY) -m pip install --quiet -e '.[slurm]'
	PYTHON=$(PY) bash tests/slurm/run_slurm_test.sh

bench: $(VENV)/.installed ## benchmarks (not tests): frames/s and stage shares; then the real Real-ESRGAN models (fetched)
	$(PY) -m vsr_ddp.bench
	$(PY) -m vsr_ddp.bench --jobs scale --dir bench_out/scale
	$(PY) -m vsr_ddp.models fetch realesr-animevideov3 realesrgan-x4plus rife-hdv3
	$(PY) -m vsr_ddp.bench --jobs upscale --model realesr-animevideov3 --size 256x144 --frames 48 --long 2 --dir bench_out/animevideov3
	$(PY) -m vsr_ddp.bench --jobs upscale --model realesrgan-x4plus --size 128x72 --frames 12 --long 2 --dir bench_out/x4plus

MODELS ?= --all
.PHONY: models
models: $(VENV)/.installed ## fetch published models once (MODELS="realesrgan-x4plus rife-hdv3"; default all) into VSR_DDP_MODELS or ~/.cache/vsr_ddp/models
	$(PY) -m vsr_ddp.models fetch $(MODELS)

.PHONY: train-default
train-default: $(VENV)/.installed ## retrain the shipped x2 model (CPU, under 30 min)
	$(PY) -m vsr_ddp.train_default --out vsr_ddp/weights/compact_x2.safetensors

.PHONY: train-temporal
train-temporal: $(VENV)/.installed ## retrain the shipped temporal x2 model, job.model=default-temporal (CPU, under 50 min)
	$(PY) -m vsr_ddp.train_temporal --out vsr_ddp/weights/temporal_x2.safetensors

clean: ## remove demo and bench output and caches (keeps .venv and fetched models)
	rm -rf $(DEMO_DIR) bench_out .pytest_cache
