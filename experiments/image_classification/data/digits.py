"""scikit-learn's 8x8 handwritten digits: a tiny, offline dataset for demos and tests.

1,797 grey images with values 0..16, shipped inside scikit-learn, so it needs neither the
internet nor a TFDS data directory. They are rescaled to uint8 0..255 and given a channel
axis so that the trainer treats them exactly like CIFAR images.
"""

import importlib.util
import os

import numpy as np

NUM_CLASSES = 10
# The file scikit-learn's `load_digits` reads (64 pixel columns, then the label).
_CSV = os.path.join('datasets', 'data', 'digits.csv.gz')


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Returns sorted ``(train_indices, test_indices)``, `test_fraction` of every class held out.

    Each class contributes ``round(test_fraction * count)`` test examples, drawn with a
    seeded `numpy.random.Generator`, so the class balance of both splits matches the data.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f'test_fraction must be in (0, 1), got {test_fraction}; pass e.g. 0.2.')
    rng = np.random.default_rng(seed)
    test = []
    for label in np.unique(labels):  # sorted: the draws do not depend on label order
        members = np.flatnonzero(labels == label)
        test.append(rng.choice(members, int(round(test_fraction * members.size)), replace=False))
    test = np.sort(np.concatenate(test))
    return np.setdiff1d(np.arange(labels.size), test), test


def load_digits(
    *, test_fraction: float = 0.2, seed: int = 0
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], int]:
    """Loads the digits as uint8 ``(N, 8, 8, 1)`` images with a seeded stratified split.

    Args:
      test_fraction: fraction of every class held out as the test split.
      seed: seed of the split; the same seed always gives the same split.

    Returns:
      ``(train, test, num_classes)``; each split is a dict with ``'image'`` (N, 8, 8, 1)
      uint8 in 0..255 and ``'label'`` (N,) int32. The default split has 1,438 train and
      359 test images.

    Examples:
      >>> train, test, num_classes = load_digits()
      >>> train['image'].shape, test['image'].shape, num_classes
      ((1438, 8, 8, 1), (359, 8, 8, 1), 10)
    """
    pixels, target = _read_digits()
    # 0..16 -> 0..255 with rounding, so 16 maps to 255 exactly.
    images = np.round(pixels.reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = target.astype(np.int32)
    train, test = stratified_split(labels, test_fraction, seed)
    return (
        {'image': images[train], 'label': labels[train]},
        {'image': images[test], 'label': labels[test]},
        NUM_CLASSES,
    )


def _read_digits() -> tuple[np.ndarray, np.ndarray]:
    """``(pixels (1797, 64) float, labels (1797,))``, as ``sklearn.datasets.load_digits``.

    The CSV that scikit-learn ships is read directly when it is where scikit-learn keeps it:
    importing scikit-learn costs ~1.7 s, paid by every process that trains on digits.
    """
    spec = importlib.util.find_spec('sklearn')  # finds the package without importing it
    folders = (spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = os.path.join(folder, _CSV)
        if os.path.exists(path):
            data = np.loadtxt(path, delimiter=',')
            return data[:, :-1], data[:, -1].astype(int)
    from sklearn import datasets

    digits = datasets.load_digits()
    return digits.data, digits.target
