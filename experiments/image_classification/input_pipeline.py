"""A run's data on the devices, each process reading only its own devices' shards.

The train split is laid out as ``S`` strided data shards (`steps.shard_rows`: shard ``k`` is
examples ``k, k + S, ...``), by default one per device of the mesh, else ``S / D`` consecutive
shards per device (``--config.data_shards``); the evaluation split likewise, padded with a mask
(`steps.eval_rows`). A process reads and decodes only the examples of its own devices'
shards and places them with ``jax.make_array_from_process_local_data``; nothing else of the
images ever reaches it.

Two things need the whole training split, and both are small: the label set (label noise is
a function of all labels, so that every process corrupts the same ones and the run does not
depend on the process layout) and the per-channel pixel histogram that gives the
normalisation mean and std. Each process contributes its rows' labels and histogram and
they are combined across processes; process 0 also reads the fewer than ``S`` examples left
over by the shards, so the labels and statistics are those of the whole split, whatever
the device count.
"""

import dataclasses

import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from experiments.image_classification import data, steps
from experiments.image_classification.data import noise as noise_lib
from experiments.runtime import distributed, errors


@dataclasses.dataclass(frozen=True, eq=False)
class RunData:
    """What the loop needs of the data.

    Attributes:
      num_classes: number of classes.
      eval_name: ``'test'``, or ``'validation'`` when held out of the train split.
      image_shape: ``(H, W, C)``.
      mean, std: float32 ``(C,)`` statistics of the whole training split's ``images / 255``.
      train: the on-device `steps.Split`, ``[S, n, ...]``, sharded over the mesh.
      evals: on-device `steps.EvalSplit`s by name: ``eval_name`` and, with
        ``config.eval_train``, ``'train_eval'`` (the examples trained on, un-augmented,
        scored against the labels trained on and the true labels).
      true_labels, labels: int32 ``(N,)`` host arrays, the clean and trained-on labels of
        the whole training split (for the label-noise audit).
      images_read: number of images this process read and decoded.
    """

    num_classes: int
    eval_name: str
    image_shape: tuple[int, ...]
    mean: np.ndarray
    std: np.ndarray
    train: steps.Split
    evals: dict
    true_labels: np.ndarray
    labels: np.ndarray
    images_read: int


def open_source(config: ml_collections.ConfigDict) -> data.Source:
    """The dataset of ``config``, opened; a bad value is a `errors.ConfigError`.

    Raises ``data.DatasetNotFoundError`` when a TFDS dataset is not prepared. TFDS's own
    warnings while it looks for the files are muted: when the data is missing, the error's
    one line says what to do, and those warnings only bury it.
    """
    verbosity = logging.get_verbosity()
    logging.set_verbosity(min(verbosity, logging.ERROR))
    try:
        data.check_noise(config.dataset, config.label_noise, config.noise_type)
        return data.open_dataset(config.dataset, data_dir=config.data_dir,
                                 validation_size=config.validation_size,
                                 dataset_kwargs=dict(config.get('dataset_kwargs') or {}),
                                 train_subset=config.train_subset)
    except data.DatasetNotFoundError:
        raise
    except ValueError as e:  # the data module's argument checks: a bad config value
        raise errors.ConfigError(str(e)) from e
    finally:
        logging.set_verbosity(verbosity)


def load(config: ml_collections.ConfigDict, mesh: Mesh, num_shards: int) -> RunData:
    """Reads this process's shards of ``config``'s dataset and places them on ``mesh``.

    ``num_shards`` is a multiple of ``mesh.size``: each device holds ``num_shards /
    mesh.size`` consecutive shards.
    """
    source = open_source(config)
    local = distributed.local_shards(mesh, num_shards)
    if source.num_train < num_shards:
        raise errors.ConfigError(
            f'The {source.num_train} training examples of {source.name} cannot fill '
            f'{num_shards} data shards; use fewer (--config.data_shards) or fewer devices.')
    rows = steps.shard_rows(source.num_train, num_shards)
    local_rows = rows[local]
    leftover = (np.arange(rows.size, source.num_train) if distributed.is_main_process()
                else np.zeros(0, np.int64))
    read_rows = np.concatenate([local_rows.reshape(-1), leftover])
    read = source.read_train(read_rows)

    # The whole label set (clean, and cifar10_n's human labels) from every process's rows.
    known = np.full((2, source.num_train), -1, np.int32)
    known[0, read_rows] = read['label']
    known[1, read_rows] = read.get('noisy_label', read['label'])
    true_labels, human_labels = distributed.combine_across_processes(known, np.max)
    labels = data.trained_labels(
        source, true_labels, human_labels if 'noisy_label' in read else None,
        label_noise=config.label_noise, noise_type=config.noise_type,
        noise_seed=config.noise_seed)
    mean, std = data.stats_from_counts(
        distributed.combine_across_processes(data.pixel_counts(read['image']), np.sum))

    image_shape = read['image'].shape[1:]
    images = read['image'][:local_rows.size].reshape(*local_rows.shape, *image_shape)
    train = distributed.put_shards(
        steps.Split(images, labels[local_rows], true_labels[local_rows]), mesh)

    eval_rows, eval_mask = steps.eval_rows(source.num_eval, num_shards)
    eval_rows, eval_mask = eval_rows[local], eval_mask[local]
    held_out = source.read_eval(eval_rows.reshape(-1))
    eval_labels = held_out['label'].reshape(eval_rows.shape)
    evals = {source.eval_split: distributed.put_shards(steps.EvalSplit(
        held_out['image'].reshape(*eval_rows.shape, *image_shape), eval_labels, eval_labels,
        eval_mask), mesh)}
    if config.eval_train:
        ones = distributed.put_shards(np.ones(local_rows.shape, np.float32), mesh)
        evals['train_eval'] = steps.EvalSplit(*train, ones)
    return RunData(num_classes=source.num_classes, eval_name=source.eval_split,
                   image_shape=tuple(image_shape), mean=mean, std=std, train=train,
                   evals=evals, true_labels=true_labels, labels=labels,
                   images_read=len(read_rows) + eval_rows.size)


def save_noise_audit(path: str, run_data: RunData) -> None:
    """Saves which training labels were corrupted (``label_noise.npz``), if any were."""
    flipped = np.flatnonzero(run_data.labels != run_data.true_labels)
    if flipped.size:
        noise_lib.save_noise_audit(path, run_data.true_labels, run_data.labels, flipped)
