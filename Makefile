# Tributary: `make serve` serves model_repository/, `make test` runs the test suite.
# Both create .venv and install everything they need on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
GRPC_PORT ?= 8001
HTTP_PORT ?= 8000
METRICS_PORT ?= 8002
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)

.PHONY: install lock serve test unit lint typecheck format protos check-protos flags-doc models \
        bench bench-quick clean image image-cpu check-deploy

install: $(STAMP)

# Installs exactly the versions in constraints.txt (`make lock` writes it), so a fresh clone
# gets what CI tested rather than whatever the index serves today.
# The SDK (clients/, distribution tributary-client) goes first: the server requires it and it
# is on no index.
$(STAMP): pyproject.toml clients/pyproject.toml constraints.txt
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 needed"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt pip
	# An older install of the server owned the tributary-health script; remove it first, or
	# its uninstall during the server's reinstall deletes the script the SDK just installed.
	$(BIN)/python -m pip uninstall -q -y tributary 2>/dev/null || true
	$(BIN)/python -m pip install -q -c constraints.txt -e ./clients
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

# Resolve pyproject.toml's ranges afresh in a scratch venv and pin the result (server, dev and
# GPU extras) into constraints.txt. Run it on purpose, then `make test`, then commit both.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q --upgrade pip
	.lock-venv/bin/python -m pip install -q -e ./clients
	.lock-venv/bin/python -m pip install -q -e ".[dev,gpu]"
	( echo "# Written by 'make lock' from pyproject.toml; used by make install and the Dockerfile."; \
	  .lock-venv/bin/python -m pip freeze --all --exclude-editable | LC_ALL=C sort ) > constraints.txt
	rm -rf .lock-venv

serve: install
	$(BIN)/tributary --model-repository model_repository --grpc-port $(GRPC_PORT) --http-port $(HTTP_PORT) \
	  --metrics-port $(METRICS_PORT)

test: install check-protos lint
	$(BIN)/python -m pytest -q

unit: install
	$(BIN)/python -m pytest -q tests/unit

lint: install typecheck
	$(BIN)/ruff check server clients tests scripts benchmarks
	$(BIN)/ruff format --check server clients tests scripts benchmarks

# mypy, configured in pyproject.toml ([tool.mypy]): strict over the server and the SDK (which
# ships py.typed); the generated stubs are excluded.
typecheck: install
	$(BIN)/mypy

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

# Benchmarks need perf_analyzer: $PERF_ANALYZER, or on PATH, or the perf-analyzer wheel pinned
# here, installed into .venv. It is pinned here, not by `make lock`, because its wheels need
# glibc >= 2.38: elsewhere pip finds no such version (docs/benchmarks.md says what to do then).
# `bench` is the full side-by-side run of issue #12 (floor, inline server, Tributary, KServe,
# MLServer, PyTriton; each peer installed into benchmarks/work/peers/ from its exact pins on the
# first run); `bench-quick` is a ~2-minute subset. BENCH_ARGS passes more flags to run.py.
PERF_ANALYZER_VERSION := 2.60.0
BENCH_ARGS ?=
define perf_analyzer_check
	@if [ -z "$$PERF_ANALYZER" ] && ! command -v perf_analyzer >/dev/null \
	    && [ ! -x $(BIN)/perf_analyzer ]; then \
	  $(BIN)/python -m pip install -q -c constraints.txt perf-analyzer==$(PERF_ANALYZER_VERSION); fi
endef

bench: install
	$(perf_analyzer_check)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python benchmarks/run.py $(BENCH_ARGS)

bench-quick: install
	$(perf_analyzer_check)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python benchmarks/run.py --quick $(BENCH_ARGS)

# Container images (docs/deployment.md): GPU (CUDA 13 + cuDNN 9 base) and CPU-only.
image:
	docker build -t tributary:$(VERSION) .

image-cpu:
	docker build --build-arg BASE=ubuntu:24.04 -t tributary:$(VERSION)-cpu .

# Dockerfile and deploy/ checked offline: schemas, CLI args, ports (no Docker, no cluster).
check-deploy: install
	$(BIN)/python -m pytest -q tests/deploy

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache build *.egg-info clients/build
