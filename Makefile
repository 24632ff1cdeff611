# The two set-up commands of the README: `make demo` and `make test`.
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install demo test

install:
	@bash scripts/install.sh

demo: install
	$(BIN)/dipcohort demo --out demo-results

# two workers (pytest-xdist): the Slurm and Ray tests each run in order on one, files fill the other
# (tests/conftest.py); TEST_WORKERS=0 runs everything in this one process
TEST_WORKERS ?= 2

test: install
	@bash scripts/test-setup.sh
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25 tests
