# Two commands do everything on a fresh machine (see README):
#   make train   # create .venv, train TResNet-M + ASL on Corel-5k and evaluate it
#   make test    # create .venv, run the whole test suite
# With an NVIDIA driver present (nvidia-smi), jax's CUDA build is installed too.
PYTHON ?= python3
VENV := .venv
comma := ,
EXTRAS := dev$(if $(shell command -v nvidia-smi 2>/dev/null),$(comma)cuda,)
CONFIG ?= configs/tresnet_asl.py
ARGS ?=

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[$(EXTRAS)]"
	touch $@

.PHONY: train test
train: $(VENV)/.installed
	$(VENV)/bin/python -m annotate.main --config=$(CONFIG) $(ARGS)

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q $(ARGS)
