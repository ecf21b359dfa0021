# Two entry points, each creating the virtual environment on first use:
#   make quickstart   train the offline default (configs/quickstart.py)
#   make test         run the whole test suite on the CPU
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Remade whenever the declared dependencies change.
INSTALLED := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: quickstart test lint install clean

install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(INSTALLED)

quickstart: $(INSTALLED)
	$(BIN)/python main.py --config=configs/quickstart.py --workdir=runs/quickstart

test: $(INSTALLED)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(INSTALLED)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs
