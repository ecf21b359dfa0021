# Two entry points, each creating the virtual environment on first use:
#   make quickstart   train the offline default (configs/quickstart.py)
#   make test         run the whole test suite on the CPU
# Both install the exact versions of constraints.txt; `make constraints` refreshes that file
# to the newest versions pyproject.toml's ranges allow and runs the suite on them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Remade whenever the declared dependencies or their pinned versions change.
INSTALLED := $(VENV)/.installed
CONSTRAINTS := constraints.txt
# The throwaway environment that `make constraints` resolves and tests in.
REFRESH_VENV ?= .venv-refresh
PYTEST_ARGS ?=

.PHONY: quickstart test lint install constraints clean

install: $(INSTALLED)

$(INSTALLED): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e ".[test]"
	touch $(INSTALLED)

quickstart: $(INSTALLED)
	$(BIN)/python main.py --config=configs/quickstart.py --workdir=runs/quickstart

test: $(INSTALLED)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(INSTALLED)
	$(BIN)/ruff check .

# Resolves the ranges afresh (no constraints), writes the result to constraints.txt, then
# runs the whole suite on it; commit the file when the suite passes (git diff shows what moved).
constraints:
	rm -rf $(REFRESH_VENV)
	$(PYTHON) -m venv $(REFRESH_VENV)
	$(REFRESH_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(REFRESH_VENV)/bin/python -m pip install --quiet -e ".[test]"
	{ printf '%s\n' \
	  "# Exact versions that \`make\` installs (pip install -c constraints.txt), so that the README's" \
	  "# two commands and its figures reproduce. pyproject.toml keeps the ranges the package supports." \
	  "# Resolved from those ranges on $$($(REFRESH_VENV)/bin/python -c 'import platform; print("CPython", platform.python_version())'), $$(date +%Y-%m-%d); refreshed by \`make constraints\`," \
	  "# which also runs the suite on the refreshed set."; \
	  $(REFRESH_VENV)/bin/python -m pip freeze --exclude-editable; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	$(REFRESH_VENV)/bin/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(REFRESH_VENV) runs
