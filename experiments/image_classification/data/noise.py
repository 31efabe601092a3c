"""Synthetic label noise for the noisy-label experiments, applied once and seeded.

Both corruptions flip an *exact* number of labels (not a Bernoulli draw per label), so a
run at rate 0.4 really trains on 40% wrong labels, and both return the flipped indices so
the corruption can be saved next to the run and audited later.
"""

import os

import numpy as np

# The standard CIFAR-10 asymmetric ("pair") noise of Patrini et al. (2017), used by the
# noisy-label SAM/VaSSO experiments: visually similar classes are confused.
# Classes: 0 airplane, 1 automobile, 2 bird, 3 cat, 4 deer, 5 dog, 6 frog, 7 horse,
# 8 ship, 9 truck.
CIFAR10_ASYMMETRIC_MAP = {
    9: 1,  # truck -> automobile
    2: 0,  # bird -> airplane
    4: 7,  # deer -> horse
    3: 5,  # cat -> dog
    5: 3,  # dog -> cat
}
# Fashion-MNIST pair noise in the same style (ours: no single map is standard for it). Each
# source class flips to the class it is most confused with by classifiers trained on the clean
# data (the upper-body garments, and the three kinds of shoe), as Patrini et al. chose CIFAR-10's
# pairs by visual similarity. Classes: 0 T-shirt/top, 1 trouser, 2 pullover, 3 dress, 4 coat,
# 5 sandal, 6 shirt, 7 sneaker, 8 bag, 9 ankle boot.
FASHION_MNIST_ASYMMETRIC_MAP = {
    0: 6,  # T-shirt/top -> shirt
    6: 0,  # shirt -> T-shirt/top
    2: 4,  # pullover -> coat
    5: 7,  # sandal -> sneaker
    9: 7,  # ankle boot -> sneaker
}
# Datasets with an asymmetric map: name -> {source class: target class}.
ASYMMETRIC_MAPS = {'cifar10': CIFAR10_ASYMMETRIC_MAP, 'fashion_mnist': FASHION_MNIST_ASYMMETRIC_MAP}


def check_rate(rate: float) -> None:
    """Raises a one-line ValueError unless ``0 <= rate < 1``."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f'Label noise rate must be in [0, 1), got {rate}; pass e.g. 0.2.')


def _num_flips(rate: float, count: int) -> int:
    # Nearest integer (ties to even): the realised rate is as close to `rate` as possible.
    return int(round(rate * count))


def symmetric_noise(
    labels: np.ndarray, rate: float, num_classes: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Flips exactly `round(rate * N)` labels, each to a different, uniformly drawn class.

    Each flipped label ``y`` becomes ``(y + k) mod C`` with ``k ~ U{1, ..., C-1}``, i.e.
    uniform over the ``C - 1`` wrong classes (never the true class, so the realised noise
    rate is exactly the requested one).

    Args:
        labels: integer labels of shape ``(N,)`` with values in ``[0, num_classes)``.
        rate: fraction of labels to corrupt, in ``[0, 1)``.
        num_classes: number of classes ``C >= 2``.
        seed: seed of the `numpy.random.Generator`; same seed, same corruption.

    Returns:
        ``(noisy_labels, flipped_indices)``: int32 labels of shape ``(N,)`` and the sorted
        int64 indices of the flipped examples.

    Examples:
        >>> labels = np.arange(10) % 3
        >>> noisy, flipped = symmetric_noise(labels, 0.4, num_classes=3, seed=0)
        >>> len(flipped), bool(np.all(noisy[flipped] != labels[flipped]))
        (4, True)
    """
    check_rate(rate)
    if num_classes < 2:
        raise ValueError(f'Symmetric noise needs num_classes >= 2, got {num_classes}.')
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f'Labels must be in [0, {num_classes}); check num_classes.')
    rng = np.random.default_rng(seed)
    flipped = np.sort(rng.choice(labels.size, _num_flips(rate, labels.size), replace=False))
    shift = rng.integers(1, num_classes, size=flipped.size)
    noisy = labels.astype(np.int32)
    noisy[flipped] = (noisy[flipped] + shift) % num_classes
    return noisy, flipped.astype(np.int64)


def asymmetric_noise(
    labels: np.ndarray, rate: float, seed: int, class_map: dict[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Flips exactly `round(rate * count)` labels of each source class of a class map.

    The default map is `CIFAR10_ASYMMETRIC_MAP` (truck -> automobile, bird -> airplane,
    deer -> horse, cat <-> dog); `FASHION_MNIST_ASYMMETRIC_MAP` is the other one shipped.
    Classes are chosen from the *clean* labels, so cat -> dog and dog -> cat never compound;
    classes outside the map are never touched.

    Args:
        labels: integer labels of shape ``(N,)``.
        rate: fraction of each source class to corrupt, in ``[0, 1)``.
        seed: seed of the `numpy.random.Generator`; same seed, same corruption.
        class_map: ``{source class: target class}``; None means CIFAR-10's.

    Returns:
        ``(noisy_labels, flipped_indices)``: int32 labels of shape ``(N,)`` and the sorted
        int64 indices of the flipped examples.

    Examples:
        >>> labels = np.repeat(np.arange(10), 10)
        >>> noisy, flipped = asymmetric_noise(labels, 0.3, seed=0)
        >>> len(flipped), np.unique(noisy[labels == 9]).tolist()
        (15, [1, 9])
    """
    check_rate(rate)
    class_map = CIFAR10_ASYMMETRIC_MAP if class_map is None else class_map
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    noisy = labels.astype(np.int32)
    flipped = []
    for source in sorted(class_map):  # fixed order: determinism given the seed
        members = np.flatnonzero(labels == source)
        chosen = rng.choice(members, _num_flips(rate, members.size), replace=False)
        noisy[chosen] = class_map[source]
        flipped.append(chosen)
    return noisy, np.sort(np.concatenate(flipped)).astype(np.int64)


def save_noise_audit(
    path: str | os.PathLike,
    true_labels: np.ndarray,
    noisy_labels: np.ndarray,
    flipped_indices: np.ndarray,
) -> None:
    """Writes the corruption to `path` (an .npz, written exactly there) for later audit.

    The file holds ``true_labels``, ``noisy_labels`` and ``flipped_indices``; read it back
    with `numpy.load`.
    """
    # An open file keeps numpy from appending '.npz' to a path the caller chose.
    with open(path, 'wb') as f:
        np.savez(
            f,
            true_labels=np.asarray(true_labels, np.int32),
            noisy_labels=np.asarray(noisy_labels, np.int32),
            flipped_indices=np.asarray(flipped_indices, np.int64),
        )
