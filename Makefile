# The two commands a fresh machine needs (README):
#   make demo    set up .venv, then run the embedded demo
#   make test    set up .venv, then run the tests
# GPU hosts: make setup CONSTRAINTS=constraints/gpu-cu130.txt (README "Install on a GPU host").

PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints/cpu.txt
BIN := $(VENV)/bin
STAMP := $(VENV)/.rtdecode-setup

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check pip==26.3
	PIP_CONSTRAINT=$(abspath $(CONSTRAINTS)) $(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,onnx,train]'
	$(BIN)/python -c 'from rtdecode.torchvision_cpu import install_pth; print("wrote", install_pth())'
	touch $@

demo: setup
	$(BIN)/rtdecode demo

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

bench: setup
	$(BIN)/rtdecode bench ingest

clean:
	rm -rf $(VENV)
