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

# The demo runs one process per core, each with its own thread count (ssl-vit demo --jobs/--threads).
demo: $(STAMP)
	$(BIN)/ssl-vit demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy ssl_vit eval

clean:
	rm -rf $(VENV) runs demo_out .pytest_cache .mypy_cache .ruff_cache
