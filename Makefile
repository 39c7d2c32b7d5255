# Set-up and entry points. Every target installs what it needs into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch first, pinned with the torchvision built against it (timm, a test and benchmark
# peer, imports torchvision only beside its own torch); installed first so that the package's
# "torch>=2.4" is already met and pip does not pick some other multi-GB build. This pair runs
# on the CPU as well as on CUDA and brings triton 3.8.
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: install test demo bench aot lint clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# Triton kernels run on the CPU through the interpreter; the suite sets it too.
test: install
	TRITON_INTERPRET=1 $(PY) -m pytest -q

# The main job for now: the GLU kernel benchmark on this machine (CSV + PNG in benchmarks/).
demo: install
	$(PY) -m gatezoo.eval.bench --op glu

bench: install
	$(PY) -m gatezoo.eval.bench

aot: install
	$(PY) -m gatezoo.kernels.aot

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
