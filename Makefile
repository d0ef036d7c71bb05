# ntkdd: environments, tests, demo and benchmarks.
#   make test   builds .venv (python3 >= 3.11, current JAX) and .venv-lp (Python 3.10, the pinned
#               Launchpad + neural-tangents stack) from nothing, then runs the whole suite.
#   make demo   distils MNIST to 10 images per class with KIP and prints the gain (downloading
#               MNIST when DATA_DIR lacks it; a second call continues the run).
#   make bench-gpu [SMOKE=1]  the one-call GPU suite (bench/gpu_suite.py), about 10 minutes.
SHELL := /bin/bash
PYTHON ?= python3
# python3.10 for the Launchpad environment: on PATH, else any pyenv 3.10 install.
PYTHON310 ?= $(shell command -v python3.10 >/dev/null 2>&1 && python3.10 -c 'print(1)' >/dev/null 2>&1 && command -v python3.10 || ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.10*/bin/python3.10 2>/dev/null | tail -n 1)
DATA_DIR ?= ../shared/data
PYTEST_ARGS ?=
NTKDD ?= .venv/bin/ntkdd
DEMO_DIR ?= runs/demo
DEMO_FLAGS ?= --algorithm kip --ipc 10 --steps 600 --depth 3 --lr 0.04 --lr-schedule cosine --learn-labels --target-batch 5000 --eval-every 100
DOWNLOAD_URL ?=
# The GPU suite runs with the machine's Python (nothing installed; see bench/gpu_suite.py) or
# .venv's where it exists; SMOKE=1: tiny sizes on a CPU.
BENCH_PYTHON ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,$(PYTHON))
SMOKE ?=

.PHONY: test test-core test-lp venv venv-lp demo bench bench-gpu clean

# Both environments first: the core suite's tests/test_reference_cross_env.py runs .venv-lp's
# neural-tangents (it skips without .venv-lp, and fails so where CI=true).
test: venv venv-lp test-core test-lp

venv: .venv/.installed
venv-lp: .venv-lp/.installed

.venv/.installed: setup.py
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "make: .venv needs python3 >= 3.11, found " + sys.version.split()[0]'
	$(PYTHON) -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	.venv/bin/pip install -q -e '.[dev]'
	touch $@

.venv-lp/.installed: setup.py constraints/launchpad.txt
	@if [ -z "$(PYTHON310)" ]; then \
	  echo "make: no python3.10 found. The Launchpad environment (.venv-lp) needs Python 3.10:"; \
	  echo "      dm-launchpad and its Courier exist only for Python <= 3.10."; \
	  echo "      Install one with 'pyenv install 3.10' (or your package manager's python3.10),"; \
	  echo "      or name it: make PYTHON310=/path/to/python3.10"; \
	  exit 1; fi
	$(PYTHON310) -m venv .venv-lp
	.venv-lp/bin/pip install -q --upgrade pip
	.venv-lp/bin/pip install -q -c constraints/launchpad.txt dm-launchpad tensorflow-cpu jax jaxlib numpy scipy ml_dtypes protobuf frozendict typing_extensions absl-py pytest pillow optax chex
	# neural-tangents 0.6.4 and tf2jax 0.3.0 without their dependencies: newer ones need newer TensorFlow.
	.venv-lp/bin/pip install -q --no-deps neural-tangents==0.6.4 tf2jax==0.3.0
	.venv-lp/bin/pip install -q --no-deps -e .
	touch $@

test-core: .venv/.installed
	.venv/bin/python -m pytest -q -m 'not lp' tests $(PYTEST_ARGS)

test-lp: .venv-lp/.installed
	.venv-lp/bin/python -m pytest -q -m lp tests $(PYTEST_ARGS)

# The demo owns DEMO_DIR: a second `make demo` continues the run there (--resume; a finished
# run just reports again). MNIST missing from DATA_DIR is downloaded (checksums verified), from
# DOWNLOAD_URL when set (a mirror of the official files).
demo: .venv/.installed
	@if [ -f $(DEMO_DIR)/checkpoint.npz ]; then \
	  echo "make demo: $(DEMO_DIR) holds an earlier demo run: continuing it (--resume). To start over: rm -rf $(DEMO_DIR)"; \
	  continue_flag=--resume; \
	else \
	  echo "make demo: starting a new demo run in $(DEMO_DIR)"; \
	  continue_flag=--overwrite; \
	fi; \
	echo "NTKDD_DOWNLOAD_URL='$(DOWNLOAD_URL)' $(NTKDD) distill --dataset mnist --data-dir $(DATA_DIR) --download $(DEMO_FLAGS) --out $(DEMO_DIR) $$continue_flag"; \
	NTKDD_DOWNLOAD_URL='$(DOWNLOAD_URL)' $(NTKDD) distill --dataset mnist --data-dir $(DATA_DIR) --download $(DEMO_FLAGS) --out $(DEMO_DIR) $$continue_flag

bench: .venv/.installed
	.venv/bin/python bench/kernel_throughput.py

bench-gpu:
	$(BENCH_PYTHON) bench/gpu_suite.py --data-dir $(DATA_DIR) $(if $(SMOKE),--smoke)

clean:
	rm -rf .venv .venv-lp build *.egg-info
