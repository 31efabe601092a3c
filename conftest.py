"""Repository-wide pytest setup.

- Doctests of the Flax integrations need flax (the `flax` extra); skip them without it.
- One persistent XLA compilation cache per test session, shared by the pytest-xdist workers
  and every process the tests start (they inherit the environment): a test that builds an
  executable an earlier test built (the same model and step; a resume; a rerun after a fault)
  loads it instead of compiling it again. Compiling is over half of the training tests' time
  on CPU. Compilation counters still see every executable: jax emits
  ``/jax/core/compile/backend_compile_duration`` around a cache load as around a compile.
  Only compilations over 0.2 s are stored. The folder is removed when the session ends; a
  user's own ``JAX_COMPILATION_CACHE_DIR`` is left alone.
- XLA:CPU compiles at LLVM -O0 (``XLA_FLAGS``, also inherited): about a quarter faster to
  compile, and the tests check results, not speed. A user's own optimisation level is kept.
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

# The getting-started page's code: 9.1 s -> 7.0 s (two runs each). It rounds differently from
# the default level, so the checksums recorded before the restructure are checked in processes
# at the default level (test_compat.py).
FAST_COMPILE = '--xla_backend_optimization_level=0'


def pytest_configure(config):
    # The controller runs first (before jax is imported: nothing here imports it) and the
    # xdist workers and the tests' subprocesses inherit its environment.
    if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
        config._vasso_jax_xla_cache = os.path.join(
            tempfile.gettempdir(), f'vasso_jax_tests_xla_cache_{uuid.uuid4().hex[:12]}')
        os.environ['JAX_COMPILATION_CACHE_DIR'] = config._vasso_jax_xla_cache
        os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.2')
    if 'xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
        os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()


def pytest_unconfigure(config):
    if getattr(config, '_vasso_jax_xla_cache', None):
        os.environ.pop('JAX_COMPILATION_CACHE_DIR', None)
        shutil.rmtree(config._vasso_jax_xla_cache, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    slow = collections.Counter(item.path for item in items if item.get_closest_marker('slow'))
    items.sort(key=lambda item: -slow[item.path])  # stable: each file's tests stay in order
