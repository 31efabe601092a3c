"""Orbax checkpoints of the full train state: save every N steps, keep the last K, resume.

The checkpoint is the task's whole train state (for image classification: params, BatchNorm
statistics, the complete optax state, the step and the RNG key), so a resumed run continues
bitwise where the saved one was; the data order needs nothing saved (it is a function of the
seed and the epoch).

Atomicity: orbax writes a step into a temporary folder and renames it to ``<step>`` once
complete, so an interrupted save (``kill -9``, power loss) never becomes the latest step; the
leftover temporary folders are removed when the next run opens the folder. A complete but
unreadable step (a truncated or corrupted file) is detected on restore:
:func:`restore_latest` warns naming it, moves it to ``WORKDIR/checkpoints_unreadable/``
(kept for inspection, and out of the way of the next save of that step) and resumes from the
step before. A step written before a library's ``NamedTuple`` state gained fields is migrated:
the new fields take their initial values (see ``migration.py``).
"""

import os
import shutil

import jax
import orbax.checkpoint as ocp
from absl import logging

from experiments.runtime import errors, migration

UNREADABLE_DIR = 'checkpoints_unreadable'


class CheckpointMismatchError(errors.BadInputError):
    """The workdir's checkpoint does not fit this run's state (another model or optimiser)."""


def make_manager(workdir: str, *, keep: int) -> ocp.CheckpointManager:
    """A manager writing ``WORKDIR/checkpoints/<step>``, keeping the last ``keep``."""
    directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, cleanup_tmp_directories=True
    )
    # One unnamed item, stated up front: orbax otherwise infers it from the first step it
    # reads, and a damaged step would make it expect several items from then on.
    return ocp.CheckpointManager(
        directory, options=options, item_handlers=ocp.StandardCheckpointHandler()
    )


def save(manager: ocp.CheckpointManager, state) -> None:
    """Saves ``state`` under its own step (asynchronously once copied off the device)."""
    manager.save(int(jax.device_get(state.step)), args=ocp.args.StandardSave(state), force=True)


def restore_latest(manager: ocp.CheckpointManager, template):
    """The latest readable saved state, shaped like ``template``; ``template`` when none exists.

    A step that cannot be read is skipped with a warning naming it, moved aside (see the
    module docstring) and the step before it is tried. A step that lacks only fields added
    since to a ``NamedTuple`` of the state is restored with those fields taken from
    ``template`` (:func:`migration.restore_with_new_fields`, a one-line warning).

    Raises:
      CheckpointMismatchError: the saved states have another structure, shape or dtype, or
        no step could be read at all.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        return template
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    unreadable = []
    for step in steps:
        try:
            state = manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as e:  # orbax/tensorstore raise many types for a damaged step
            state = migration.restore_with_new_fields(manager, step, template, abstract)
            if state is None:
                unreadable.append((step, e))
                continue
        for bad_step, error in unreadable:
            _set_aside(manager, bad_step, error, resumed_from=step)
        return state
    raise _no_readable_step(manager, unreadable)


def _set_aside(
    manager: ocp.CheckpointManager, step: int, error: Exception, *, resumed_from: int
) -> None:
    source = os.path.join(os.fspath(manager.directory), str(step))
    target = os.path.join(os.path.dirname(source), '..', UNREADABLE_DIR, str(step))
    target = os.path.normpath(target)
    reason = ' '.join(str(error).split())[:200]
    logging.warning(
        'Skipped the checkpoint at step %d: it is unreadable (%s: %s). Moved it to '
        '%s and resumed from step %d.',
        step,
        type(error).__name__,
        reason,
        target,
        resumed_from,
    )
    if jax.process_index() == 0:
        if os.path.exists(target):
            shutil.rmtree(target)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(source, target)
    manager.reload()


def _fits(manager: ocp.CheckpointManager, step: int) -> bool:
    """Whether ``step`` can be read at all, without a template (then the template is wrong)."""
    try:
        manager.restore(step, args=ocp.args.StandardRestore())
    except Exception:
        return False
    return True


def _no_readable_step(manager, unreadable) -> CheckpointMismatchError:
    steps = ', '.join(str(step) for step, _ in unreadable)
    if _fits(manager, unreadable[0][0]):  # readable, just not as this run's state
        return CheckpointMismatchError(
            f'The checkpoint at step {unreadable[0][0]} in {manager.directory} does not fit '
            'this config (another model, optimizer or library version?); pass a new --workdir '
            'or delete that checkpoints folder.'
        )
    return CheckpointMismatchError(
        f'No checkpoint in {manager.directory} is readable (steps {steps}); delete that folder '
        'to start the run over, or pass a new --workdir.'
    )


def restore_final(workdir: str, template, *, keep: int):
    """The latest readable state saved in ``workdir`` (for diagnostics of a finished run).

    Raises:
      FileNotFoundError: ``workdir`` holds no checkpoint.
      CheckpointMismatchError: as :func:`restore_latest`.
    """
    manager = make_manager(workdir, keep=keep)
    try:
        if manager.latest_step() is None:
            raise FileNotFoundError(f'No checkpoint in {workdir}; train the run first.')
        return restore_latest(manager, template)
    finally:
        manager.close()
