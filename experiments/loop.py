"""The training loop: data on device, jitted steps, evaluation, checkpoints, metrics, summary.

``train_and_evaluate(config, workdir)`` is the whole run behind ``python -m experiments.train``
and the demo. Started on a workdir that holds a checkpoint, it resumes from it; started on a
finished one, it only rewrites ``summary.json``.

The host synchronises only at log, evaluation and checkpoint steps: between them it just
enqueues jitted steps (the epoch's permutation is computed on device too).
"""

import functools
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from absl import logging

from experiments import (
    checkpointing,
    data,
    distributed,
    input_pipeline,
    metrics,
    models,
    nonfinite,
    preemption,
    trainer,
    validation,
)
from experiments import workdir as workdir_lib
from experiments.data import augment as augment_lib


def model_kwargs(config: ml_collections.ConfigDict) -> dict:
    """``config.model_kwargs`` as a dict, with a ``dtype`` string turned into a dtype."""
    kwargs = dict(config.model_kwargs)
    if isinstance(kwargs.get('dtype'), str):
        kwargs['dtype'] = jnp.dtype(kwargs['dtype'])
    return kwargs


def load_data(config: ml_collections.ConfigDict) -> data.Dataset:
    """The whole dataset of ``config`` in host memory (diagnostics; the trainer reads only
    its shards through `experiments.input_pipeline`)."""
    input_pipeline.open_source(config)  # the same one-line errors as a run's
    return data.load_dataset(
        config.dataset, data_dir=config.data_dir, validation_size=config.validation_size,
        label_noise=config.label_noise, noise_type=config.noise_type,
        noise_seed=config.noise_seed)


def make_model(config: ml_collections.ConfigDict, num_classes: int):
    """``config.model`` with ``config.model_kwargs``; a bad name or kwarg is a ConfigError."""
    try:
        return models.get_model(config.model, num_classes, **model_kwargs(config))
    except (ValueError, TypeError) as e:  # unknown name / unexpected keyword argument
        raise trainer.ConfigError(f'{e} (check --config.model and --config.model_kwargs)') from e


def _eval_record(prefix: str, sums) -> dict:
    sums = {k: float(v) for k, v in jax.device_get(sums).items()}
    count = max(sums['count'], 1.0)
    record = {f'{prefix}_loss': sums['loss'] / count, f'{prefix}_accuracy': sums['correct'] / count}
    if prefix == 'train_eval':  # the un-augmented train split, against noisy and true labels
        record['train_eval_true_accuracy'] = sums['correct_true'] / count
    return record


def _median_throughput(history) -> float | None:
    """Median images/s over the log intervals, the first (which includes compiling) left out."""
    values = [r['images_per_sec'] for r in history if 'images_per_sec' in r]
    return float(np.median(values[1:] or values)) if values else None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_at_step: int | None = None,
                       allow_config_change: bool = False) -> dict:
    """Trains and evaluates as ``config`` says, in ``workdir``; returns the summary.

    The config is validated before anything is loaded, written or compiled. The workdir is
    locked for the run (a second live run on it is refused) and must have been started with
    the same config, up to ``workdir.EXEMPT_KEYS``. SIGTERM / SIGINT checkpoint and stop.

    Args:
      config: a configuration like ``experiments/configs/default.py``'s.
      workdir: output folder; a checkpoint in it is resumed.
      stop_at_step: stop (checkpointed) at this step as if preempted; the schedule still
        spans the full run. For tests of resumption and for time-sliced jobs.
      allow_config_change: continue a workdir started with another config.

    Returns:
      The dict written to ``summary.json``.

    Raises:
      trainer.ConfigError: an invalid config value.
      workdir.WorkdirError: the workdir is held by another run or has another config.
      checkpointing.CheckpointMismatchError: its checkpoints do not fit, or none is readable.
      nonfinite.NonFiniteError: a non-finite loss, gradient or state; nothing was saved of it.
      preemption.Preempted: a signal stopped the run after checkpointing it.
    """
    validation.validate_config(config)
    if stop_at_step is not None and stop_at_step < 1:
        raise ValueError(f'stop_at_step must be None or an int >= 1, got {stop_at_step!r}.')
    workdir_lib.create(workdir)
    with workdir_lib.lock(workdir, enabled=distributed.is_main_process()), \
            preemption.Guard(sync_every=config.log_every_steps) as stop:
        workdir_lib.check_config(workdir, config, allow_change=allow_config_change)
        summary = _train_and_evaluate(config, workdir, stop_at_step=stop_at_step, stop=stop)
    if stop.stopped and not summary['completed']:
        raise preemption.Preempted(summary['steps'], stop.signal_name or 'another process')
    return summary


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                        stop_at_step: int | None, stop: preemption.Guard) -> dict:
    """The run itself, inside the workdir lock and the preemption guard."""
    # Data parallelism: the batch drawn from S data shards (S / D per device); params replicated.
    mesh = distributed.make_mesh()
    if config.batch_size % mesh.size:
        raise trainer.ConfigError(
            f'--config.batch_size={config.batch_size} must divide by the {mesh.size} devices; '
            f'use a multiple of {mesh.size}.')
    num_shards = config.data_shards or mesh.size
    if num_shards % mesh.size:
        raise trainer.ConfigError(
            f'--config.data_shards={num_shards} must be a multiple of the {mesh.size} devices '
            '(or 0: one per device).')
    run_data = input_pipeline.load(config, mesh, num_shards)  # this process's shards only
    logging.info('Process %d read %d images (its %d of the %d data shards).',
                 jax.process_index(), run_data.images_read,
                 len(distributed.local_shards(mesh, num_shards)), num_shards)
    shard_size = run_data.train.labels.shape[1]
    epoch_steps = trainer.steps_per_epoch(shard_size * num_shards, config.batch_size)
    main_process = distributed.is_main_process()
    num_steps = trainer.total_steps(config, epoch_steps)
    end_step = num_steps if stop_at_step is None else min(stop_at_step, num_steps)
    eval_every = config.eval_every_steps if config.eval_every_steps > 0 else epoch_steps

    model = make_model(config, run_data.num_classes)
    schedule = trainer.make_schedule(config, num_steps, epoch_steps)
    tx = trainer.make_optimizer(config, schedule)
    init_key, data_key, augment_key = trainer.split_keys(config.seed)
    state = trainer.create_train_state(model, tx, image_shape=run_data.image_shape,
                                       init_key=init_key, augment_key=augment_key)
    diagnostics = trainer.link_diagnostics(state.opt_state)

    augment_fn = functools.partial(
        augment_lib.augment, mean=run_data.mean, std=run_data.std,
        crop_padding=config.crop_padding, flip=config.flip, cutout_size=config.cutout_size,
        cutout_prob=config.cutout_prob)
    normalize_fn = functools.partial(augment_lib.normalize, mean=run_data.mean,
                                     std=run_data.std)
    replicated, sharded = distributed.replicated(mesh), distributed.sharded(mesh)
    state = distributed.put(state, replicated)
    train_step = jax.jit(nonfinite.guard(trainer.make_train_step(
        model, tx, augment_fn, num_classes=run_data.num_classes, batch_size=config.batch_size,
        epoch_steps=epoch_steps, label_smoothing=config.label_smoothing,
        diagnostics=diagnostics, ascent_group_size=config.ascent_group_size)),
        in_shardings=(replicated, replicated, sharded, sharded),
        out_shardings=(replicated, replicated), donate_argnums=(0, 1))
    permutation = jax.jit(functools.partial(trainer.epoch_permutation, num_shards=num_shards,
                                            shard_size=shard_size), out_shardings=sharded)
    eval_step = trainer.make_eval_step(model, normalize_fn, run_data.num_classes)
    train_split, eval_name = run_data.train, run_data.eval_name  # 'test' or 'validation'

    manager = checkpointing.make_manager(workdir, keep=config.keep_checkpoints)
    state = checkpointing.restore_latest(manager, state)
    start_step = int(state.step)
    if main_process:  # one writer per run; every process saves its part of checkpoints
        workdir_lib.save_config(workdir, config)
        input_pipeline.save_noise_audit(os.path.join(workdir, 'label_noise.npz'), run_data)
    if start_step:
        logging.info('Resuming from step %d in %s.', start_step, workdir)
    writer = metrics.MetricWriter(workdir, start_step=start_step, write_files=main_process)
    elapsed_before = metrics.last(writer.history, 'elapsed_s', 0.0)

    def evaluate_all(step):
        record = {'epoch': step / epoch_steps}
        for name, split in run_data.evals.items():
            sums = trainer.evaluate(eval_step, state.params, state.batch_stats, split,
                                    config.eval_batch_size)
            record.update(_eval_record(name, sums))
        record['elapsed_s'] = elapsed_before + time.time() - start_time
        return writer.write(step, record)

    bar = tqdm.tqdm(total=num_steps, initial=start_step, unit='step', dynamic_ncols=True,
                    disable=not config.progress_bar, desc=f'{config.optimizer}')
    start_time = last_log_time = time.time()
    last_log_step, perm_epoch, perm = start_step, None, None
    sums = nonfinite.with_status(trainer.zero_metrics(diagnostics))
    postfix = {}
    for step in range(start_step, end_step):
        epoch = step // epoch_steps
        if epoch != perm_epoch:
            perm, perm_epoch = permutation(data_key, epoch), epoch
        state, sums = train_step(state, sums, train_split, perm)
        done = step + 1
        preempted = stop.should_stop(done)
        checkpoint_due = (done % config.checkpoint_every_steps == 0 or done == end_step
                          or preempted)
        if done % config.log_every_steps == 0 or checkpoint_due:
            fetched = jax.device_get(sums)
            nonfinite.check(fetched, manager)  # before any save: a bad state is never kept
            record = trainer.summarize_train_metrics(nonfinite.strip(fetched))
            sums = nonfinite.with_status(trainer.zero_metrics(diagnostics))
            now = time.time()
            images_per_sec = (done - last_log_step) * config.batch_size / (now - last_log_time)
            last_log_step, last_log_time = done, now
            record.update(learning_rate=float(schedule(step)), epoch=done / epoch_steps,
                          images_per_sec=images_per_sec,
                          elapsed_s=elapsed_before + now - start_time)
            writer.write(done, record)
            postfix.update(loss=f'{record["train_loss"]:.3f}',
                           acc=f'{record["train_accuracy"]:.3f}', img_s=f'{images_per_sec:.0f}')
            bar.set_postfix(postfix, refresh=False)
            bar.update(done - bar.n)
        if done % eval_every == 0 or done == num_steps:
            record = evaluate_all(done)
            last_log_time = time.time()  # throughput counts training only
            postfix[eval_name] = f'{record[f"{eval_name}_accuracy"]:.3f}'
            bar.set_postfix(postfix)
        if checkpoint_due:
            writer.flush()
            checkpointing.save(manager, state)
        if preempted:
            break
    bar.close()
    manager.wait_until_finished()
    manager.close()
    writer.close()

    summary = make_summary(config, state, writer.history, eval_name, num_steps)
    if main_process:
        metrics.write_summary(workdir, summary)
    return summary


def make_summary(config, state, history: list[dict], eval_name: str, num_steps: int) -> dict:
    """``summary.json``: final and best accuracy from the (resume-proof) history, checksum."""
    summary = {
        'dataset': config.dataset, 'model': config.model, 'optimizer': config.optimizer,
        'label_noise': config.label_noise, 'seed': config.seed,
        'steps': int(state.step), 'total_steps': num_steps,
        'completed': int(state.step) >= num_steps,
        'eval_split': eval_name,
        'final_test_accuracy': metrics.last(history, f'{eval_name}_accuracy'),
        'best_test_accuracy': metrics.best(history, f'{eval_name}_accuracy'),
        'final_test_loss': metrics.last(history, f'{eval_name}_loss'),
        'final_train_loss': metrics.last(history, 'train_loss'),
        'final_train_accuracy': metrics.last(history, 'train_accuracy'),
        'final_train_true_accuracy': metrics.last(history, 'train_true_accuracy'),
        'wall_time_s': metrics.last(history, 'elapsed_s', 0.0),
        'images_per_sec': _median_throughput(history),
        'params_checksum': trainer.params_checksum(state.params),
    }
    if config.eval_train:
        summary['final_train_eval_accuracy'] = metrics.last(history, 'train_eval_accuracy')
        summary['final_train_eval_true_accuracy'] = metrics.last(history,
                                                                 'train_eval_true_accuracy')
    return summary
