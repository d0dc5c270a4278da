# Two entry points that do all their own set-up on a fresh machine:
#   make run    generate from the built-in Shakespeare model
#   make test   run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROMPT ?= ROMEO:

.PHONY: setup run test bench clean

$(BIN)/overspill: pyproject.toml
	$(PY) -m venv $(VENV)
	# torch first, pinned to the local CPU wheel, so the range in pyproject resolves to it.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# compile the CPU kernels now (~30 s, cached) rather than inside the first run or test
	$(BIN)/python -m overspill.kernels
	touch $@

setup: $(BIN)/overspill

run: setup
	$(BIN)/overspill generate "$(PROMPT)" --max-new-tokens 200 --temperature 0.8 --top-p 0.95 --seed 0

test: setup
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) .pytest_cache
