# Two commands set up everything on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_VERSION := 25.3

.PHONY: demo test lint format venv clean gpu-acceptance

venv: $(VENV)/.installed

# Re-installs when pyproject.toml changes; exact pins keep it to the CPU torch wheel.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip==$(PIP_VERSION)
	$(VENV)/bin/pip install --quiet -e '.[serve,train,dev,playground]'
	touch $@

demo: venv
	$(PY) scripts/demo.py

# The suite without the end-to-end tests (marked slow: real Cog servers, training processes); CI runs those next.
test: venv lint
	$(PY) -m pytest -q -m "not slow and not gpu and not browser"

# The end-to-end tests: every test marked slow but the toy checkpoint's retraining (docs/toy-world.md).
.PHONY: test-slow
test-slow: venv
	$(PY) -m pytest -q -m "slow and not retraining and not gpu and not browser"

# Builds the CPU image jsd:cpu offline from the root Dockerfile (tiny checkpoint baked in) and checks the running
# container; starts (and stops) a Docker daemon when none runs. See docs/container.md.
.PHONY: container-test
container-test: venv
	scripts/container_test.sh

# The same for the CUDA image jsd:cuda (PyPI's CUDA torch; no GPU needed to build or check it). Not run in CI:
# it downloads 2.7 GB of wheels once (kept in build/container/) and makes a 9 GB image. See docs/container.md.
.PHONY: container-test-cuda
container-test-cuda: venv
	scripts/container_test.sh --cuda

# deploy/ (Compose + HAProxy) with 3 CPU replicas of jsd:cpu (built as container-test builds it when missing) and a
# proxy image of Debian's haproxy from debootstrap, checked through the proxy. See docs/self-hosting.md.
.PHONY: cluster-test
cluster-test: venv
	scripts/cluster_test.sh

# The browser playground (docs/playground.md): on 127.0.0.1:7860, over a coglet it starts on weights/.
.PHONY: playground playground-test
playground: venv
	$(PY) -m jsd playground $(ARGS)

# The playground in headless Debian Chromium (installed here when missing; never a browser download).
playground-test: venv
	@dpkg -s chromium fonts-ipafont-gothic >/dev/null 2>&1 || \
		scripts/apt_install.sh chromium fonts-ipafont-gothic
	$(PY) -m pytest tests/playground -m browser -q

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# On a CUDA host: every GPU claim measured in one go (docs/gpu-acceptance.md); refuses without CUDA.
gpu-acceptance: venv
	$(PY) benchmarks/gpu_acceptance.py $(ARGS)

clean:
	rm -rf $(VENV) .cog outputs
