# Two entry points, both self-contained on a fresh machine:
#   make demo   creates .venv, installs the package with its extras, runs examples/mnist.py
#   make test   creates .venv, installs the package with dev extras, runs ruff and the suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA_DIR ?= ../shared/data

.PHONY: venv demo test lint

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
