# Every target works from a fresh clone with Python 3.11+, pip and make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test lint typecheck bench bench-peers bench-instructions soak clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is needed, found " + sys.version.split()[0])'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tokenhub-sidecar demo

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check sidecar tests bench
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python bench/run.py

bench-peers: $(STAMP)
	$(BIN)/python bench/run.py --peers

bench-instructions: $(STAMP)
	$(BIN)/python bench/instructions.py

soak: $(STAMP)
	SOAK_SECONDS=$${SOAK_SECONDS:-600} $(BIN)/python -m pytest tests/soak -q -p no:cacheprovider

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
