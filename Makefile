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
	@echo "  (the demo VM \"demo\" is the engine's, below; the demo ISO in a CD-ROM: see README, \"The demo\")"
	@echo
	@. ./demo.env; \
	  echo "The engine (oVirt v4 REST API, docs/engine.md): $$VIRTYARD_ENGINE_URL"; \
	  echo "  user $$VIRTYARD_ENGINE_USER, password $$VIRTYARD_ENGINE_PASSWORD"; \
	  echo "  CA file $$VIRTYARD_ENGINE_CA"
	@echo "  curl (a token, then the hosts as JSON):"
	@echo "    TOKEN=\$$(curl -s --cacert \"\$$VIRTYARD_ENGINE_CA\" -d grant_type=password -d scope=ovirt-app-api \\"
	@echo "      --data-urlencode \"username=\$$VIRTYARD_ENGINE_USER\" --data-urlencode \"password=\$$VIRTYARD_ENGINE_PASSWORD\" \\"
	@echo "      \"\$${VIRTYARD_ENGINE_URL%/api}/sso/oauth/token\" | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"access_token\"])')"
	@echo "    curl -s --cacert \"\$$VIRTYARD_ENGINE_CA\" -H \"Authorization: Bearer \$$TOKEN\" -H 'Accept: application/json' \"\$$VIRTYARD_ENGINE_URL/hosts\""
	@echo "  SDK (ovirtsdk4):"
	@echo "    $(BIN)/python -c 'import os, ovirtsdk4 as sdk; e = os.environ; c = sdk.Connection(url=e[\"VIRTYARD_ENGINE_URL\"], username=e[\"VIRTYARD_ENGINE_USER\"], password=e[\"VIRTYARD_ENGINE_PASSWORD\"], ca_file=e[\"VIRTYARD_ENGINE_CA\"]); print([(h.name, str(h.status)) for h in c.system_service().hosts_service().list()]); print([(v.name, str(v.status)) for v in c.system_service().vms_service().list()])'"
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
