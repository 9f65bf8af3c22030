# One entry point for humans and CI. `make test` works on a fresh machine: it creates
# .venv, installs the project with its dev tools, then lints, type-checks and tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: install serve test lint typecheck unit bench

$(BIN)/bit: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch is pinned to the release whose CPU build is on the project's machines.
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(BIN)/bit

install: $(BIN)/bit

# The service on the embedded default: SQLite, local artifacts, a broker that needs no
# server; API and worker in one command. State lives in $BIT_HOME (./.bit).
serve: install
	$(BIN)/bit serve

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

unit: install
	$(BIN)/pytest

test: lint typecheck unit

bench: install
	$(BIN)/python benchmarks/engine_speed.py --out BENCHMARKS.md
