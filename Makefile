# Two commands on a fresh machine: `make demo` and `make check`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: demo check test test-cluster unit lint bench clean chaos

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $(INSTALLED)

## make demo [ARGS="--mails 5000 --size 4096"]: the whole pipeline, end to end, on this machine
demo: $(INSTALLED)
	$(BIN)/python -m mailpipe.services
	$(BIN)/mailpipe demo $(ARGS)

## make check: what CI runs: make test, then make test-cluster (about 25 minutes here, the install included)
check: test test-cluster

## make test: lint, types, then every test (unit, integration, faults) against real services,
## but the ones that start a local cluster (about 23 minutes here)
test: $(INSTALLED)
	scripts/install-tools prometheus docker-compose openssl
	$(BIN)/python -m mailpipe.services
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest -m "not cluster" --durations=15 $(PYTEST_ARGS)

## make test-cluster: the tests on a local three-node RabbitMQ cluster with Redis Sentinel,
## started and stopped by the tests on ports of their own (about 2.5 minutes)
test-cluster: $(INSTALLED)
	$(BIN)/python -m mailpipe.services
	$(BIN)/pytest -m cluster $(PYTEST_ARGS)

## make unit: the fast tests only, no services needed
unit: $(INSTALLED)
	$(BIN)/pytest tests/unit

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/mypy

## make bench: every benchmark (about 40 minutes, the 10-minute soak included); JSON and PNGs in bench/out
BENCHMARKS := pipeline limiter fair_share pushback sender soak cluster inbound
bench: $(INSTALLED)
	scripts/install-tools postfix
	$(BIN)/python -m mailpipe.services
	mkdir -p bench/out
	for b in $(BENCHMARKS); do $(BIN)/python bench/$$b.py | tee bench/out/$$b.json || exit 1; done

## make chaos [SEED=12 MAILS=3000]: the fault campaign, longer than in make test (more rounds of
## every fault); its JSON printed and written to bench/out/chaos.json
SEED ?= 12
MAILS ?= 3000
chaos: $(INSTALLED)
	$(BIN)/python -m mailpipe.services
	mkdir -p bench/out
	CHAOS_SEED=$(SEED) CHAOS_MAILS=$(MAILS) CHAOS_REPORT=bench/out/chaos.json \
		$(BIN)/pytest -s -p no:cacheprovider tests/faults/test_campaign.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
