# Tributary: `make serve` serves model_repository/, `make test` runs the test suite.
# Both create .venv and install everything they need on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002

.PHONY: install serve test unit lint format protos check-protos models bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 needed"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

serve: install
	$(BIN)/tributary --model-repository model_repository --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)

test: install check-protos lint
	$(BIN)/python -m pytest -q

unit: install
	$(BIN)/python -m pytest -q tests/unit

lint: install
	$(BIN)/ruff check server clients tests scripts benchmarks
	$(BIN)/ruff format --check server clients tests scripts benchmarks

format: install
	$(BIN)/ruff check --fix server clients tests scripts benchmarks
	$(BIN)/ruff format server clients tests scripts benchmarks

# Regenerate the gRPC/protobuf stubs into clients/tributary_client/_proto (committed).
protos: install
	$(BIN)/python scripts/gen_protos.py

# CI fails when the committed stubs do not match protos/.
check-protos: install
	$(BIN)/python scripts/gen_protos.py --check

# Rebuild the example models in model_repository/ (deterministic; committed).
models: install
	$(BIN)/python scripts/build_models.py --out model_repository

# Benchmarks need perf_analyzer on PATH (pip install perf-analyzer; see benchmarks/README.md).
bench: install
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
