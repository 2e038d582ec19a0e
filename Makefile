# Two entry points: `make demo` and `make test`. Each sets up .venv on a fresh clone first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.residency-installed

.PHONY: setup demo test lint clean

setup: $(STAMP)

# The venv sees system site-packages so a user's existing (CUDA) torch is reused; the CPU
# torch 2.13.0 wheel is installed only when no torch is importable at all.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[dev,hf,plot,serve]"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/residency demo

lint: setup
	$(VENV)/bin/ruff check src tests $(wildcard examples benchmarks)

test: setup lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
