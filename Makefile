# Two commands do everything on a fresh machine:
#   make demo   set up, then extract a small model's layers from a generated corpus into local Zarr
#   make test   set up, then run the test suite
PYTHON ?= python3.11
VENV   ?= .venv
BIN     = $(VENV)/bin
OUT    ?= demo-output

.PHONY: setup demo test clean

$(BIN)/neuropredictor: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -qq --upgrade pip
	$(BIN)/pip install -qq -e ".[dev]"
	touch $@

setup: $(BIN)/neuropredictor

demo: setup
	$(BIN)/neuropredictor demo --out $(OUT)

test: setup
	$(BIN)/python -m pytest -q -ra --durations=15

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
