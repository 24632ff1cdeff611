# The two set-up commands of the README: `make demo` and `make test`.
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test

install:
	@bash scripts/install.sh

demo: install
	$(BIN)/dipcohort demo --out demo-results

test: install
	@bash scripts/test-setup.sh
	$(BIN)/python -m pytest -q tests
