"""Datasets for the experiments: uint8 images, labels possibly noisy.

`open_dataset` opens a dataset for reading by row (a `Source`): the trainer reads just the
rows of its own devices' data shards, puts them on the device once and augments each batch
there with `experiments.data.augment`. `load_dataset` reads a whole dataset into a `Dataset`
of NumPy arrays (demos, diagnostics, tests). Label noise is applied to the whole label set,
once and seeded (`trained_labels`), so every process of a run corrupts the same labels and
``train_labels`` (trained on) and ``train_true_labels`` (clean) always come together.
"""

import dataclasses
import os
from collections.abc import Callable

import numpy as np

from experiments.image_classification.data import cifar, digits, fashion_mnist, noise
from experiments.runtime import imports, tfds_source

DATASETS = ('cifar10', 'cifar100', 'cifar10_n', 'digits', 'fashion_mnist')
NOISE_TYPES = ('symmetric', 'asymmetric')
# Raised by `load_dataset` for a TFDS dataset that is not prepared under `data_dir`.
DatasetNotFoundError = tfds_source.DatasetNotFoundError


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


def pixel_counts(images: np.ndarray) -> np.ndarray:
    """int64 ``(C, 256)`` histogram of the uint8 values of each channel of ``images``.

    Histograms add up, so per-shard counts summed over processes give the whole split's.
    """
    flat = np.asarray(images).reshape(-1, images.shape[-1])
    return np.stack([np.bincount(flat[:, c], minlength=256) for c in range(flat.shape[1])])


def stats_from_counts(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The float32 per-channel mean and std of ``images / 255`` from their `pixel_counts`."""
    values = np.arange(256, dtype=np.float64) / 255.0
    mean, std = [], []
    for channel_counts in np.asarray(counts):
        p = channel_counts / channel_counts.sum()
        mean.append(p @ values)
        std.append(np.sqrt(p @ (values - mean[-1]) ** 2))
    return np.asarray(mean, np.float32), np.asarray(std, np.float32)


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns the float32 per-channel mean and std of ``images / 255`` (uint8, ``(..., C)``).

    Exact and cheap: a 256-bin histogram per channel, never a float copy of the images.
    """
    return stats_from_counts(pixel_counts(images))


@dataclasses.dataclass(frozen=True, eq=False)
class Source:
    """A dataset opened for reading by row: nothing is read until asked for.

    Attributes:
      name: the name given to `open_dataset`.
      num_classes: number of classes.
      num_train: number of training examples (without a held-out validation split).
      num_eval: number of evaluation examples.
      eval_split: ``'test'``, or ``'validation'`` when the last training examples are held
        out in place of the test split.
    """

    name: str
    num_classes: int
    num_train: int
    num_eval: int
    eval_split: str
    _read_train: Callable = dataclasses.field(repr=False)
    _read_eval: Callable = dataclasses.field(repr=False)

    def read_train(self, rows) -> dict[str, np.ndarray]:
        """Training examples ``rows``: ``'image'`` uint8 ``(len(rows), H, W, C)``, the clean
        ``'label'`` int32, and for cifar10_n the human ``'noisy_label'`` int32."""
        return self._read_train(_rows(rows, self.num_train))

    def read_eval(self, rows) -> dict[str, np.ndarray]:
        """Evaluation examples ``rows``: ``'image'`` and the clean ``'label'``."""
        return self._read_eval(_rows(rows, self.num_eval))


def _rows(rows, size: int) -> np.ndarray:
    rows = np.asarray(rows, np.int64).reshape(-1)
    if rows.size and (rows.min() < 0 or rows.max() >= size):
        raise IndexError(f'rows must be in [0, {size}), got [{rows.min()}, {rows.max()}].')
    return rows


def _array_reader(columns: dict[str, np.ndarray]) -> tuple[int, Callable]:
    return len(columns['label']), lambda rows: {k: v[rows] for k, v in columns.items()}


def check_name(name: str) -> None:
    """Raises a one-line ValueError for a name that is neither built in nor an import path."""
    if name not in DATASETS and not imports.is_import_path(name):
        raise ValueError(f"Unknown dataset {name!r}; valid names: {', '.join(DATASETS)}, or "
                         'an import path such as my_pkg.data:load.')


def check_noise(name: str, label_noise: float, noise_type: str) -> None:
    """Raises a one-line ValueError for label noise that cannot apply to dataset ``name``."""
    if noise_type not in NOISE_TYPES:
        raise ValueError(f"Unknown noise_type {noise_type!r}; valid: {', '.join(NOISE_TYPES)}.")
    noise.check_rate(label_noise)
    if label_noise and name == 'cifar10_n':
        raise ValueError(
            'cifar10_n already has human label noise; set label_noise=0 (pick the labels '
            'with human_label=...).'
        )
    if label_noise and noise_type == 'asymmetric' and name not in noise.ASYMMETRIC_MAPS:
        raise ValueError(
            f"Asymmetric noise has class maps for {', '.join(noise.ASYMMETRIC_MAPS)} only, not "
            f"{name}; use noise_type='symmetric'."
        )


def open_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    validation_size: int = 0,
    human_label: str = 'worse_label',
    dataset_kwargs: dict | None = None,
    train_subset: int = 0,
) -> Source:
    """Opens a dataset for reading by row, optionally holding out a validation split.

    Args:
      name: one of `DATASETS`: ``'cifar10'``, ``'cifar100'``, ``'cifar10_n'`` (CIFAR-10
        with real human label noise) or ``'digits'`` (scikit-learn's 8x8 digits, offline);
        or an import path ``'my_pkg.data:load'`` of a function that returns ``(train, test,
        num_classes)`` like `experiments.image_classification.data.digits.load_digits`
        (``train`` and ``test`` dicts of ``'image'`` uint8 ``(N, H, W, C)`` and ``'label'``
        int32 ``(N,)``).
      data_dir: TFDS data directory holding the prepared (ArrayRecord) dataset; None means
        TFDS's default. Ignored by ``'digits'``.
      validation_size: if > 0, the last `validation_size` training examples become the
        evaluation split in place of the test split (with clean labels).
      dataset_kwargs: keyword arguments of an import-path dataset's function.
      human_label: cifar10_n only: which human label field to train on, one of
        `experiments.data.cifar.HUMAN_LABELS`; ``'worse_label'`` is the noisiest (40%).
      train_subset: if > 0, train on this many training examples only: a random subset
        drawn once with a fixed seed (0), so every run, optimiser and seed uses the same
        images (after any validation split is held out).

    Returns:
      A `Source`. CIFAR images are read (and decoded) only when asked for; the digits are
      in memory anyway.

    Raises:
      DatasetNotFoundError: a TFDS dataset is not prepared under `data_dir` (it is never
        downloaded); the message says how to prepare it.
      ValueError: an unknown name or an invalid argument.

    Examples:
      >>> source = open_dataset('digits', validation_size=100)
      >>> source.num_train, source.num_eval, source.read_eval([0, 1])['image'].shape
      (1338, 100, (2, 8, 8, 1))
    """
    check_name(name)
    if validation_size < 0:
        raise ValueError(f'validation_size must be >= 0, got {validation_size}.')
    if name == 'fashion_mnist':  # 55 MB: read whole, like the in-memory datasets below
        train, test, num_classes = fashion_mnist.load_fashion_mnist(data_dir)
        (num_train, read_train), (num_eval, read_eval) = _array_reader(train), _array_reader(test)
    elif imports.is_import_path(name) or name == 'digits':
        load = imports.resolve(name) if name != 'digits' else digits.load_digits
        train, test, num_classes = load(**(dataset_kwargs or {}))
        (num_train, read_train), (num_eval, read_eval) = _array_reader(train), _array_reader(test)
    else:
        (num_train, read_train), (num_eval, read_eval), num_classes = cifar.open_cifar(
            name, data_dir=data_dir, human_label=human_label)
    eval_split = 'test'
    if validation_size:
        if validation_size >= num_train:
            raise ValueError(
                f'validation_size must be below the {num_train} training examples of {name}, '
                f'got {validation_size}.'
            )
        num_train, num_eval, eval_split = num_train - validation_size, validation_size, 'validation'

        def read_eval(rows, read=read_train, first=num_train):  # the held-out last examples
            columns = read(first + rows)
            return {'image': columns['image'], 'label': columns['label']}

    if train_subset:
        if not 0 < train_subset <= num_train:
            raise ValueError(
                f'train_subset must be in [1, {num_train}] (the training examples of {name}), '
                f'got {train_subset}; 0 trains on all.'
            )
        subset = np.sort(np.random.default_rng(0).choice(num_train, train_subset, replace=False))
        num_train, read_train = train_subset, lambda rows, read=read_train: read(subset[rows])

    return Source(name=name, num_classes=num_classes, num_train=num_train, num_eval=num_eval,
                  eval_split=eval_split, _read_train=read_train, _read_eval=read_eval)


def trained_labels(
    source: Source,
    true_labels: np.ndarray,
    human_labels: np.ndarray | None = None,
    *,
    label_noise: float = 0.0,
    noise_type: str = 'symmetric',
    noise_seed: int = 0,
) -> np.ndarray:
    """The int32 labels trained on, given the clean labels of the whole training split.

    The human labels of cifar10_n when given, else `true_labels` corrupted by
    `experiments.data.noise` (symmetric or asymmetric, exact rate, seeded). The corruption
    is a function of the whole label set, so every process computes the same one.
    """
    check_noise(source.name, label_noise, noise_type)
    if label_noise and noise_type == 'symmetric':
        return noise.symmetric_noise(true_labels, label_noise, source.num_classes, noise_seed)[0]
    if label_noise:
        class_map = noise.ASYMMETRIC_MAPS[source.name]
        return noise.asymmetric_noise(true_labels, label_noise, noise_seed, class_map)[0]
    labels = true_labels if human_labels is None else human_labels
    return np.asarray(labels, np.int32)


def load_dataset(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    validation_size: int = 0,
    label_noise: float = 0.0,
    noise_type: str = 'symmetric',
    noise_seed: int = 0,
    human_label: str = 'worse_label',
    dataset_kwargs: dict | None = None,
    train_subset: int = 0,
) -> Dataset:
    """Reads a whole dataset into memory, optionally holding out a validation split and
    adding label noise.

    Args:
      name, data_dir, validation_size, human_label, train_subset: as for `open_dataset`.
      label_noise: fraction of the remaining training labels to corrupt, in ``[0, 1)``.
      noise_type: ``'symmetric'`` (any other class, uniformly) or ``'asymmetric'`` (the
        class map of cifar10 or fashion_mnist); see `experiments.image_classification.data.noise`.
      noise_seed: seed of the corruption.

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
    # Everything that can be checked before a (slow) read is checked first.
    check_name(name)
    check_noise(name, label_noise, noise_type)
    source = open_dataset(name, data_dir=data_dir, validation_size=validation_size,
                          human_label=human_label, dataset_kwargs=dataset_kwargs,
                          train_subset=train_subset)
    train = source.read_train(np.arange(source.num_train))
    test = source.read_eval(np.arange(source.num_eval))
    labels = trained_labels(source, train['label'], train.get('noisy_label'),
                            label_noise=label_noise, noise_type=noise_type,
                            noise_seed=noise_seed)
    mean, std = channel_stats(train['image'])
    return Dataset(
        name=name,
        num_classes=source.num_classes,
        train_images=train['image'],
        train_labels=labels,
        train_true_labels=train['label'],
        test_images=test['image'],
        test_labels=test['label'],
        mean=mean,
        std=std,
        eval_split=source.eval_split,
    )
