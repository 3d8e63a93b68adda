# Every target creates .venv if needed, installs torch first (CPU wheel by default), then the project.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

MIN_VENV ?= .venv-min
MIN_PY := $(MIN_VENV)/bin/python

.PHONY: install serve serve-ray test test-distributed test-min-deps lint bench bench-gpu clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,distributed,bench]"
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(PY) -m service serve

serve-ray: $(STAMP)
	$(PY) -m service serve-ray

# Two pytest-xdist workers, each taking whole modules (--dist loadfile; tests/conftest.py keeps the Ray suite
# on one worker): most of the suite waits on server processes starting, so two workers fit 2 cores.
# TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

# Only the Ray Serve suite (a local Ray cluster with 2 replicas; about 1-2 minutes, also part of `make test`).
test-distributed: $(STAMP)
	$(PY) -m pytest tests/distributed

# The lowest declared version of every direct dependency (ci/lowest_constraints.py pins them; torch is
# TORCH_SPEC) in a venv of its own, then the runtime and engine tests and a slice of the HTTP ones (upload,
# generate, delete through a real server; settings and start-up): a lower bound that is too low fails here.
MIN_DEPS_TESTS := tests/runtime tests/engine tests/ci tests/cli tests/api/test_startup_errors.py \
	tests/api/test_api.py::test_upload_activate_generate_delete
test-min-deps:
	test -x $(MIN_PY) || $(PYTHON) -m venv $(MIN_VENV)
	$(MIN_PY) -m pip install -q --upgrade pip
	$(MIN_PY) -m pip install -q "$(TORCH_SPEC)"
	$(MIN_PY) ci/lowest_constraints.py > $(MIN_VENV)/constraints.txt
	$(MIN_PY) -m pip install -q --constraint $(MIN_VENV)/constraints.txt -e ".[dev]"
	$(MIN_PY) -m pytest $(MIN_DEPS_TESTS)

# Benchmarks, never part of `make test`: bench.run and bench.curves write bench/results.md and bench/scaling.png
# (several minutes on 2 cores); bench-gpu runs both on a CUDA GPU in bfloat16 (bench/gpu.sh, under 8 minutes).
bench: $(STAMP)
	$(PY) -m bench.run
	$(PY) -m bench.curves

bench-gpu: $(STAMP)
	PYTHON=$(PY) bash bench/gpu.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check service adapter_client tests bench examples

clean:
	rm -rf $(VENV) $(MIN_VENV) .pytest_cache
