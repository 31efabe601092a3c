"""Repository-wide pytest setup.

- Doctests of the Flax integrations need flax (the `flax` extra); skip them without it.
- One XLA compilation cache per test session, shared by every training process the tests
  start (``tests/experiments/conftest.py:cli_env``) and by the pytest-xdist workers: a CLI
  run that repeats an earlier one (a resume, a rerun after a fault) skips its compiling. The
  test processes themselves do not use it, so the tests that count compilations in-process
  still see every one. The folder is removed when the session ends.
- The slow tests run first: pytest-xdist then spreads them over its workers and fills in
  with the fast ones, instead of one worker finishing a long test alone at the end.
"""

import importlib.util
import os
import shutil
import tempfile
import uuid

collect_ignore = (
    [] if importlib.util.find_spec('flax') else ['vasso_jax/nnx.py', 'vasso_jax/linen.py']
)

XLA_CACHE_ENV = 'VASSO_JAX_TEST_XLA_CACHE'


def pytest_configure(config):
    # The controller runs first and the xdist workers inherit its environment.
    if XLA_CACHE_ENV not in os.environ:
        os.environ[XLA_CACHE_ENV] = os.path.join(
            tempfile.gettempdir(), f'vasso_jax_tests_xla_cache_{uuid.uuid4().hex[:12]}')
        config._vasso_jax_owns_xla_cache = True


def pytest_unconfigure(config):
    if getattr(config, '_vasso_jax_owns_xla_cache', False):
        shutil.rmtree(os.environ.pop(XLA_CACHE_ENV), ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.get_closest_marker('slow') is None)  # stable: in order
