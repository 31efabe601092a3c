"""Shared fixtures for the training-code tests."""

import os
import subprocess
import sys
import textwrap

import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.testing import mocking

NUM_MOCK = 40
# Fixtures, and the scripts that made them with the code before #12 (not importable now).
collect_ignore_glob = ['data/*']


def _getitems(*args, generator, serialized=False):
    """What tfds' mocked ``__getitems__`` should do (the record keys are the last arg)."""
    del serialized
    return [generator[key] for key in args[-1]]


@pytest.fixture
def mock_tfds(monkeypatch):
    # tfds 4.9.x's mock_data installs `__getitems__` on a MagicMock without binding `self`,
    # so a batched read raises TypeError; `__getitem__` is fine. Keep mock_data's random
    # examples but make batched reads work for the duration of the test.
    monkeypatch.setattr(mocking, '_getitems', _getitems)
    with tfds.testing.mock_data(num_examples=NUM_MOCK):
        yield


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Runs the CLI under mock data; the fix above for batched mocked reads is applied too.
_MOCK_CLI = textwrap.dedent("""
    import runpy, sys
    import tensorflow_datasets as tfds
    from tensorflow_datasets.testing import mocking
    from tests.experiments import conftest
    mocking._getitems = conftest._getitems
    with tfds.testing.mock_data(num_examples=int(sys.argv[1])):
        sys.argv = ['experiments.train', *sys.argv[2:]]
        runpy.run_module('experiments.train', run_name='__main__', alter_sys=True)
""")


def cli_command(args, *, mock_examples=None):
    """The training CLI's command line, under TFDS mock data when ``mock_examples``."""
    if mock_examples:
        return [sys.executable, '-c', _MOCK_CLI, str(mock_examples), *args]
    return [sys.executable, '-m', 'experiments.train', *args]


def cli_env(env=None):
    """The environment of a training process: this checkout importable, and the test
    session's (the root ``conftest.py``: its XLA compilation cache)."""
    return {**os.environ, 'PYTHONPATH': REPO, **(env or {})}


def run_cli(args, *, mock_examples=None, env=None, timeout=600):
    """Runs the training CLI to completion and returns the CompletedProcess."""
    return subprocess.run(cli_command(args, mock_examples=mock_examples), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env=cli_env(env))
