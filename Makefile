# kiv: `make test` and `make demo` set up (or reuse) the environment first.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# pytest-xdist workers of `make test` and `make test-quick` (PYTEST_WORKERS=0:
# one process). Whole test files go to a worker (their module and session
# fixtures are built once there), the files with the most slow tests first
# (tests/conftest.py orders them); PYTEST_ARGS come last, so
# PYTEST_ARGS="-n 0 -k foo" runs in one process.
PYTEST_WORKERS ?= 2
PYTEST_XDIST := -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder
DEMO_ARGS ?=
export KIV_VENV := $(VENV)

.PHONY: env test test-quick demo lint clean-env

env:
	@bash tools/setup/bootstrap.sh

test: env
	$(PY) -m pytest tests $(PYTEST_XDIST) $(PYTEST_ARGS)

test-quick: env
	$(PY) -m pytest tests -m "not slow" $(PYTEST_XDIST) $(PYTEST_ARGS)

demo: env
	$(PY) tools/demo.py $(DEMO_ARGS)

lint: env
	$(PY) -m flake8 kiv tools tests projects

clean-env:
	rm -rf $(VENV)
