# Every target creates .venv if needed, installs torch first (CPU wheel by default), then the project.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install serve serve-ray test test-distributed lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,distributed]"
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(PY) -m service serve

serve-ray: $(STAMP)
	$(PY) -m service serve-ray

test: $(STAMP)
	$(PY) -m pytest

# Only the Ray Serve suite (a local Ray cluster with 2 replicas; about 1-2 minutes, also part of `make test`).
test-distributed: $(STAMP)
	$(PY) -m pytest tests/distributed

lint: $(STAMP)
	$(VENV)/bin/ruff check service adapter_client tests bench examples

clean:
	rm -rf $(VENV) .pytest_cache
