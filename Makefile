# Set-up and checks. `make test` works on a fresh machine: venv, dependencies, Fashion-MNIST, tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision pins that pip takes from this machine kind's disk (CUDA build, runs on CPU).
# Override elsewhere, e.g. `make setup TORCH_SPEC="torch torchvision"`.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: setup data lint test test-fast test-slow run bench-model clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[test,optuna]'
	touch $@

# Debian's dataset-fashion-mnist puts the idx files under /usr/share/datasets/fashion-mnist.
data:
	@if [ -d /usr/share/datasets/fashion-mnist ]; then echo "Fashion-MNIST: /usr/share/datasets/fashion-mnist"; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	else echo "no apt-get: Fashion-MNIST tests use data fetched by torchvision when online, else skip"; fi

lint: setup
	$(PY) -m ruff check .

test: setup data
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not integration and not slow" $(PYTEST_ARGS)

# The cases the default run leaves out because a benchmark covers them (pyproject: -m "not slow").
test-slow: setup data
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

# The main job on embedded defaults: local Ray, ./artifacts, sqlite MLflow, Fashion-MNIST.
run: setup data
	$(PY) -m pipelines run --config configs/local.yaml

bench-model: setup
	$(PY) benchmarks/bench_model.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
