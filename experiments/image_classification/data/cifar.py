"""CIFAR-10, CIFAR-100 and CIFAR-10N as in-memory uint8 NumPy arrays, via `tfds.data_source`.

`tfds.data_source` reads prepared ArrayRecord files with random access and needs no
TensorFlow. A split is opened, not read: the trainer reads (in chunks) just the rows of its
own data shards (the whole split, 50,000 32x32x3 images or 150 MB, on one process), puts them
on the device once and augments there.

Nothing is ever downloaded: training machines may be offline, and a silent multi-minute
download (or a half-written data_dir) is worse than a one-line error that names the fix.
"""

import os
from collections.abc import Callable

import numpy as np
import tensorflow_datasets as tfds

from experiments.runtime import errors

NUM_CLASSES = {'cifar10': 10, 'cifar100': 100, 'cifar10_n': 10}
# The alternative label fields of CIFAR-10N's train split (Wei et al., ICLR 2022):
# 'worse_label' (40.2% noise) is the hardest; 'aggre_label' (9.0%) is the majority vote.
HUMAN_LABELS = ('worse_label', 'aggre_label', 'random_label1', 'random_label2', 'random_label3')
# Records per read: big enough for ArrayRecord's parallel batched reads to pay off (about
# 15x faster than one read per record), small enough to keep the decoded chunk cheap.
_CHUNK = 2048


class DatasetNotFoundError(errors.BadInputError):
    """The TFDS dataset is not prepared (as ArrayRecord) under the data directory."""


def _prepare_hint(name: str, data_dir: str | os.PathLike | None) -> str:
    where = data_dir or '$TFDS_DATA_DIR (default ~/tensorflow_datasets)'
    manual = (
        ' (cifar10_n also needs the CIFAR-10N label files in DIR/downloads/manual)'
        if name == 'cifar10_n'
        else ''
    )
    return (
        f"TFDS dataset '{name}' is not prepared as array_record in {where}; point"
        ' --config.data_dir at a directory that holds it, or prepare one on a machine with'
        ' internet and tensorflow: python -c "import tensorflow_datasets as tfds;'
        f" tfds.builder('{name}', data_dir='DIR', file_format='array_record')"
        f'.download_and_prepare()"{manual}, then copy DIR here.'
    )


def open_split(name: str, split: str, data_dir: str | os.PathLike | None = None):
    """Returns the random-access `tfds.data_source` of a prepared split; never downloads.

    Raises:
      DatasetNotFoundError: the dataset is not prepared as ArrayRecord under `data_dir`.
    """
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except (KeyError, NotImplementedError) as e:
        # tfds signals "never prepared" with a KeyError (no splits recorded) and "prepared,
        # but as TFRecord" (no random access) with NotImplementedError. A KeyError from a
        # prepared dataset is a different problem: let it through.
        if isinstance(e, KeyError) and tfds.builder(name, data_dir=data_dir).is_prepared():
            raise
        raise DatasetNotFoundError(_prepare_hint(name, data_dir)) from e


def read_rows(source, rows, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Reads the fields `keys` of the examples ``rows`` (any order) into stacked arrays.

    Only those records are read and decoded, so a process of a multi-host run reads just
    its own shards of a split.
    """
    rows = np.asarray(rows, np.int64).reshape(-1)
    columns = {key: [] for key in keys}
    for start in range(0, len(rows), _CHUNK):
        # Batched reads: ArrayRecord fetches a list of records in parallel threads.
        for example in source.__getitems__(rows[start:start + _CHUNK].tolist()):
            for key in keys:
                columns[key].append(example[key])
    return {key: np.stack(values) for key, values in columns.items()}


def open_cifar(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    human_label: str = 'worse_label',
) -> tuple[tuple[int, Callable], tuple[int, Callable], int]:
    """Opens the train and test splits of a prepared CIFAR dataset for reading by row.

    Nothing is read yet: each split comes as ``(size, read)``, where ``read(rows)``
    decodes just the examples ``rows``.

    Args:
      name: ``'cifar10'``, ``'cifar100'`` or ``'cifar10_n'``.
      data_dir: TFDS data directory; None means TFDS's default.
      human_label: cifar10_n only: the human label field trained on, one of
        `HUMAN_LABELS`.

    Returns:
      ``((train_size, read_train), (test_size, read_test), num_classes)``; ``read`` returns
      a dict with ``'image'`` (len(rows), 32, 32, 3) uint8 and the clean ``'label'`` int32;
      cifar10_n's train split also has ``'noisy_label'`` int32, the chosen human labels.

    Raises:
      DatasetNotFoundError: the dataset is not prepared as ArrayRecord under `data_dir`.
    """
    if name not in NUM_CLASSES:
        raise ValueError(f'Unknown CIFAR dataset {name!r}; choose one of {sorted(NUM_CLASSES)}.')
    if name == 'cifar10_n' and human_label not in HUMAN_LABELS:
        raise ValueError(f'Unknown cifar10_n label {human_label!r}; choose one of {HUMAN_LABELS}.')

    def opened(split, keys):
        source = open_split(name, split, data_dir)

        def read(rows):
            columns = read_rows(source, rows, keys)
            columns['label'] = columns['label'].astype(np.int32)
            if human_label in columns:
                columns['noisy_label'] = columns.pop(human_label).astype(np.int32)
            return columns

        return len(source), read

    train_keys = ('image', 'label', human_label) if name == 'cifar10_n' else ('image', 'label')
    return opened('train', train_keys), opened('test', ('image', 'label')), NUM_CLASSES[name]
