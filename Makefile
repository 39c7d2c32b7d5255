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
# Data sets from Debian packages, as package:file-it-installs pairs; a package is installed when
# its file is missing. Fashion-MNIST is the default data set of the image commands (any other
# copy: pass --data PATH); the KJV and Reina-Valera 1909 Bibles (SWORD zText modules) give the
# English-Spanish verse pairs of gatezoo.train.data.sword.
DATA_PACKAGES := dataset-fashion-mnist:/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz \
  sword-text-kjv:/usr/share/sword/modules/texts/ztext/engKJV2006eb/nt.bzz \
  sword-text-sparv:/usr/share/sword/modules/texts/ztext/spaRV1909eb/nt.bzz
CONFIG ?= configs/vit_tiny.yaml
MODELS ?= vit_tiny timm_vit_tiny vit_tiny_rela vit_tiny_xswiglu mixer_tiny timm_mixer_tiny ninformer_tiny

.PHONY: install data test demo train translate sidebyside bench aot lint clean

install: $(STAMP) data

# Installs the missing data packages (sudo only when not root; apt-get update and a retry if the
# first try fails). A failure is reported but does not stop the other targets: the tests that
# need the real data skip, and the commands explain how to get it.
data:
	@missing=; for pair in $(DATA_PACKAGES); do \
	  [ -f "$${pair#*:}" ] || missing="$$missing $${pair%%:*}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  echo "data missing: installing the Debian package(s)$$missing"; \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y $$missing \
	  || { $$SUDO apt-get update && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y $$missing; } \
	  || echo "warning: could not install$$missing (no apt-get, no sudo or no network);" \
	    "install by hand, or pass --data PATH to the training commands"; \
	fi

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e ".[dev]"
	# torchattacks without its requests~=2.25.1 pin (see pyproject.toml, extra "adversarial")
	$(PY) -m pip install --quiet --no-deps torchattacks==3.5.1
	touch $(STAMP)

# Triton kernels run on the CPU through the interpreter; the suite sets it too.
test: install
	TRITON_INTERPRET=1 $(PY) -m pytest -q

# One epoch of NiNformer on Fashion-MNIST; the run directory lands in runs/.
demo: install
	$(PY) -m gatezoo.train.classify --config configs/demo.yaml

# make train CONFIG=configs/ninformer_tiny.yaml ARGS="--epochs 1 --model_args.depth 2"
train: install
	$(PY) -m gatezoo.train.classify --config $(CONFIG) $(ARGS)

# make translate MT_CONFIG=configs/transformer_mt_tiny.yaml ARGS="--model transformer_mt_tiny_rela"
MT_CONFIG ?= configs/transformer_mt_quick.yaml
translate: install
	$(PY) -m gatezoo.train.translate --config $(MT_CONFIG) $(ARGS)

# make sidebyside MODELS="vit_tiny timm_vit_tiny" ARGS="--epochs 1"; CSV/PNG in benchmarks/
sidebyside: install
	$(PY) -m gatezoo.train.sidebyside --models $(MODELS) $(ARGS)

bench: install
	$(PY) -m gatezoo.eval.bench

aot: install
	$(PY) -m gatezoo.kernels.aot

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
