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
	$(BIN)/pytest tests/deploy tests/server/test_access.py

# docker-compose.yml for real (tests/deploy/test_compose.py): a private Docker
# engine (Debian's docker.io, vfs, no iptables), base images from Debian's
# packages (debootstrap), carpool's image from the Dockerfile, then `docker
# compose up` and `docker stack deploy` on a one-node swarm, under load
# (kill, stop, scale 4 and back to 2, rolling update, killed task). Installs
# docker.io and debootstrap when missing. `make test` runs its short path:
# 2 replicas, one kill, one stop, Prometheus.
.PHONY: compose-test
compose-test: install
	command -v dockerd >/dev/null && command -v debootstrap >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends docker.io debootstrap >/dev/null; }
	CARPOOL_COMPOSE_FULL=1 $(BIN)/pytest tests/deploy/test_compose.py

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

# Flame graphs, not part of `make test`: py-spy records carpool under tiny HTTP
# at 128 connections and under the WebSocket stream with 128 in flight, 20 s
# twice each (about 2 minutes), into bench/results/profiles/<date>-*.svg, .folded
# and .txt. PROFILE_FLAGS='--root /tmp/before --label before' profiles another checkout.
.PHONY: profile
profile: $(BENCH_STAMP)
	$(BIN)/python -m bench.profile $(PROFILE_FLAGS)

# Fuzzing at length, not part of `make test` (which already runs R18's 2,000
# schemathesis examples per infer operation, 3.4 minutes on an idle 2-core
# machine, with 300 raw-socket cases and 100 s of atheris per target): 20,000
# examples per infer operation against /openapi.json (R18's nightly figure)
# and 5,000 mutated requests (about half an hour; `make atheris` for the
# coverage-guided hour).
.PHONY: fuzz
fuzz: install
	CARPOOL_FUZZ_EXAMPLES=20000 CARPOOL_FUZZ_CASES=5000 \
		$(BIN)/pytest -o timeout=3600 tests/server/test_openapi.py tests/scenarios/test_fuzz.py

# Coverage-guided fuzzing at length, not part of `make test` (which gives each
# target 100 s): atheris on the JSON body, binary tensor and WebSocket message
# parsers (tests/fuzz), ATHERIS_SECONDS each; the default 1,200 makes one
# CPU-hour for the three. Each run stops at its first finding (an exception
# other than our BadRequest, an input over 1 s, RSS over 512 MiB), which it
# keeps, with its corpus, in the temp dir it names.
ATHERIS_SECONDS ?= 1200
.PHONY: atheris
atheris: install
	for target in json binary stream; do \
		$(BIN)/python -m tests.fuzz $$target --seconds $(ATHERIS_SECONDS) || exit 1; \
	done

# The soak, not part of `make test` (which runs 3,000 requests and the leak
# control): 100,000 mixed requests against one server, RSS and open fds
# sampled every second and judged over the second half (minutes).
.PHONY: soak
soak: install
	$(BIN)/python -m bench.soak --requests 100000

# Slow clients, not part of `make test` (which runs 75 trickling connections
# against 1 s deadlines): 1,000 connections sending headers and 200 sending
# bodies at 1 byte/s against 10 s deadlines, while open-loop traffic runs at
# 0.5x C; judged on that traffic's failures and p99, each slow connection's
# close time and 408, and the server's fds afterwards (RELIABILITY R20; about
# 2 minutes). SLOW_CLIENTS_FLAGS=--no-pin on a machine others share.
.PHONY: slow-clients
slow-clients: install
	$(BIN)/python -m bench.slowloris $(SLOW_CLIENTS_FLAGS)

# Overload, not part of `make test` (which runs 4 s phases): one server is
# calibrated to its sustainable rate C, then offered 1x, 2x and 10x C and
# 0.5x C (recovery), 120 s each, open loop, with live/ready probed every
# second; judged on goodput, latency, rejections, recovery and RSS
# (RELIABILITY R3-R5; about 10 minutes).
.PHONY: overload
overload: install
	$(BIN)/python -m bench.overload --phase-seconds 120
