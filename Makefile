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

# Reinstall whenever setup.py or pyproject.toml changes (the stamp is older than them).
$(VENV)/.installed: setup.py pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: setup.py pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	# pytorch-fid (reference for the InceptionV3 parity test) without its dependencies: they
	# would replace the pinned CPU torch with a CUDA build and add torchvision.
	$(BIN)/python -m pip install -q --no-deps pytorch-fid==0.3.0
	# clean-fid (its "clean" resize and scaling, for test_inception) and torchmetrics (its CLIPScore,
	# for test_clip_score) without their dependencies, for the same reason; the modules the tests
	# import need neither torchvision nor a model download.
	$(BIN)/python -m pip install -q --no-deps clean-fid==0.1.35 torchmetrics==1.9.0 lightning-utilities==0.15.3
	touch $(VENV)/.installed $@

install: $(VENV)/.installed

quickstart: $(VENV)/.installed
	$(BIN)/muse-jax quickstart --workdir $(WORKDIR)

# The linter first, then the tests: two workers (the machines have 2 cores), one test file per
# worker at a time so module-scoped fixtures are built once.
test: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=20 tests

clean:
	rm -rf $(VENV) workdir
