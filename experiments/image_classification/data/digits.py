"""scikit-learn's 8x8 handwritten digits: a tiny, offline dataset for demos and tests.

1,797 grey images with values 0..16, shipped inside scikit-learn, so it needs neither the
internet nor a TFDS data directory. They are rescaled to uint8 0..255 and given a channel
axis so that the trainer treats them exactly like CIFAR images.
"""

import numpy as np

NUM_CLASSES = 10


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
    from sklearn import datasets  # here: its ~1 s import is not for runs on other data

    digits = datasets.load_digits()
    # 0..16 -> 0..255 with rounding, so 16 maps to 255 exactly.
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int32)
    train, test = stratified_split(labels, test_fraction, seed)
    return (
        {'image': images[train], 'label': labels[train]},
        {'image': images[test], 'label': labels[test]},
        NUM_CLASSES,
    )
