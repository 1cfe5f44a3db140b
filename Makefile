# The two commands of the README: `make demo` and `make test`.
# Both create .venv when it is missing and install the project into it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
OUT    ?= results/demo

.PHONY: demo test test-slow test-cuda docs bench clean help

help:
	@echo "make demo       quick benchmark of the paper's models and the pooling layers (results in $(OUT))"
	@echo "make test       unit, property and integration tests, doctests, Sphinx build"
	@echo "make test-slow  the tests marked slow as well"
	@echo "make test-cuda  the CUDA tests, on a GPU machine (benchmarks/gpu_check.sh runs them and the GPU benchmarks)"
	@echo "make docs       build the HTML docs into docs/_build/html"
	@echo "make bench      the full CPU benchmark into benchmarks/results/"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstall when the project's metadata changes.
$(STAMP): pyproject.toml | $(BIN)/python
	@echo "Installing bilinearpool, breakhis and their dependencies (PyTorch included) into $(VENV): a minute or more..."
	$(BIN)/python -m pip install --quiet --progress-bar off -e '.[all]'
	@touch $@

demo: $(STAMP)
	$(BIN)/bilinearpool-bench demo --out $(OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup
	$(BIN)/sphinx-build -W --keep-going -q -b html docs docs/_build/html
	@echo "docs built in docs/_build/html"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadgroup -m 'not cuda'

# On a GPU machine: the CUDA paths against the CPU (tests/test_cuda.py).
test-cuda: $(STAMP)
	$(BIN)/python -m pytest -m cuda tests/test_cuda.py

docs: $(STAMP)
	$(BIN)/sphinx-build -W --keep-going -b html docs docs/_build/html

# The measurements behind benchmarks/results/cpu-2core.md (about 10 minutes on 2 cores):
# raw files only. The .md's title and notes are written by hand, so it is not rewritten here.
# THP_MEM_ALLOC_ENABLE=1: every large CPU allocation of PyTorch gets transparent huge pages,
# the baselines' temporaries included (without it the naive chain's time is largely page
# faults on new buffers, while the library's op asks for huge pages on its own output).
bench: $(STAMP)
	THP_MEM_ALLOC_ENABLE=1 $(BIN)/bilinearpool-bench layers --threads 1 --repeats 7 --warmup 2 --out benchmarks/results/cpu-2core --no-progress
	THP_MEM_ALLOC_ENABLE=1 $(BIN)/bilinearpool-bench models --threads 1 --batch-size 2 --batch-size-at 448=1 --repeats 5 --warmup 1 --out benchmarks/results/cpu-2core --no-progress
	@echo "raw results in benchmarks/results/cpu-2core/; to rebuild cpu-2core.md with its title and notes:"
	@echo "  $(BIN)/bilinearpool-bench report benchmarks/results/cpu-2core --out benchmarks/results/cpu-2core.md --title ... --note ..."

clean:
	rm -rf $(VENV) docs/_build results .pytest_cache .hypothesis
