# The two commands of the README. Both create .venv when missing and reinstall only
# when pyproject.toml changes, so a second run starts at once.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip install --progress-bar off -q

.PHONY: demo test bench bench-full gpu-check lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) -e .
	@touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(PIP) -e '.[test]'
	@touch $@ $(VENV)/.installed

# axe-core, the accessibility checker the page tests run in Chromium (from npm; without npm
# they skip, but not in CI, whose .ci/run sets WINGSPAN_REQUIRE_AXE where npm is).
AXE := $(VENV)/axe/node_modules/axe-core/axe.min.js
$(AXE): | $(BIN)/python
	@if [ -e $(VENV)/axe/.failed ]; then \
		echo "axe-core could not be installed before: the pages' accessibility checks skip (rm $(VENV)/axe/.failed to try again)"; \
	elif command -v npm >/dev/null; then \
		npm install --prefix $(VENV)/axe --no-audit --no-fund --no-save --loglevel error \
			--fetch-retries 1 --fetch-timeout 20000 axe-core@4.14.1 >/dev/null \
		|| { mkdir -p $(VENV)/axe && touch $(VENV)/axe/.failed; \
		     echo "axe-core could not be installed (no registry?): the pages' accessibility checks skip"; }; \
	else echo "npm is missing, so the pages' accessibility checks skip (apt-get install -y npm)"; fi

demo: $(VENV)/.installed
	$(BIN)/wingspan demo --out runs/demo

# The suite as users run it (engines measured on this machine), then the tests marked
# `policy` again under each forced engine, so that a bf16-only failure shows up on a CPU
# whose auto choice is fp32, and an ONNX-only one where auto picks PyTorch. On the CPU:
# ONNX Runtime runs there only, and a GPU machine runs the first pass on its GPU.
FORCED_POLICIES := fp32,torch fp32,onnx bf16,torch
# pytest-xdist workers, one per core up to 4; a test module stays on one worker, so its
# module-scoped fixtures (trained runs) are built once. The main pass took 11 min on 2 cores.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)
XDIST := -n $(TEST_WORKERS) --dist loadscope

# compileall: bytecode for our own sources (pip compiled the dependencies'). Where
# PYTHONDONTWRITEBYTECODE is set, each of the suite's many processes would otherwise
# compile wingspan again, about 0.7 s of CPU each on a 2-core EPYC.
test: $(VENV)/.installed-test $(AXE)
	$(BIN)/ruff check src tests bench
	$(BIN)/python -m compileall -q src tests
	$(BIN)/python -m pytest $(XDIST)
	@for forced in $(FORCED_POLICIES); do \
		precision=$${forced%,*}; runtime=$${forced#*,}; \
		echo "== policy tests under WINGSPAN_PRECISION=$$precision WINGSPAN_RUNTIME=$$runtime"; \
		CUDA_VISIBLE_DEVICES= WINGSPAN_PRECISION=$$precision WINGSPAN_RUNTIME=$$runtime \
			$(BIN)/python -m pytest -q -m policy -p no:cacheprovider $(XDIST) || exit 1; \
	done

# About 25 min on a 2-core CPU: both data sets with EfficientNet-Lite0, inference, scaling.
bench: $(VENV)/.installed
	$(BIN)/python bench/run.py

# Adds EfficientNet-Lite2: about an hour on a 2-core CPU.
bench-full: $(VENV)/.installed
	$(BIN)/python bench/run.py --backbones efficientnet_lite0 efficientnet_lite2

# On a CUDA machine: each precision, evaluate, predict, DDP over every GPU (bench/gpu_check.py).
gpu-check: $(VENV)/.installed
	$(BIN)/python bench/gpu_check.py

lint: $(VENV)/.installed-test
	$(BIN)/ruff check --fix src tests bench

clean:
	rm -rf runs .pytest_cache .ruff_cache build dist
