# Every target installs what it needs into .venv first, so a fresh clone needs only
# python3 (3.9 or newer) and make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAGE  ?= dev

.PHONY: test test-full demo stress chaos bench lint typecheck clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.test-installed: setup.py | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

$(VENV)/.dev-installed: setup.py | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test,dev]'
	touch $@

# The suite runs in WORKERS processes (pytest-xdist), each with its own moto server: two, as
# on CI's 2-core machines. WORKERS=0 runs it in this one process, in file order.
WORKERS ?= 2

test: $(VENV)/.test-installed
	$(BIN)/python -m pytest -q -n $(WORKERS)

# The whole suite with the process-pool matrix at full counts in every mode (about an hour).
test-full: $(VENV)/.test-installed
	$(BIN)/python -m pytest -q --full-counts

demo: $(VENV)/.test-installed
	$(BIN)/python -m dxtrack.demo --stage $(STAGE)

# Pools, Ctrl-C and re-entrant calls, hundreds of times on loaded cores: nothing lost,
# duplicated or hung (not part of `make test`). Options: make stress ARGS='--runs-pool 50'.
stress: $(VENV)/.test-installed
	$(BIN)/python tests/stress.py $(ARGS)

# Outages, exits, SIGKILL, a full spool and throttling storms against jobs run as processes,
# through a fault proxy in front of moto: every record lands once via the disk spool, or the
# loss is declared (not part of `make test`; a few minutes). Options: make chaos ARGS='--quick'.
chaos: $(VENV)/.test-installed
	$(BIN)/python tests/chaos.py $(ARGS)

bench: $(VENV)/.test-installed
	$(BIN)/python benchmarks/run.py

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check dxtrack tests benchmarks

typecheck: $(VENV)/.dev-installed
	$(BIN)/mypy dxtrack

clean:
	rm -rf $(VENV) .dxtrack_output .dxtrack_demo build *.egg-info
