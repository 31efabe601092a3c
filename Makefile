# The README's contract: `make demo` runs the main job, `make test` runs the tests.
# Both create .venv on first use; a stamp file makes the second run skip the install.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp-install

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[experiments,dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m experiments.demo --workdir runs/demo

test: $(STAMP)
	$(PY) -m pytest -n 2 --cov --cov-report=term $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check vasso_jax experiments tests

bench: $(STAMP)
	$(PY) -m experiments.benchmarks.run --output BENCHMARKS.md

clean:
	rm -rf $(VENV) runs .pytest_cache .coverage
