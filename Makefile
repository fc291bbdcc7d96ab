# The two set-up commands of the README: `make run` and `make test` (both install first).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# A cache dir in the tree, keyed by nothing else: CI starts from a fresh clone, so no stale kernels.
export NUMBA_CACHE_DIR ?= $(CURDIR)/.numba_cache

.PHONY: install run test bench paper clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[test,plot,sweep]"
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/ddln run data/default.toml -o runs/default.h5 --overwrite

test: install
	$(BIN)/python -m pytest -q

# The paper's figures (implicit bias, time to epsilon, PL bound) from data/paper/ into figures/.
paper: install
	$(BIN)/python -m ddln_fast.paper --configs data/paper --out figures

bench: install
	$(BIN)/python -m pytest bench -q --benchmark-enable -p no:cacheprovider

clean:
	rm -rf $(VENV) .numba_cache runs .pytest_cache .benchmarks
