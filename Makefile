# make setup: .venv with timecat[images,dev,notebook,cluster] and the Debian packages FFCV needs (idempotent)
# make demo:  the whole pipeline on Fashion-MNIST + digits, on the CPU
# make test:  lint and the test suite;  make bench: the benchmarks
# make gpu-check: on a CUDA GPU, gpu tests and GPU speed figures in one JSON (tests/benchmarks/gpu_check.py)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.timecat-installed

.PHONY: setup demo test lint bench gpu-check clean

setup: $(STAMP)

# Reinstalled only when pyproject.toml changes; the system check is cheap and always runs.
$(STAMP): pyproject.toml
	@bash .ci/system-packages
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[images,dev,notebook,cluster]'
	@touch $(STAMP)

demo: setup
	$(BIN)/timecat demo --workdir demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

test: setup lint
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python -m pip install --quiet -e '.[images,dev,notebook,cluster,bench]'
	$(BIN)/python -m pytest -q -s tests/benchmarks -p no:cacheprovider --override-ini addopts=

gpu-check: setup
	$(BIN)/python tests/benchmarks/gpu_check.py --out tests/benchmarks/last_run_gpu_check.json

clean:
	rm -rf demo runs results features.zarr .pytest_cache
