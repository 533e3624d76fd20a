# kiv: `make test` and `make demo` set up (or reuse) the environment first.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
DEMO_ARGS ?=
export KIV_VENV := $(VENV)

.PHONY: env test test-quick demo lint clean-env

env:
	@bash tools/setup/bootstrap.sh

test: env
	$(PY) -m pytest tests $(PYTEST_ARGS)

test-quick: env
	$(PY) -m pytest tests -m "not slow" $(PYTEST_ARGS)

demo: env
	$(PY) tools/demo.py $(DEMO_ARGS)

lint: env
	$(PY) -m flake8 kiv tools tests projects

clean-env:
	rm -rf $(VENV)
