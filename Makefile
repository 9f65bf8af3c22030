# One entry point for humans and CI. `make test` works on a fresh machine: it creates
# .venv, installs the project with its dev tools, then lints, type-checks and tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: install chromium fonts serve test lint typecheck unit bench parity

$(BIN)/bit: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch is pinned to the release whose CPU build is on the project's machines.
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(BIN)/bit

install: $(BIN)/bit chromium fonts

# The dashboard's browser tests launch Debian's chromium (never a downloaded browser).
# Installed once where it is missing and we are root (CI); elsewhere the tests skip.
chromium:
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing chromium for the dashboard's browser tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	fi

# The glyph upstream (demos/transfer/glyphs) draws characters in Debian's fonts, never
# downloaded ones. Installed where any is missing and we are root (CI); elsewhere its tests
# skip and `python -m demos.transfer.glyphs` names what is missing.
FONT_PACKAGES := fonts-noto-core fonts-dejavu-core fonts-dejavu-extra fonts-liberation \
	fonts-freefont-ttf fonts-urw-base35
fonts:
	@if ! dpkg -s $(FONT_PACKAGES) >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing fonts for the glyph upstream"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(FONT_PACKAGES) >/dev/null; \
	fi

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

# Speed, side by side (each script ~5-10 min on 2 CPU cores; each replaces its own section
# of BENCHMARKS.md). The new scripts raise their own priority (nice -5) where permitted.
bench: install
	$(BIN)/python benchmarks/engine_speed.py --out BENCHMARKS.md
	$(BIN)/python benchmarks/data_pipeline.py --out BENCHMARKS.md
	$(BIN)/python benchmarks/decode_speed.py --out BENCHMARKS.md
	$(BIN)/python benchmarks/predict_speed.py --out BENCHMARKS.md
	$(BIN)/python benchmarks/service_speed.py --out BENCHMARKS.md
	$(BIN)/python benchmarks/job_walltime.py --out BENCHMARKS.md
	$(BIN)/python benchmarks/backend_speed.py --out BENCHMARKS.md
	$(BIN)/python benchmarks/many_models.py --out BENCHMARKS.md

# timm's BiT loader is an independent reading of the official .npz files; the parity test
# needs it, and timm needs torchvision, which PyPI only builds against other torch
# releases than the project's pin: so a venv of its own (large: a CUDA build of torch).
PARITY := .venv-parity
parity:
	test -x $(PARITY)/bin/python || $(PYTHON) -m venv $(PARITY)
	$(PARITY)/bin/pip install --quiet torch==2.14.1 torchvision==0.29.1 timm numpy pillow \
		safetensors tqdm pytest pytest-timeout
	PYTHONPATH=. $(PARITY)/bin/python -m pytest -p no:cacheprovider -o addopts= -v \
		tests/bit_core/test_timm_parity.py
