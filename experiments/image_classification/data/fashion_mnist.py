"""Fashion-MNIST (Xiao et al., 2017): 70,000 real 28x28 grey images of 10 clothing classes.

Two routes to the same arrays, so the study runs offline:

- a folder holding the original idx files (``train-images-idx3-ubyte[.gz]``,
  ``train-labels-idx1-ubyte[.gz]``, ``t10k-images-idx3-ubyte[.gz]``,
  ``t10k-labels-idx1-ubyte[.gz]``): ``--config.data_dir`` pointing at it, or the folder that
  Debian's ``dataset-fashion-mnist`` package installs (``apt-get install
  dataset-fashion-mnist``), found automatically;
- TFDS's prepared ``fashion_mnist`` (ArrayRecord) under ``data_dir``, through
  ``tfds.data_source`` like CIFAR, for machines that prepared it online.

The whole dataset is 55 MB of uint8, so it is read once into memory either way.
"""

import gzip
import os

import numpy as np

from experiments.runtime import tfds_source

NUM_CLASSES = 10
CLASS_NAMES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt',
               'Sneaker', 'Bag', 'Ankle boot')
# Where Debian's dataset-fashion-mnist package puts the original idx files.
DEBIAN_DIR = '/usr/share/datasets/fashion-mnist'
_FILES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}
_IDX_DTYPE = {0x08: np.uint8}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads one idx file (optionally gzipped) of unsigned bytes into a NumPy array.

    The idx format (LeCun et al.): two zero bytes, a type code (0x08 = unsigned byte), the
    number of dimensions, one big-endian int32 per dimension, then the data in C order.

    Raises:
      ValueError: the file is not a well-formed idx file of unsigned bytes.
    """
    opener = gzip.open if os.fspath(path).endswith('.gz') else open
    with opener(path, 'rb') as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPE:
        raise ValueError(f'{path} is not an idx file of unsigned bytes (bad magic number).')
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(n) for n in np.frombuffer(raw[4:header], '>i4'))
    data = np.frombuffer(raw[header:], _IDX_DTYPE[raw[2]])
    if data.size != int(np.prod(shape)):
        raise ValueError(
            f'{path} is truncated or padded: the header says {shape}, '
            f'the file holds {data.size} values.'
        )
    return data.reshape(shape)


def _idx_path(folder: str, stem: str) -> str | None:
    for name in (stem, stem + '.gz'):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def idx_folder(data_dir: str | os.PathLike | None) -> str | None:
    """The folder holding all four idx files: ``data_dir`` or ``data_dir/fashion-mnist`` when
    a data_dir is given (an explicit choice is never second-guessed), else Debian's; None
    where none does."""
    if data_dir:
        candidates = [os.fspath(data_dir), os.path.join(os.fspath(data_dir), 'fashion-mnist')]
    else:
        candidates = [DEBIAN_DIR]
    for folder in candidates:
        if all(_idx_path(folder, stem) for pair in _FILES.values() for stem in pair):
            return folder
    return None


def _read_split(folder: str, split: str) -> dict[str, np.ndarray]:
    images_stem, labels_stem = _FILES[split]
    images = read_idx(_idx_path(folder, images_stem))
    labels = read_idx(_idx_path(folder, labels_stem))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f'Fashion-MNIST {split} files in {folder} disagree: images {images.shape}, '
            f'labels {labels.shape}.'
        )
    if labels.size and labels.max() >= NUM_CLASSES:
        raise ValueError(f'Fashion-MNIST {split} labels in {folder} exceed {NUM_CLASSES - 1}.')
    return {'image': images[..., None], 'label': labels.astype(np.int32)}


def _read_tfds(data_dir) -> tuple[dict, dict] | None:
    try:
        sources = [tfds_source.open_split('fashion_mnist', s, data_dir) for s in ('train', 'test')]
    except tfds_source.DatasetNotFoundError:
        return None

    def read(source):
        columns = tfds_source.read_rows(source, np.arange(len(source)), ('image', 'label'))
        return {'image': columns['image'].astype(np.uint8),
                'label': columns['label'].astype(np.int32)}

    return read(sources[0]), read(sources[1])


def not_found_message(data_dir) -> str:
    where = data_dir or DEBIAN_DIR
    return (
        f'Fashion-MNIST not found in {where}: install the idx files offline with '
        '`apt-get install dataset-fashion-mnist` (or point --config.data_dir at a folder holding '
        'them), or prepare TFDS fashion_mnist as array_record under --config.data_dir.'
    )


def load_fashion_mnist(
    data_dir: str | os.PathLike | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]:
    """Loads Fashion-MNIST as uint8 ``(N, 28, 28, 1)`` images and int32 labels.

    Args:
      data_dir: a folder of the original idx files (gzipped or not; also found in its
        ``fashion-mnist`` subfolder), or a TFDS data directory with ``fashion_mnist``
        prepared; None reads Debian's folder, `DEBIAN_DIR`.

    Returns:
      ``(train, test, num_classes)``: dicts with ``'image'`` and ``'label'``; 60,000 train and
      10,000 test examples for the real data.

    Raises:
      tfds_source.DatasetNotFoundError: neither route has the data; the message names both.
    """
    folder = idx_folder(data_dir)
    if folder is not None:
        return _read_split(folder, 'train'), _read_split(folder, 'test'), NUM_CLASSES
    if data_dir:
        splits = _read_tfds(data_dir)
        if splits is not None:
            return splits[0], splits[1], NUM_CLASSES
    raise tfds_source.DatasetNotFoundError(not_found_message(data_dir))
