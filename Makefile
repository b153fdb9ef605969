# The two commands of the README: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.ssl-vit-installed

.PHONY: install demo test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Reinstall only when the package definition or the pinned set changes.
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,onnx]'
	touch $(STAMP)

install: $(STAMP)

# One intra-op thread: the demo's models are tiny, and two OpenMP threads next to any other job
# thrash (measured: DINO 20 steps 101 s with 2 threads beside other jobs, 14 s with 1).
demo: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/ssl-vit demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy ssl_vit eval

clean:
	rm -rf $(VENV) runs demo_out .pytest_cache .mypy_cache .ruff_cache
