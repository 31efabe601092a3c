"""Shared fixtures for the training-code tests."""

import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.testing import mocking

NUM_MOCK = 40


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
