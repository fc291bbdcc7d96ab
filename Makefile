# The two set-up commands of the README: `make run` and `make test` (both install first).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Numba's cache in the tree, one folder per state of the package's sources: Numba notices when a
# kernel's own file changes, not when a helper it inlines from another module does, so a pull or
# an edit must never find the old machine code.
SOURCES_KEY := $(shell cat ddln_fast/*.py ddln_fast/*/*.py | sha256sum | cut -c1-16)
export NUMBA_CACHE_DIR ?= $(CURDIR)/.numba_cache/$(SOURCES_KEY)

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
