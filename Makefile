# The README's contract: `make demo` runs the main job, `make test` runs the tests.
# Both create .venv on first use; a stamp file makes the second run skip the install.
# `make docs` builds the documentation site (docs/) into docs/_build/html, warnings as errors.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp-install
DOCS_STAMP := $(VENV)/.stamp-docs

.PHONY: install demo test coverage lint bench docs clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[experiments,dev]'
	touch $(STAMP)

# The docs need only the library, Flax and Sphinx: a fresh clone's `make docs` installs those.
$(DOCS_STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[docs]'
	touch $(DOCS_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m experiments.demo --workdir runs/demo

# All tests in one run, whole files to each of 2 workers (a module's fixtures are built once).
# `make coverage` adds the library's coverage report (its own tests): coverage tracing slows
# the training system's JAX tracing and CLI subprocesses by about a quarter.
test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile --durations=15 $(PYTEST_ARGS)

coverage: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile --cov --cov-report=term --ignore=tests/experiments \
		$(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check vasso_jax experiments tests docs

docs: $(DOCS_STAMP)
	$(PY) -m sphinx -W --keep-going -E -b html docs docs/_build/html

bench: $(STAMP)
	$(PY) -m experiments.benchmarks.run --output BENCHMARKS.md
	$(PY) -m experiments.benchmarks.translation --output BENCHMARKS.md
	$(PY) -m experiments.benchmarks.trainer_cost --output BENCHMARKS.md

clean:
	rm -rf $(VENV) runs .pytest_cache .coverage docs/_build docs/api
