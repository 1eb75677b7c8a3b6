# `make demo` and `make test` do all the set-up on a fresh machine: a virtual environment in .venv with the
# package and its dev extras installed through constraints.txt (torch 2.13.0 CPU wheel, torchvision 0.28.0).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= runs/demo
PYTEST_ARGS ?=

.PHONY: demo test test-fast lint bench clean install

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/evidrift demo --out $(DEMO_OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python benchmarks/phantoms.py
	$(BIN)/python benchmarks/metrics.py
	$(BIN)/python benchmarks/cam_engine.py
	$(BIN)/python benchmarks/training.py
	$(BIN)/python benchmarks/transforms.py

clean:
	rm -rf $(VENV) runs .pytest_cache
