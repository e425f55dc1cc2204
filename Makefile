VENV := .venv
PY := $(VENV)/bin/python
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test test-unit test-integration test-reliability bench-classifiers bench-embedders bench-serving zoo clean

setup:
	@./scripts/setup.sh

demo: setup
	$(PY) -m serving.cli demo

test: setup
	$(PY) -m pytest -q tests

test-unit: setup
	$(PY) -m pytest -q tests/unit

test-integration: setup
	$(PY) -m pytest -q tests/integration

test-reliability: setup
	$(PY) -m pytest -q tests/reliability

clean:
	rm -rf runs .pytest_cache

bench-serving: setup
	$(PY) scripts/bench_serving.py

bench-classifiers: setup
	$(PY) -m serving.cli bench robust-classifiers

bench-embedders: setup
	$(PY) -m serving.cli bench robust-embedders

# Rebuild the model zoo (hours here; see scripts/train_zoo.sh). On a GPU: make zoo ZOO_ARGS="--set device=auto"
zoo: setup
	./scripts/train_zoo.sh $(ZOO_ARGS)
