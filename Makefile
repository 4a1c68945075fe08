# flatquant workbench: `make run` (main job) and `make test` (whole suite) each set up
# a local virtual environment (.venv) on first use.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
OUT ?= runs/$(shell date +%Y%m%d-%H%M%S)

.PHONY: install run test lint lab clean-venv

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/workbench train --out $(OUT)

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check workbench tests benchmarks

lab: $(STAMP)
	$(BIN)/jupyter lab --notebook-dir=notebooks

clean-venv:
	rm -rf $(VENV)
