# `make test` and `make demo` work in a fresh clone with only Python and PyPI: they create .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-fast clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Everything, including the end-to-end tests on the CPU XLA device.
test: $(STAMP)
	PJRT_DEVICE=CPU $(BIN)/python -m pytest -q

# Eager unit tests only (seconds): the math, without XLA compilation.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not xla"

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
