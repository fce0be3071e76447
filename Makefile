# The two commands a newcomer runs: `make quickstart` (the whole pipeline on the embedded default)
# and `make test` (the test suite). Both install the package first.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install quickstart test lint bench

install:
	$(PIP) install -q -e ".[dev]"

quickstart: install
	salm quickstart

test: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m pytest -q

bench: install
	$(PYTHON) benchmarks/bench_generation.py
	$(PYTHON) benchmarks/bench_training.py
	$(PYTHON) benchmarks/bench_memory.py
	$(PYTHON) benchmarks/quickstart_ablations.py
