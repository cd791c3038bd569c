# Two commands do everything on a fresh machine (see README):
#   make train   # create .venv, train TResNet-M + ASL on Corel-5k and evaluate it
#   make test    # create .venv (with test extras), run the whole test suite
PYTHON ?= python3
VENV := .venv
EXTRAS ?= dev
CONFIG ?= configs/tresnet_asl.py
ARGS ?=

$(VENV)/.installed-$(EXTRAS): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[$(EXTRAS)]"
	touch $@

.PHONY: train test
train: $(VENV)/.installed-$(EXTRAS)
	$(VENV)/bin/python -m annotate.main --config=$(CONFIG) $(ARGS)

test: $(VENV)/.installed-$(EXTRAS)
	$(VENV)/bin/python -m pytest -q $(ARGS)
