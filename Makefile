# The two commands of the README. Both create .venv when missing and reinstall only
# when pyproject.toml changes, so a second run starts at once.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip install --progress-bar off -q

.PHONY: demo test bench bench-full lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) -e .
	@touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(PIP) -e '.[test]'
	@touch $@ $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/wingspan demo --out runs/demo

test: $(VENV)/.installed-test
	$(BIN)/ruff check src tests bench
	$(BIN)/python -m pytest

# About 25 min on a 2-core CPU: both data sets with EfficientNet-Lite0, inference, scaling.
bench: $(VENV)/.installed
	$(BIN)/python bench/run.py

# Adds EfficientNet-Lite2: about an hour on a 2-core CPU.
bench-full: $(VENV)/.installed
	$(BIN)/python bench/run.py --backbones efficientnet_lite0 efficientnet_lite2

lint: $(VENV)/.installed-test
	$(BIN)/ruff check --fix src tests bench

clean:
	rm -rf runs .pytest_cache .ruff_cache
