# mortar: `make run` starts mortar on the embedded single-node default; `make test` runs the suite.
# Both do their own set-up on a fresh Debian 12 host (system packages via apt-get, Python into .venv).

VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMPS := $(VENV)/.stamps
PYTHON ?= python3

.PHONY: setup run stop test bench lint clean

setup: $(STAMPS)/system $(STAMPS)/python

$(STAMPS)/system: scripts/setup-system.sh
	bash scripts/setup-system.sh
	@mkdir -p $(STAMPS) && touch $@

$(STAMPS)/python: pyproject.toml $(STAMPS)/system
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@mkdir -p $(STAMPS) && touch $@

run: setup
	$(PY) scripts/run.py

stop:
	$(PY) scripts/stop.py

test: setup
	$(PY) -m pytest -q

# every scenario in one go: the seed's full table, mortar beside GlusterFS 10 and the local disk
# (~31 min on 2 cores), then thin (issue 7) and heal (issue 4); BENCH_SCENARIO=seed (or thin, heal,
# foundation) runs one; `make bench BENCH_ARGS=--quick` checks everything end to end in a few
# minutes (see bench/README.md)
BENCH_SCENARIO ?= all
bench: setup $(STAMPS)/bench
	$(PY) bench/run.py --scenario $(BENCH_SCENARIO) $(BENCH_ARGS)

$(STAMPS)/bench: pyproject.toml $(STAMPS)/python
	$(PY) -m pip install -q -e '.[bench]'
	@mkdir -p $(STAMPS) && touch $@

lint: setup
	$(VENV)/bin/ruff check src tests bench scripts
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) .mortar-home build src/*.egg-info
