"""The run loop, task-free: jitted steps, evaluation, checkpoints, metrics, summary.

``train_and_evaluate(task, config, workdir)`` is the whole run behind
``python -m experiments.train``: the config is checked, the workdir locked and checked, the
task's data loaded, the optimiser built, and the task's train step jitted once inside the
non-finite guard. Started on a workdir that holds a checkpoint, it resumes from it; started on
a finished one, it trains nothing and returns the summary, leaving ``summary.json`` and
``metrics.jsonl`` as they are when they hold what the checkpoint says.

Integrity: each checkpoint's record (``checkpointing.py``) holds the digests of the saved
state, the resolved config and the metrics history up to its step. A step whose arrays differ
from their digests is never resumed (the step before is); a config that differs from the
recorded one is refused even when ``config.json`` was deleted (which is then restored from
the record); a missing or truncated ``metrics.jsonl`` is restored from the record with a
one-line warning, so the summary never loses a value.

The host synchronises only at log, evaluation and checkpoint steps: between them it just
enqueues jitted steps. With ``every_k > 1`` on a two-pass link there are two jitted steps
(the chain with a second pass and the same chain with ``rho = 0``, one state between them)
and the host picks one per step from the step number: steps 0, k, 2k, ... take two passes.
No ``lax.cond`` in either, so each compiles once and keeps its fastest layout on every
backend. A one-pass link's run evaluates, checksums and summarises the unperturbed weights
(``vasso_jax.unperturbed_params``); its checkpoints hold the held params and the state.
"""

import contextlib
import hashlib
import os
import time

import jax
import ml_collections
import numpy as np
import tqdm
from absl import logging

from experiments.runtime import (
    checkpointing,
    config_check,
    distributed,
    errors,
    failures,
    metrics,
    nonfinite,
    optimizers,
    preemption,
)
from experiments.runtime import workdir as workdir_lib


def total_steps(config: ml_collections.ConfigDict, epoch_steps: int) -> int:
    """``num_train_steps`` when > 0, else ``num_epochs`` full epochs."""
    if config.num_train_steps > 0:
        return int(config.num_train_steps)
    return int(config.num_epochs) * epoch_steps


def make_optimizer(config: ml_collections.ConfigDict, num_steps: int, epoch_steps: int):
    """``(schedule, tx)`` of a run of ``num_steps`` steps (``runtime/optimizers.py``)."""
    schedule = optimizers.make_schedule(config, num_steps, epoch_steps)
    return schedule, optimizers.make_optimizer(config, schedule)


def make_optimizers(config: ml_collections.ConfigDict, num_steps: int, epoch_steps: int):
    """``(schedule, tx, plain_tx)``: ``plain_tx`` is the ``rho = 0`` chain of host-dispatched
    ``every_k``, or None (``optimizers.make_optimizers``)."""
    schedule = optimizers.make_schedule(config, num_steps, epoch_steps)
    return (schedule, *optimizers.make_optimizers(config, schedule))


def takes_two_passes(config: ml_collections.ConfigDict, step: int) -> bool:
    """Whether the train step of ``step`` (counted from 0) runs the second pass: every step
    of a two-pass link, steps 0, k, 2k, ... with ``every_k = k``, none for sgd and one-pass
    links."""
    if config.optimizer == 'sgd' or optimizers.is_one_pass(config) or not config.rho:
        return False
    return step % optimizers.host_every_k(config) == 0


def with_params(state, params):
    """``state`` with ``params`` replaced (a Flax struct's ``replace``, a NamedTuple's
    ``_replace``)."""
    replace = getattr(state, 'replace', None) or state._replace
    return replace(params=params)


_eval_params = jax.jit(optimizers.eval_params)


def eval_state(state):
    """``state`` with the weights to evaluate: the unperturbed ones under a one-pass link
    (``optimizers.eval_params``), else ``state`` itself."""
    if not optimizers.holds_one_pass(state.opt_state):
        return state
    return with_params(state, _eval_params(state.params, state.opt_state))


def params_checksum(params) -> str:
    """sha256 of the parameters: path, dtype, shape and raw bytes of each leaf in tree order."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        array = np.ascontiguousarray(jax.device_get(leaf))
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(f'{array.dtype}{array.shape}'.encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def median_throughput(history, key: str) -> float | None:
    """Median of ``key`` over the log intervals, the first (which includes compiling) left
    out."""
    values = [r[key] for r in history if key in r]
    return float(np.median(values[1:] or values)) if values else None


def train_and_evaluate(task, config: ml_collections.ConfigDict, workdir: str, *,
                       stop_at_step: int | None = None,
                       allow_config_change: bool = False) -> dict:
    """Trains and evaluates ``task`` as ``config`` says, in ``workdir``; returns the summary.

    The config is checked before anything is loaded, written or compiled. The workdir is
    locked for the run (a second live run on it is refused) and must have been started with
    the same config, up to ``workdir.EXEMPT_KEYS``. SIGTERM / SIGINT checkpoint and stop.

    Args:
      task: an ``experiments.runtime.task.Task``, e.g. ``image_classification.TASK``.
      config: a config of the task, e.g. ``experiments/configs/default.py``'s.
      workdir: output folder; a checkpoint in it is resumed.
      stop_at_step: stop (checkpointed) at this step as if preempted; the schedule still
        spans the full run. For tests of resumption and for time-sliced jobs.
      allow_config_change: continue a workdir started with another config.

    Returns:
      The dict written to ``summary.json``.

    Raises:
      errors.BadInputError: an invalid config value (``errors.ConfigError``), a workdir held
        by another run, started with another config or too long a path, checkpoints that do
        not fit or none readable, data not prepared. A workdir this call created is removed
        again when it holds nothing.
      errors.EnvironmentFailure: the machine refused a write (disk full, file-size limit, an
        unwritable folder); the traceback is in ``WORKDIR/error.log`` (``runtime/failures.py``).
      preemption.Interrupted: a second signal stopped the run at once.
      nonfinite.NonFiniteError: a non-finite loss, gradient or state; nothing was saved of it.
      preemption.Preempted: a signal stopped the run after checkpointing it.
    """
    config_check.check(task, config)
    if stop_at_step is not None and stop_at_step < 1:
        raise ValueError(f'stop_at_step must be None or an int >= 1, got {stop_at_step!r}.')
    created = workdir_lib.create(workdir)
    try:
        with _locked(workdir), \
                failures.reported(workdir), \
                preemption.Guard(sync_every=config.log_every_steps) as stop:
            record = checkpointing.latest_record(workdir)
            recorded_config = record.get('config') if record else None
            if recorded_config is not None and distributed.is_main_process():
                workdir_lib.restore_config(workdir, recorded_config, record['step'])
            workdir_lib.check_config(workdir, config, defaults=task.default_config(),
                                     allow_change=allow_config_change, recorded=recorded_config)
            summary = _train_and_evaluate(task, config, workdir, stop_at_step=stop_at_step,
                                          stop=stop)
    except BaseException:
        workdir_lib.remove_if_unused(workdir, created)  # e.g. data not prepared: no empty one
        raise
    if stop.stopped and not summary['completed']:
        raise preemption.Preempted(summary['steps'], stop.signal_name or 'another process')
    return summary


@contextlib.contextmanager
def _locked(workdir: str):
    """Process 0 locks ``workdir`` for the run (the others share it); when it cannot, every
    process stops with its one line (``distributed.raise_on_every_process``)."""
    with contextlib.ExitStack() as stack:
        refused = None
        if distributed.is_main_process():
            try:
                stack.enter_context(workdir_lib.lock(workdir))
            except (errors.BadInputError, errors.EnvironmentFailure) as e:
                refused = e
        distributed.raise_on_every_process(refused)
        yield


def _mesh_and_shards(config):
    # Data parallelism: the batch drawn from S data shards (S / D per device); params replicated.
    mesh = distributed.make_mesh()
    if config.batch_size % mesh.size:
        raise errors.ConfigError(
            f'--config.batch_size={config.batch_size} must divide by the {mesh.size} devices; '
            f'use a multiple of {mesh.size}.')
    num_shards = config.get('data_shards', 0) or mesh.size
    if num_shards % mesh.size:
        raise errors.ConfigError(
            f'--config.data_shards={num_shards} must be a multiple of the {mesh.size} devices '
            '(or 0: one per device).')
    return mesh, num_shards


def _train_and_evaluate(task, config: ml_collections.ConfigDict, workdir: str, *,
                        stop_at_step: int | None, stop: preemption.Guard) -> dict:
    """The run itself, inside the workdir lock and the preemption guard."""
    mesh, num_shards = _mesh_and_shards(config)
    run = task.load(config, mesh, num_shards)  # this process's shards only
    epoch_steps = run.epoch_steps
    main_process = distributed.is_main_process()
    num_steps = total_steps(config, epoch_steps)
    end_step = num_steps if stop_at_step is None else min(stop_at_step, num_steps)
    eval_every = config.eval_every_steps if config.eval_every_steps > 0 else epoch_steps

    schedule, tx, plain_tx = make_optimizers(config, num_steps, epoch_steps)
    state = run.init_state(tx)
    if plain_tx is not None:
        optimizers.check_same_state(tx, plain_tx, state.params)
    replicated = distributed.replicated(mesh)
    # On the mesh like the step's outputs: fresh host zeros would trace (and compile) the step
    # a second time, for inputs that differ from its outputs only in their sharding.
    fresh_sums = lambda: distributed.put(nonfinite.with_status(run.zero_metrics()), replicated)
    skip = bool(config.get('skip_nonfinite', False))

    def jitted_step(t):
        return jax.jit(nonfinite.guard(run.make_train_step(t, state), skip=skip),
                       in_shardings=(replicated, replicated, *run.input_shardings),
                       out_shardings=(replicated, replicated), donate_argnums=(0, 1))

    # Host dispatch of every_k: the two-pass step on steps 0, k, 2k, ..., else the rho = 0 one.
    two_pass_step = train_step = jitted_step(tx)
    if plain_tx is not None:
        train_step = jitted_step(plain_tx)
    checked = nonfinite.quantities(state, fresh_sums())
    state = distributed.put(state, replicated)

    manager = checkpointing.make_manager(workdir, keep=config.keep_checkpoints)
    state, record = checkpointing.restore_latest_with_record(manager, state)
    start_step = int(state.step)
    history, repaired = metrics.resume_history(
        workdir, start_step, recorded=record.get('history') if record else None)
    if start_step >= end_step:  # nothing to train: the results stay as they are
        manager.close()
        if main_process:
            if repaired:
                metrics.write_history(workdir, history)
            if not os.path.exists(os.path.join(workdir, workdir_lib.CONFIG_FILE)):
                workdir_lib.save_config(workdir, config)
        return _summarize(run, config, state, history, num_steps, workdir, main_process)
    if main_process:  # one writer per run; every process saves its part of checkpoints
        workdir_lib.save_config(workdir, config)
        run.save_artifacts(workdir)
    if start_step:
        logging.info('Resuming from step %d in %s.', start_step, workdir)
    writer = metrics.MetricWriter(workdir, start_step=start_step, write_files=main_process,
                                  history=history)
    resolved_config = workdir_lib.config_dict(config)  # kept with each checkpoint
    elapsed_before = metrics.last(writer.history, 'elapsed_s', 0.0)

    def evaluate_all(step):
        record = {'epoch': step / epoch_steps, **run.evaluate(eval_state(state))}
        record['elapsed_s'] = elapsed_before + time.time() - start_time
        return writer.write(step, record)

    bar = tqdm.tqdm(total=num_steps, initial=start_step, unit='step', dynamic_ncols=True,
                    disable=not config.progress_bar, desc=f'{config.optimizer}')
    start_time = last_log_time = time.time()
    last_log_step = start_step
    sums = fresh_sums()
    postfix = {}
    two_pass_steps = 0  # in the current log interval
    for step in range(start_step, end_step):
        two_pass = takes_two_passes(config, step)
        two_pass_steps += two_pass
        step_fn = two_pass_step if two_pass else train_step
        state, sums = step_fn(state, sums, *run.train_inputs(step))
        done = step + 1
        preempted = stop.should_stop(done)
        checkpoint_due = (done % config.checkpoint_every_steps == 0 or done == end_step
                          or preempted)
        if done % config.log_every_steps == 0 or checkpoint_due:
            fetched = jax.device_get(sums)
            nonfinite.check(fetched, manager, checked)  # before any save: never keep a bad state
            record = run.summarize_train(nonfinite.strip(fetched))
            if skip:
                record['skipped_steps'] = int(fetched['nonfinite_skipped'])
            record['two_pass_steps'], two_pass_steps = two_pass_steps, 0
            sums = fresh_sums()
            now = time.time()
            throughput = ((done - last_log_step) * run.examples_per_step
                          / (now - last_log_time))
            last_log_step, last_log_time = done, now
            record.update({'learning_rate': float(schedule(step)), 'epoch': done / epoch_steps,
                           run.throughput_key: throughput,
                           'elapsed_s': elapsed_before + now - start_time})
            writer.write(done, record)
            postfix.update(run.progress(record))
            bar.set_postfix(postfix, refresh=False)
            bar.update(done - bar.n)
        if done % eval_every == 0 or done == num_steps:
            record = evaluate_all(done)
            last_log_time = time.time()  # throughput counts training only
            postfix[run.eval_name] = f'{record[run.headline]:.3f}'
            bar.set_postfix(postfix)
        if checkpoint_due:
            writer.flush()
            checkpointing.save(manager, state, config=resolved_config,
                               history=writer.history)
        if preempted:
            break
    bar.close()
    manager.wait_until_finished()
    manager.close()
    writer.close()
    return _summarize(run, config, state, writer.history, num_steps, workdir, main_process)


def _summarize(run, config, state, history, num_steps, workdir, main_process) -> dict:
    summary = make_summary(run, config, state, history, num_steps)
    if main_process:
        metrics.write_summary(workdir, summary)  # untouched when it holds this already
    return summary


def make_summary(run, config, state, history: list[dict], num_steps: int) -> dict:
    """``summary.json``: the task's keys, the run's progress, throughput and checksum."""
    summary = {
        **run.summary(config, history),
        'optimizer': config.optimizer, 'seed': config.seed,
        'steps': int(state.step), 'total_steps': num_steps,
        'completed': int(state.step) >= num_steps,
        'wall_time_s': metrics.last(history, 'elapsed_s', 0.0),
        run.throughput_key: median_throughput(history, run.throughput_key),
        'params_checksum': params_checksum(eval_state(state).params),
        'two_pass_steps': int(sum(r.get('two_pass_steps', 0) for r in history)),
    }
    if config.get('skip_nonfinite', False):
        summary['skipped_steps'] = int(sum(r.get('skipped_steps', 0) for r in history))
    return summary
