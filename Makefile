# Two entry points for a fresh clone (see README): `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch is pinned here and installed before the package, so that pip never
# resolves an unpinned torch (which would pull a multi-GB CUDA build). On a GPU machine, install
# your CUDA torch into the venv first and run `make install TORCH_SPEC=` to keep it.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install demo test lint bench clean

$(BIN)/modalseg: pyproject.toml
	$(PY) -m venv $(VENV)
	@if [ -n "$(TORCH_SPEC)" ]; then $(BIN)/pip install -q "$(TORCH_SPEC)"; fi
	$(BIN)/pip install -q -e ".[dev,dicom,export,openvino]"
	@touch $(BIN)/modalseg

install: $(BIN)/modalseg

demo: install
	$(BIN)/modalseg demo --output demo_output

test: install
	$(BIN)/python -m pytest -n 2 tests

lint: install
	$(BIN)/ruff check src tests benchmarks

bench: install
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) demo_output .pytest_cache
