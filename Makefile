# Every target sets itself up: a fresh machine needs only python3 (3.10+) and make.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch to install first. torch==2.13.0 is the CPU build where pip is set up with a local CPU wheel (as on the
# project's CI machines); from plain PyPI on Linux the same pin is a CUDA build. On a GPU machine: make TORCH=torch.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast quality format clean bench

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
	$(BIN)/python -m qlora_dist.bench

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
