# The two commands a fresh machine needs (README):
#   make demo    set up .venv, then run the embedded demo
#   make test    set up .venv, then run the tests
# GPU hosts: make setup CONSTRAINTS=constraints/gpu-cu130.txt (README "Install on a GPU host").

PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints/cpu.txt
BIN := $(VENV)/bin
STAMP := $(VENV)/.rtdecode-setup

.PHONY: setup browser-deps demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check pip==26.3
	PIP_CONSTRAINT=$(abspath $(CONSTRAINTS)) $(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,onnx,train,eval]'
	$(BIN)/python -c 'from rtdecode.torchvision_cpu import install_pth; print("wrote", install_pth())'
	touch $@

demo: setup
	$(BIN)/rtdecode demo

# The operator display's browser tests drive Debian's chromium and chromium-driver (only the tests need them).
browser-deps:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then exit 0; fi; \
	if ! command -v apt-get >/dev/null; then \
	  echo "warning: no apt-get: install chromium and chromedriver at /usr/bin (the browser tests need them)"; exit 0; fi; \
	SUDO=$$( [ "$$(id -u)" = 0 ] || echo "sudo -n" ); \
	echo "installing Debian's chromium and chromium-driver for the browser tests"; \
	{ $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver; } || \
	echo "warning: could not install chromium and chromium-driver (the browser tests will say what is missing)"

test: setup browser-deps
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

bench: setup
	$(BIN)/rtdecode bench ingest

clean:
	rm -rf $(VENV)
