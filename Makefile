# The two commands a newcomer runs: `make quickstart` (the whole pipeline on the embedded default)
# and `make test` (the test suite). Both install the package first: `quickstart` the package alone (all it
# needs), `test` with the dev extra, which holds everything the suite runs. Run them inside a virtual
# environment (see the README's first lines).
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install install-dev quickstart test lint bench

install:
	$(PIP) install -q -e .

install-dev:
	$(PIP) install -q -e ".[dev]"

quickstart: install
	$(PYTHON) -m salm.cli quickstart

test: install-dev
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m pytest -q --durations=10

bench: install-dev
	$(PYTHON) benchmarks/bench_generation.py
	$(PYTHON) benchmarks/bench_training.py
	$(PYTHON) benchmarks/bench_memory.py
	$(PYTHON) benchmarks/quickstart_ablations.py
