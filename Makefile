# Two entry points, both self-contained on a fresh machine:
#   make demo   creates .venv, installs the package with its extras, runs examples/mnist.py
#   make test   creates .venv, installs the package with dev extras, runs ruff and the suite
#   make docs   installs the docs extra, builds the site into site/ (warnings are errors)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA_DIR ?= ../shared/data

.PHONY: venv demo test lint docs

$(PY):
	$(PYTHON) -m venv $(VENV)

venv: $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"

demo: venv
	$(PY) examples/mnist.py --data-dir $(DATA_DIR) --epochs 1

lint: venv
	$(PY) -m ruff check .

test: venv lint
	$(PY) -m pytest -n 2 -q

# mkdocs-material + mkdocstrings; --strict turns every warning (a docstring griffe cannot
# parse, a broken link, a name that does not resolve) into a failure. NO_MKDOCS_2_WARNING
# silences mkdocs-material's banner about MkDocs 2.0 (the extra pins mkdocs < 2)
docs: venv
	$(PY) -m pip install --quiet -c constraints.txt -e ".[docs]"
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site
