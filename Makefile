# `make train` and `make test` set everything up in .venv and run the main job / the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/kp_mnist.py
WORKDIR ?= runs/kp_mnist
# Offline machines of this project keep a prepared MNIST beside the repo; elsewhere TFDS downloads it.
SHARED_TFDS := $(abspath ../shared/data/tensorflow_datasets)
ifneq ($(wildcard $(SHARED_TFDS)),)
export TFDS_DATA_DIR ?= $(SHARED_TFDS)
endif

.PHONY: setup train test benchmark

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

train: setup
	$(PY) main.py --config=$(CONFIG) --workdir=$(WORKDIR)

test: setup
	$(PY) -m pytest -q tests

benchmark: setup
	$(PY) benchmarks/throughput.py
