# Tributary: `make serve` serves model_repository/, `make test` runs the test suite.
# Both create .venv and install everything they need on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002

.PHONY: install lock serve test unit lint format protos check-protos flags-doc models bench clean

install: $(STAMP)

# Installs exactly the versions in constraints.txt (`make lock` writes it), so a fresh clone
# gets what CI tested rather than whatever the index serves today.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 needed"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

# Resolve pyproject.toml's ranges afresh in a scratch venv and pin the result (server, dev and
# GPU extras) into constraints.txt. Run it on purpose, then `make test`, then commit both.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q --upgrade pip
	.lock-venv/bin/python -m pip install -q -e ".[dev,gpu]"
	( echo "# Written by 'make lock' from pyproject.toml; used by make install and the Dockerfile."; \
	  .lock-venv/bin/python -m pip freeze --all --exclude-editable | LC_ALL=C sort ) > constraints.txt
	rm -rf .lock-venv

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

# Rewrite the flags table in docs/flags.md from server/tributary/flags.py (tests check it).
flags-doc: install
	$(BIN)/python scripts/flags_doc.py

# Rebuild the example models in model_repository/ (deterministic; committed).
models: install
	$(BIN)/python scripts/build_models.py --out model_repository

# Benchmarks need perf_analyzer on PATH (pip install perf-analyzer; see benchmarks/README.md).
bench: install
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
