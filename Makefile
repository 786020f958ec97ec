# The two commands: `make serve` and `make test`. Both install into .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Install exactly this torch before anything else: pip then takes the local CPU
# wheel; any looser spec pulls gigabytes of CUDA packages.
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8000
MODELS ?= weights

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install serve test lint typecheck unit

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

install: $(STAMP)

serve: install
	$(BIN)/carpool serve --host $(HOST) --port $(PORT) --models $(MODELS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

unit: install
	$(BIN)/pytest

test: lint typecheck unit

# The deployment proof alone (part of `make test` too): the deploy files, and
# the compose topology on loopback with Debian's nginx and prometheus.
.PHONY: deploy-test
deploy-test: install
	$(BIN)/pytest tests/test_deploy_files.py tests/test_deploy_local.py tests/test_access.py

# Benchmarks, not part of `make test`: carpool against the offline limit and its
# peers on this machine (see the Performance section of README.md).
# `make bench`: the full run (under 30 minutes); `make bench-quick`: a few short
# points per server (under 5 minutes). The suite installs wrk (Debian) if missing.
BENCH_STAMP := $(VENV)/.bench-installed
.PHONY: bench bench-quick

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev,bench]'
	touch $@

bench: $(BENCH_STAMP)
	$(BIN)/python -m bench

bench-quick: $(BENCH_STAMP)
	$(BIN)/python -m bench --quick

# Fuzzing at length, not part of `make test` (which runs 50 schemathesis
# examples per infer operation and 300 raw-socket cases): 2,000 examples per
# operation against /openapi.json, and 5,000 mutated requests (minutes).
.PHONY: fuzz
fuzz: install
	CARPOOL_FUZZ_EXAMPLES=2000 CARPOOL_FUZZ_CASES=5000 \
		$(BIN)/pytest -o timeout=3600 tests/test_openapi.py tests/test_fuzz.py

# The soak, not part of `make test` (which runs 3,000 requests and the leak
# control): 100,000 mixed requests against one server, RSS and open fds
# sampled every second and judged over the second half (minutes).
.PHONY: soak
soak: install
	$(BIN)/python -m bench.soak --requests 100000
