# cmevlm: `make demo` and `make test` each bootstrap .venv first (idempotent: a second run
# with nothing changed installs nothing).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# This stack on small CPU machines (see PITFALLS.md): one BLAS thread per process, no Ray
# usage reporting, no token auth for the local Ray, never reach a model hub.
export OMP_NUM_THREADS ?= 1
export RAY_USAGE_STATS_ENABLED := 0
export RAY_AUTH_MODE := disabled
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# DeepSpeed's CPU communication op, compiled once at install (~40 s) instead of in every test.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions

.PHONY: install demo test clean

install: $(STAMP)

# torch first, alone, as the CPU build: anything else could pull a multi-GB CUDA build.
# Then the exact lock, then the project itself without dependencies.
$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@if $(BIN)/python -m pip show torchvision >/dev/null 2>&1; then \
		echo "torchvision is installed: it breaks transformers imports on CPU torch; remove it" >&2; exit 1; fi
	$(BIN)/python -c "from deepspeed.accelerator import get_accelerator; get_accelerator().create_op_builder('ShareMemCommBuilder').load()" 2>&1 | tail -1
	@touch $@

demo: install
	$(BIN)/cmevlm demo

test: install
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) runs .pytest_cache
