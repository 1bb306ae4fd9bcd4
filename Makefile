# Every target sets itself up: a fresh machine needs only python3 (3.10+) and make.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch to install first. torch==2.13.0 is the CPU build where pip is set up with a local CPU wheel (as on the
# project's CI machines); from plain PyPI on Linux the same pin is a CUDA build. On a GPU machine: make TORCH=torch.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast quality format clean bench bench-gpu gpu-wheels

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/qlora-dist demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Throughput against the reference Trainer recipe (about 10 minutes on 2 CPU cores); writes BENCHMARKS.md.
bench: $(STAMP)
	$(BIN)/python -m benchmarks.throughput

# The GPU check (python -m benchmarks.gpu): an 8B-shaped model on one GPU, about 5 minutes on an H200.
# It runs with the GPU machine's own python and packages (no venv, no network there): wheels it lacks
# (`make gpu-wheels`, run where pip works) are installed from .whl/ into a temporary folder first.
GPU_PYTHON ?= python3
GPU_SITE   ?= /tmp/qlora-dist-site
GPU_OUT    ?= outputs/bench-gpu
bench-gpu:
	@if ls .whl/*.whl >/dev/null 2>&1; then \
		$(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
			--target $(GPU_SITE) .whl/*.whl; fi
	mkdir -p $(GPU_OUT)
	PYTHONPATH=$(CURDIR):$(GPU_SITE)$${PYTHONPATH:+:$$PYTHONPATH} PYTHONUNBUFFERED=1 $(GPU_PYTHON) \
		-m benchmarks.gpu --markdown $(GPU_OUT)/BENCH_GPU.md --json $(GPU_OUT)/bench_gpu.json $(BENCH_GPU_ARGS)
	# FSDP2 on every GPU of the machine (written, not yet run on a GPU).
	PYTHONPATH=$(CURDIR):$(GPU_SITE)$${PYTHONPATH:+:$$PYTHONPATH} PYTHONUNBUFFERED=1 $(GPU_PYTHON) \
		benchmarks/fsdp2_gpu_check.py --json $(GPU_OUT)/fsdp2_gpu_check.json

# What the GPU machines lack, as wheels for their Python 3.12 / x86-64 (the versions this project is tested with).
GPU_WHEELS ?= bitsandbytes==0.50.2 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 --platform any -d .whl $(GPU_WHEELS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

quality: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
