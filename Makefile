# The two commands of the README: `make demo` and `make test`.
# Both create .venv when it is missing and install the project into it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
OUT    ?= results/demo

.PHONY: demo test test-slow docs bench clean help

help:
	@echo "make demo       quick benchmark of the paper's models and the pooling layers (results in $(OUT))"
	@echo "make test       unit, property and integration tests, doctests, Sphinx build"
	@echo "make test-slow  the tests marked slow as well"
	@echo "make docs       build the HTML docs into docs/_build/html"
	@echo "make bench      the full CPU benchmark into benchmarks/results/"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstall when the project's metadata changes.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --progress-bar off -e '.[all]'
	@touch $@

demo: $(STAMP)
	$(BIN)/bilinearpool-bench demo --out $(OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup
	$(BIN)/sphinx-build -W --keep-going -q -b html docs docs/_build/html
	@echo "docs built in docs/_build/html"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup -m ''

docs: $(STAMP)
	$(BIN)/sphinx-build -W --keep-going -b html docs docs/_build/html

bench: $(STAMP)
	$(BIN)/bilinearpool-bench layers --out benchmarks/results/cpu-2core
	$(BIN)/bilinearpool-bench models --out benchmarks/results/cpu-2core

clean:
	rm -rf $(VENV) docs/_build results .pytest_cache .hypothesis
