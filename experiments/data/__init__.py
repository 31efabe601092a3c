"""Datasets for the experiments: whole splits in memory as uint8, labels possibly noisy.

`load_dataset` returns a `Dataset` of NumPy arrays; the trainer puts the images on the
device once and augments each batch there with `experiments.data.augment`. Label noise is
applied here, once and seeded, so ``train_labels`` (trained on) and ``train_true_labels``
(clean) always come together.
"""

import dataclasses
import os

import numpy as np

from experiments.data import cifar, digits, noise

DATASETS = ('cifar10', 'cifar100', 'cifar10_n', 'digits')
NOISE_TYPES = ('symmetric', 'asymmetric')
# Raised by `load_dataset` for a TFDS dataset that is not prepared under `data_dir`.
DatasetNotFoundError = cifar.DatasetNotFoundError


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A dataset held in memory.

    Attributes:
      name: the name given to `load_dataset`.
      num_classes: number of classes.
      train_images: uint8 ``(N, H, W, C)``.
      train_labels: int32 ``(N,)``, the labels trained on (noisy when noise is applied, or
        the human labels of cifar10_n).
      train_true_labels: int32 ``(N,)``, the clean labels.
      test_images: uint8 ``(M, H, W, C)``: the test split, or the held-out validation split
        when ``eval_split == 'validation'``.
      test_labels: int32 ``(M,)``, clean.
      mean: float32 ``(C,)``, per-channel mean of ``train_images / 255``.
      std: float32 ``(C,)``, per-channel standard deviation of ``train_images / 255``.
      eval_split: ``'test'``, or ``'validation'`` when the last training examples were
        held out in place of the test split.
    """

    name: str
    num_classes: int
    train_images: np.ndarray = dataclasses.field(repr=False)
    train_labels: np.ndarray = dataclasses.field(repr=False)
    train_true_labels: np.ndarray = dataclasses.field(repr=False)
    test_images: np.ndarray = dataclasses.field(repr=False)
    test_labels: np.ndarray = dataclasses.field(repr=False)
    mean: np.ndarray
    std: np.ndarray
    eval_split: str = 'test'

    @property
    def num_train(self) -> int:
        return len(self.train_labels)

    @property
    def flipped_indices(self) -> np.ndarray:
        """Indices of the training examples whose trained-on label is wrong."""
        return np.flatnonzero(self.train_labels != self.train_true_labels)


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns the float32 per-channel mean and std of ``images / 255`` (uint8, ``(..., C)``).

    Exact and cheap: a 256-bin histogram per channel, never a float copy of the images.
    """
    values = np.arange(256, dtype=np.float64) / 255.0
    flat = images.reshape(-1, images.shape[-1])
    mean, std = [], []
    for channel in range(flat.shape[1]):
        counts = np.bincount(flat[:, channel], minlength=256) / flat.shape[0]
        mean.append(counts @ values)
        std.append(np.sqrt(counts @ (values - mean[-1]) ** 2))
    return np.asarray(mean, np.float32), np.asarray(std, np.float32)


def _check_args(name, validation_size, label_noise, noise_type) -> None:
    # Everything that can be checked before a (slow) load is checked first.
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; valid names: {', '.join(DATASETS)}.")
    if noise_type not in NOISE_TYPES:
        raise ValueError(f"Unknown noise_type {noise_type!r}; valid: {', '.join(NOISE_TYPES)}.")
    noise.check_rate(label_noise)
    if label_noise and name == 'cifar10_n':
        raise ValueError(
            'cifar10_n already has human label noise; set label_noise=0 (pick the labels '
            'with human_label=...).'
        )
    if label_noise and noise_type == 'asymmetric' and name != 'cifar10':
        raise ValueError(
            f"Asymmetric noise uses the CIFAR-10 class map and cannot apply to {name}; use "
            "noise_type='symmetric'."
        )
    if validation_size < 0:
        raise ValueError(f'validation_size must be >= 0, got {validation_size}.')


def load_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    validation_size: int = 0,
    label_noise: float = 0.0,
    noise_type: str = 'symmetric',
    noise_seed: int = 0,
    human_label: str = 'worse_label',
) -> Dataset:
    """Loads a dataset into memory, optionally holding out a validation split and adding noise.

    Args:
      name: one of `DATASETS`: ``'cifar10'``, ``'cifar100'``, ``'cifar10_n'`` (CIFAR-10
        with real human label noise) or ``'digits'`` (scikit-learn's 8x8 digits, offline).
      data_dir: TFDS data directory holding the prepared (ArrayRecord) dataset; None means
        TFDS's default. Ignored by ``'digits'``.
      validation_size: if > 0, the last `validation_size` training examples become the
        evaluation split in place of the test split (with clean labels).
      label_noise: fraction of the remaining training labels to corrupt, in ``[0, 1)``.
      noise_type: ``'symmetric'`` (any other class, uniformly) or ``'asymmetric'`` (the
        CIFAR-10 class map, cifar10 only); see `experiments.data.noise`.
      noise_seed: seed of the corruption.
      human_label: cifar10_n only: which human label field to train on, one of
        `experiments.data.cifar.HUMAN_LABELS`; ``'worse_label'`` is the noisiest (40%).

    Returns:
      A `Dataset`; its ``flipped_indices`` are the examples whose label is wrong. Its
      ``mean``/``std`` are measured on the training images (the reference PyTorch code uses
      CIFAR-10's, ``(125.3, 123.0, 113.9) / 255`` and ``(63.0, 62.1, 66.7) / 255``, for
      both CIFARs: a small per-channel difference).

    Raises:
      DatasetNotFoundError: a TFDS dataset is not prepared under `data_dir` (it is never
        downloaded); the message says how to prepare it.
      ValueError: an unknown name or an invalid argument.

    Examples:
      >>> ds = load_dataset('digits', label_noise=0.2, noise_seed=0)
      >>> ds.train_images.shape, ds.num_classes, len(ds.flipped_indices)
      ((1438, 8, 8, 1), 10, 288)
    """
    _check_args(name, validation_size, label_noise, noise_type)
    if name == 'digits':
        train, test, num_classes = digits.load_digits()
    else:
        train, test, num_classes = cifar.load_cifar(
            name, data_dir=data_dir, human_label=human_label
        )
    eval_split = 'test'
    if validation_size:
        num_train = len(train['label'])
        if validation_size >= num_train:
            raise ValueError(
                f'validation_size must be below the {num_train} training examples of {name}, '
                f'got {validation_size}.'
            )
        test = {key: train[key][-validation_size:] for key in ('image', 'label')}
        train = {key: value[:-validation_size] for key, value in train.items()}
        eval_split = 'validation'
    true_labels = train['label']
    labels = train.get('noisy_label', true_labels)
    if label_noise and noise_type == 'symmetric':
        labels, _ = noise.symmetric_noise(true_labels, label_noise, num_classes, noise_seed)
    elif label_noise:
        labels, _ = noise.asymmetric_noise(true_labels, label_noise, noise_seed)
    mean, std = channel_stats(train['image'])
    return Dataset(
        name=name,
        num_classes=num_classes,
        train_images=train['image'],
        train_labels=labels,
        train_true_labels=true_labels,
        test_images=test['image'],
        test_labels=test['label'],
        mean=mean,
        std=std,
        eval_split=eval_split,
    )
