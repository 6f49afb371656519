# The two commands of the README: `make quickstart` and `make test`.
# Both create (or reuse) .venv and install what they need; nothing but Python 3.11 is assumed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
WORKDIR ?= workdir/quickstart

.PHONY: quickstart test install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Reinstall whenever setup.py changes (the stamp is older than it).
$(VENV)/.installed: setup.py | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: setup.py | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	# pytorch-fid (reference for the InceptionV3 parity test) without its dependencies: they
	# would replace the pinned CPU torch with a CUDA build and add torchvision.
	$(BIN)/python -m pip install -q --no-deps pytorch-fid==0.3.0
	touch $(VENV)/.installed $@

install: $(VENV)/.installed

quickstart: $(VENV)/.installed
	$(BIN)/muse-jax quickstart --workdir $(WORKDIR)

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) workdir
