# The two commands a newcomer runs: `make demo` and `make test`. Both install what is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_LAB := .lab

.PHONY: demo demo-down test lint typecheck unit system-deps venv clean

system-deps:
	@./scripts/ensure-system-packages

$(BIN)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is needed"'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install -q --upgrade pip==24.3.1
	@$(BIN)/pip install -q -e '.[dev]'
	@touch $@

venv: system-deps $(BIN)/.installed

demo: venv
	@$(BIN)/virtyard-lab --state-dir $(DEMO_LAB) up --profile demo --env-file demo.env
	@$(BIN)/virtyard-lab --state-dir $(DEMO_LAB) demo --env-file demo.env
	@echo
	@echo "demo.env written. Try:"
	@echo "  set -a; . ./demo.env; set +a"
	@echo "  $(BIN)/virtyard-hostctl ISCSIConnection.discoverSendTargets host=127.0.0.1 port=13260"
	@echo "  $(BIN)/virtyard-hostctl Host.getDeviceList"
	@echo "  $(BIN)/virtyard-hostctl Host.getVMFullList"
	@echo "  $(BIN)/virtyard-hostctl VM.getStats vmID=\$$VIRTYARD_DEMO_VM"
	@echo "  (loading the demo ISO into the demo VM's CD-ROM: see README, \"The demo\")"
	@echo "stop everything with: make demo-down"

demo-down:
	@if [ -x $(BIN)/virtyard-lab ]; then $(BIN)/virtyard-lab --state-dir $(DEMO_LAB) down; fi
	@rm -f demo.env

lint: venv
	$(BIN)/ruff check src tests benchmarks

typecheck: venv
	$(BIN)/mypy

unit: venv
	$(BIN)/pytest -q tests/unit

test: venv
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy
	$(BIN)/pytest -v --durations=15 tests

clean: demo-down
	rm -rf $(VENV) .lab-test .mypy_cache .ruff_cache .pytest_cache
