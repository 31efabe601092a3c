"""Image classification as a task of the runtime: uint8 NHWC images, integer labels.

:data:`TASK` implements ``experiments.runtime.task.Task``: the whole split lives on the
devices as uint8 (:mod:`.input_pipeline`), each step gathers its batch, augments it on device
(:mod:`.data.augment`) and takes the two passes of :func:`.steps.make_train_step`; evaluation
sums loss and accuracy over the on-device splits. Configs: ``experiments/configs/*.py``.

``train_and_evaluate(config, workdir)`` is the runtime's loop on this task.
"""

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from experiments.configs import default as default_config
from experiments.image_classification import (
    collapse,
    config_check,
    data,
    input_pipeline,
    models,
    steps,
)
from experiments.image_classification.data import augment as augment_lib
from experiments.runtime import distributed, errors, metrics, optimizers
from experiments.runtime import task as runtime_task


def model_kwargs(config: ml_collections.ConfigDict) -> dict:
    """``config.model_kwargs`` as a dict, with a ``dtype`` string turned into a dtype."""
    kwargs = dict(config.model_kwargs)
    if isinstance(kwargs.get('dtype'), str):
        kwargs['dtype'] = jnp.dtype(kwargs['dtype'])
    return kwargs


def make_model(config: ml_collections.ConfigDict, num_classes: int):
    """``config.model`` with ``config.model_kwargs``; a bad name or kwarg is a ConfigError."""
    try:
        return models.get_model(config.model, num_classes, **model_kwargs(config))
    except (ValueError, TypeError, ImportError) as e:  # unknown name / unexpected kwarg
        raise errors.ConfigError(f'{e} (check --config.model and --config.model_kwargs)') from e


def load_data(config: ml_collections.ConfigDict) -> data.Dataset:
    """The whole dataset of ``config`` in host memory (diagnostics; a run reads only its
    shards through :mod:`.input_pipeline`)."""
    input_pipeline.open_source(config)  # the same one-line errors as a run's
    return data.load_dataset(
        config.dataset, data_dir=config.data_dir, validation_size=config.validation_size,
        label_noise=config.label_noise, noise_type=config.noise_type,
        noise_seed=config.noise_seed, train_subset=config.train_subset,
        dataset_kwargs=dict(config.get('dataset_kwargs') or {}))


def _eval_record(prefix: str, sums) -> dict:
    sums = {k: float(v) for k, v in jax.device_get(sums).items()}
    count = max(sums['count'], 1.0)
    record = {f'{prefix}_loss': sums['loss'] / count, f'{prefix}_accuracy': sums['correct'] / count}
    if prefix == 'train_eval':  # the un-augmented train split, against noisy and true labels
        record['train_eval_true_accuracy'] = sums['correct_true'] / count
    return record


class ClassificationRun:
    """One run: the data on the mesh; builds the state, the train step and the evaluation."""

    throughput_key = 'images_per_sec'

    def __init__(self, config: ml_collections.ConfigDict, mesh, num_shards: int):
        self.config = config
        self.data = input_pipeline.load(config, mesh, num_shards)  # this process's shards
        logging.info('Process %d read %d images (its %d of the %d data shards).',
                     jax.process_index(), self.data.images_read,
                     len(distributed.local_shards(mesh, num_shards)), num_shards)
        self.num_shards = num_shards
        self.shard_size = self.data.train.labels.shape[1]
        self.epoch_steps = steps.steps_per_epoch(self.shard_size * num_shards, config.batch_size)
        self.examples_per_step = config.batch_size
        self.eval_name = self.data.eval_name  # 'test' or 'validation'
        self.headline = f'{self.eval_name}_accuracy'
        sharded = distributed.sharded(mesh)
        self.input_shardings = (sharded, sharded)  # the train split and the epoch's order
        self.model = make_model(config, self.data.num_classes)
        self.init_key, self.data_key, self.augment_key = steps.split_keys(config.seed)
        self._permutation = jax.jit(
            functools.partial(steps.epoch_permutation, num_shards=num_shards,
                              shard_size=self.shard_size), out_shardings=sharded)
        self._perm_epoch, self._perm = None, None
        normalize_fn = functools.partial(augment_lib.normalize, mean=self.data.mean,
                                         std=self.data.std)
        self._eval_step = steps.make_eval_step(self.model, normalize_fn, self.data.num_classes)
        self.diagnostics = ()
        hint = f'--config.learning_rate (now {config.learning_rate})'
        if config.optimizer != 'sgd':  # a sharpness-aware link: its radius first
            hint = f'--config.rho (now {config.get("rho")}) or {hint}'
        self._collapse = collapse.CollapseWatch(self.data.num_classes, hint)

    def init_state(self, tx) -> steps.TrainState:
        return steps.create_train_state(self.model, tx, image_shape=self.data.image_shape,
                                        init_key=self.init_key, augment_key=self.augment_key)

    def make_train_step(self, tx, state):
        config, run_data = self.config, self.data
        self.diagnostics = optimizers.link_diagnostics(state.opt_state)
        augment_fn = augment_lib.from_config(config, mean=run_data.mean, std=run_data.std)
        return steps.make_train_step(
            self.model, tx, augment_fn, num_classes=run_data.num_classes,
            batch_size=config.batch_size, epoch_steps=self.epoch_steps,
            label_smoothing=config.label_smoothing, diagnostics=self.diagnostics,
            ascent_group_size=config.ascent_group_size,
            one_pass=optimizers.is_one_pass(config))

    def zero_metrics(self) -> dict:
        return steps.zero_metrics(self.diagnostics)

    def train_inputs(self, step: int) -> tuple:
        epoch = step // self.epoch_steps
        if epoch != self._perm_epoch:  # the data order: a function of (seed, epoch)
            self._perm, self._perm_epoch = self._permutation(self.data_key, epoch), epoch
        return self.data.train, self._perm

    def summarize_train(self, sums: dict) -> dict:
        record = steps.summarize_train_metrics(sums)
        self._collapse.update(record)  # warns once if the run has collapsed
        return record

    def evaluate(self, state) -> dict:
        record = {}
        for name, split in self.data.evals.items():
            sums = steps.evaluate(self._eval_step, state.params, state.batch_stats, split,
                                  self.config.eval_batch_size)
            record.update(_eval_record(name, sums))
        return record

    def progress(self, record: dict) -> dict:
        return {'loss': f'{record["train_loss"]:.3f}', 'acc': f'{record["train_accuracy"]:.3f}',
                'img_s': f'{record[self.throughput_key]:.0f}'}

    def save_artifacts(self, workdir: str) -> None:
        input_pipeline.save_noise_audit(os.path.join(workdir, 'label_noise.npz'), self.data)

    def summary(self, config, history: list[dict]) -> dict:
        name = self.eval_name
        summary = {
            'dataset': config.dataset, 'model': config.model, 'label_noise': config.label_noise,
            'eval_split': name,
            'final_test_accuracy': metrics.last(history, f'{name}_accuracy'),
            'best_test_accuracy': metrics.best(history, f'{name}_accuracy'),
            'final_test_loss': metrics.last(history, f'{name}_loss'),
            'final_train_loss': metrics.last(history, 'train_loss'),
            'final_train_accuracy': metrics.last(history, 'train_accuracy'),
            'final_train_true_accuracy': metrics.last(history, 'train_true_accuracy'),
        }
        if config.eval_train:
            summary['final_train_eval_accuracy'] = metrics.last(history, 'train_eval_accuracy')
            summary['final_train_eval_true_accuracy'] = metrics.last(
                history, 'train_eval_true_accuracy')
        return summary


TASK = runtime_task.Definition(
    name='image_classification', default_config=default_config.get_config,
    check_config=config_check.check_config, load=ClassificationRun)
# The runtime's whole config check and its run loop, on this task.
validate_config = TASK.validate_config
train_and_evaluate = TASK.train_and_evaluate
