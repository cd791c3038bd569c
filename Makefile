# Two commands do everything on a fresh machine (see README):
#   make train   # create .venv, train TResNet-M + ASL on Corel-5k and evaluate it
#   make test    # create .venv, run the whole test suite
# `train` installs what training needs; `test` adds the dev extras (pytest, pyflakes, scikit-learn,
# and torch + timm for the parity tests). With an NVIDIA driver present (nvidia-smi), jax's CUDA
# build is installed too.
PYTHON ?= python3
VENV := .venv
comma := ,
CUDA := $(if $(shell command -v nvidia-smi 2>/dev/null),cuda,)
EXTRAS_train := $(CUDA)
EXTRAS_test := dev$(if $(CUDA),$(comma)$(CUDA),)
CONFIG ?= configs/tresnet_asl.py
ARGS ?=

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip

# .venv/.installed-train, .venv/.installed-test: the package (editable) with that job's extras
$(VENV)/.installed-%: pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/pip install -q -e ".$(if $(EXTRAS_$*),[$(EXTRAS_$*)],)"
	touch $@

.PHONY: train test
train: $(VENV)/.installed-train
	$(VENV)/bin/python -m annotate.main --config=$(CONFIG) $(ARGS)

test: $(VENV)/.installed-test
	$(VENV)/bin/python -m pytest -q -n 2 $(ARGS)
