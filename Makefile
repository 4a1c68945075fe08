# flatquant workbench: `make run` (main job) and `make test` (whole suite) each set up
# a local virtual environment (.venv) on first use.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
OUT ?= runs/$(shell date +%Y%m%d-%H%M%S)

.PHONY: install run test e2e lint lab clean-venv

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e '.[dev,onnx,xcheck]'
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/workbench run --out $(OUT)

# Two workers (pytest-xdist), each file (a notebook, a test module) whole on one worker, in
# collection order; one torch thread per worker (tests/conftest.py). TEST_WORKERS=0 runs
# everything in this process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

lint: $(STAMP)
	$(BIN)/ruff check workbench tests benchmarks

# JupyterLab on localhost only, notebooks/ open, this environment's python3 kernel (the workbench's).
LAB_PORT ?= 8888
lab: $(STAMP)
	$(BIN)/jupyter lab --ServerApp.ip=127.0.0.1 --ServerApp.port=$(LAB_PORT) --ServerApp.root_dir=notebooks \
		--MappingKernelManager.default_kernel_name=python3 $(if $(filter 0,$(shell id -u)),--allow-root)

# The browser tests alone (opt-in locally because they take minutes; CI runs them in `make test`).
e2e: $(STAMP)
	WORKBENCH_E2E=1 $(BIN)/python -m pytest tests/e2e

clean-venv:
	rm -rf $(VENV)
