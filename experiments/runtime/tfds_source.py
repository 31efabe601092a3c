"""Prepared TFDS datasets, read by row through `tfds.data_source`, never downloaded.

Task-free: any task whose data is a TFDS dataset opens its splits here. `tfds.data_source`
reads prepared ArrayRecord files with random access and needs no TensorFlow; a split is
opened, not read, and :func:`read_rows` then decodes just the records asked for, in batched
reads (so a process of a multi-host run reads only its own shards).

Nothing is ever downloaded: training machines may be offline, and a silent multi-minute
download (or a half-written data_dir) is worse than a one-line error that names the fix.
"""

import os

import numpy as np

from experiments.runtime import errors

# Records per read: big enough for ArrayRecord's parallel batched reads to pay off (about
# 15x faster than one read per record), small enough to keep the decoded chunk cheap.
CHUNK = 2048


class DatasetNotFoundError(errors.BadInputError):
    """The TFDS dataset is not prepared (as ArrayRecord) under the data directory."""


def prepare_hint(name: str, data_dir: str | os.PathLike | None, note: str = '') -> str:
    """The one-line message of :class:`DatasetNotFoundError`: where, and how to prepare it.

    ``note`` is said after the prepare command (e.g. files the builder needs by hand).
    """
    where = data_dir or '$TFDS_DATA_DIR (default ~/tensorflow_datasets)'
    return (
        f"TFDS dataset '{name}' is not prepared as array_record in {where}; point"
        ' --config.data_dir at a directory that holds it, or prepare one on a machine with'
        ' internet and tensorflow: python -c "import tensorflow_datasets as tfds;'
        f" tfds.builder('{name}', data_dir='DIR', file_format='array_record')"
        f'.download_and_prepare()"{note}, then copy DIR here.'
    )


def open_split(name: str, split: str, data_dir: str | os.PathLike | None = None, *,
               note: str = ''):
    """Returns the random-access `tfds.data_source` of a prepared split; never downloads.

    Args:
      name: the TFDS name, e.g. ``'cifar10'``, ``'ted_multi_translate'``.
      split: e.g. ``'train'``.
      data_dir: TFDS data directory; None means TFDS's default.
      note: added to the error's hint (see :func:`prepare_hint`).

    Raises:
      DatasetNotFoundError: the dataset is not prepared as ArrayRecord under `data_dir`.
    """
    import tensorflow_datasets as tfds  # here: ~0.8 s, not paid by runs on other data

    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except (KeyError, NotImplementedError) as e:
        # tfds signals "never prepared" with a KeyError (no splits recorded) and "prepared,
        # but as TFRecord" (no random access) with NotImplementedError. A KeyError from a
        # prepared dataset is a different problem: let it through.
        if isinstance(e, KeyError) and tfds.builder(name, data_dir=data_dir).is_prepared():
            raise
        raise DatasetNotFoundError(prepare_hint(name, data_dir, note)) from e


def read_examples(source, rows):
    """The examples ``rows`` (any order) of ``source``, yielded one at a time, read
    :data:`CHUNK` records per batched read."""
    rows = np.asarray(rows, np.int64).reshape(-1)
    for start in range(0, len(rows), CHUNK):
        # Batched reads: ArrayRecord fetches a list of records in parallel threads.
        yield from source.__getitems__(rows[start:start + CHUNK].tolist())


def read_rows(source, rows, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Reads the fields `keys` of the examples ``rows`` (any order) into stacked arrays.

    Only those records are read and decoded.
    """
    columns = {key: [] for key in keys}
    for example in read_examples(source, rows):
        for key in keys:
            columns[key].append(example[key])
    return {key: np.stack(values) for key, values in columns.items()}
