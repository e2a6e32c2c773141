# `make test` and `make demo` work in a fresh clone with only Python and PyPI: they create .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-fast bench clean

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

# Benchmarks; record the results in docs/performance.md with the machine and date.
bench: $(STAMP)
	$(BIN)/retinanet-xla data bench --image-size 640 --images 200

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
