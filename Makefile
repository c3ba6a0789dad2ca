# The two set-up commands of the README:
#   make run    install everything (first time) and run the embedded default pipeline
#   make test   install everything (first time) and run lint, type check and the tests
# Both work on a fresh machine with Python 3.11 and network access to PyPI.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: run test install lint typecheck lock clean

$(STAMP): pyproject.toml requirements/lock-cpu.txt
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: its CPU build (+cpu) satisfies torch==2.13.0 in the lock.
	# On a machine whose pip has no local CPU wheel, add
	#   PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
	# to avoid the ~3 GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c requirements/lock-cpu.txt -e '.[dev]'
	# PyPI's torchvision/torchaudio break `from transformers import Trainer` beside the
	# CPU torch (operator torchvision::nms does not exist); nothing here needs them.
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/slothflow run

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

test: $(STAMP)
	$(MAKE) --no-print-directory lint typecheck
	$(BIN)/python -m pytest -m "not gpu" --durations=20 $(PYTEST_ARGS)

# Regenerate the full transitive lock after changing pins in pyproject.toml.
lock: $(STAMP)
	$(BIN)/pip freeze --exclude-editable | grep -v -E '^(torchvision|torchaudio|torchcodec)==' \
	  | sed -E 's/^torch==2.13.0\+cpu$$/torch==2.13.0/' > requirements/lock-cpu.txt

clean:
	rm -rf $(VENV) .slothflow .pytest_cache .mypy_cache .ruff_cache
