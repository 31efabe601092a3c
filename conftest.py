"""Repository-wide pytest setup.

- Doctests of the Flax integrations need flax (the `flax` extra); skip them without it.
- One XLA compilation cache per test session, shared by every training process the tests
  start (``tests/experiments/conftest.py:cli_env``) and by the pytest-xdist workers: a CLI
  run that repeats an earlier one (a resume, a rerun after a fault) skips its compiling. The
  test processes themselves do not use it, so the tests that count compilations in-process
  still see every one. The folder is removed when the session ends.
- ``make test`` hands out whole files (``--dist loadfile``: a module's fixtures are built
  once), the files with the most slow tests first, so that the workers fill in with the quick
  ones at the end instead of one of them finishing a long file alone.
"""

import collections
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
    slow = collections.Counter(item.path for item in items if item.get_closest_marker('slow'))
    items.sort(key=lambda item: -slow[item.path])  # stable: each file's tests stay in order
