"""CIFAR-10, CIFAR-100 and CIFAR-10N as in-memory uint8 NumPy arrays, via `tfds.data_source`.

A split is opened, not read (``experiments.runtime.tfds_source``, which never downloads):
the trainer reads (in chunks) just the rows of its own data shards (the whole split, 50,000
32x32x3 images or 150 MB, on one process), puts them on the device once and augments there.
"""

import os
from collections.abc import Callable

import numpy as np

from experiments.runtime import tfds_source

NUM_CLASSES = {'cifar10': 10, 'cifar100': 100, 'cifar10_n': 10}
# The alternative label fields of CIFAR-10N's train split (Wei et al., ICLR 2022):
# 'worse_label' (40.2% noise) is the hardest; 'aggre_label' (9.0%) is the majority vote.
HUMAN_LABELS = ('worse_label', 'aggre_label', 'random_label1', 'random_label2', 'random_label3')
# The human labels need files TFDS cannot download (see tfds_source.prepare_hint).
_CIFAR10N_NOTE = ' (cifar10_n also needs the CIFAR-10N label files in DIR/downloads/manual)'


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
      tfds_source.DatasetNotFoundError: the dataset is not prepared as ArrayRecord under `data_dir`.
    """
    if name not in NUM_CLASSES:
        raise ValueError(f'Unknown CIFAR dataset {name!r}; choose one of {sorted(NUM_CLASSES)}.')
    if name == 'cifar10_n' and human_label not in HUMAN_LABELS:
        raise ValueError(f'Unknown cifar10_n label {human_label!r}; choose one of {HUMAN_LABELS}.')

    def opened(split, keys):
        note = _CIFAR10N_NOTE if name == 'cifar10_n' else ''
        source = tfds_source.open_split(name, split, data_dir, note=note)

        def read(rows):
            columns = tfds_source.read_rows(source, rows, keys)
            columns['label'] = columns['label'].astype(np.int32)
            if human_label in columns:
                columns['noisy_label'] = columns.pop(human_label).astype(np.int32)
            return columns

        return len(source), read

    train_keys = ('image', 'label', human_label) if name == 'cifar10_n' else ('image', 'label')
    return opened('train', train_keys), opened('test', ('image', 'label')), NUM_CLASSES[name]
