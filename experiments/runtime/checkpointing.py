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

Verification: every step has a record, ``WORKDIR/checkpoint_records/<step>.json``, holding
the sha256 of each array of the state as it was saved (path, dtype, shape and bytes) and what
the caller adds (the loop adds the resolved config and the metrics history up to the step).
:func:`restore_latest` recomputes the digests of the restored state; a step whose arrays
differ from its record, or whose record is unreadable, is treated exactly like an unreadable
step (skipped, moved aside with its record, the step before used). The record is written
atomically *before* orbax starts saving the step, so every step that orbax finalised has its
record, whenever the process is killed; a record whose step never completed is harmless (its
step is not listed) and is replaced or pruned by a later save. A step without any record was
saved by a version before records: it is restored unverified, with a one-line warning. In a
multi-process run process 0 writes the records and every process verifies its restore.
"""

import hashlib
import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from experiments.runtime import errors, files, migration

UNREADABLE_DIR = 'checkpoints_unreadable'
RECORDS_DIR = 'checkpoint_records'
RECORD_VERSION = 1


class CheckpointMismatchError(errors.BadInputError):
    """The workdir's checkpoint does not fit this run's state (another model or optimiser)."""


class CorruptCheckpointError(Exception):
    """A step's arrays differ from the digests recorded when it was saved, or its record is
    unreadable; :func:`restore_latest` treats it as an unreadable step."""


def _plain(leaf):
    """A typed PRNG key as its raw data; any other leaf as it is."""
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(leaf)
    return leaf


def digests(state) -> dict[str, str]:
    """``{path: sha256}`` of every array of ``state``: its dtype, shape and raw bytes.

    Fetched from the device once; a replicated array of a multi-process run is read from this
    process's copy.
    """
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    arrays = jax.device_get([_plain(leaf) for _, leaf in leaves])
    result = {}
    for (path, _), array in zip(leaves, arrays, strict=True):
        array = np.asarray(array)
        digest = hashlib.sha256(f'{array.dtype}{array.shape}'.encode())
        digest.update(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
        result[jax.tree_util.keystr(path)] = digest.hexdigest()
    return result


def _records_dir(directory) -> str:
    return os.path.join(os.path.dirname(os.fspath(directory)), RECORDS_DIR)


def _record_path(directory, step: int) -> str:
    return os.path.join(_records_dir(directory), f'{step}.json')


def read_record(directory, step: int) -> dict | None:
    """The record of ``step`` in the checkpoints folder ``directory``; None when it has none.

    Raises:
      CorruptCheckpointError: the record exists but is unreadable or not the step's.
    """
    path = _record_path(directory, step)
    try:
        record = files.read_json(path)
    except (OSError, ValueError) as e:
        raise CorruptCheckpointError(f'its record {path} is unreadable ({e})') from e
    if record is not None and (not isinstance(record, dict) or record.get('step') != step
                               or not isinstance(record.get('digests'), dict)):
        raise CorruptCheckpointError(f'its record {path} is not a record of step {step}')
    return record


def latest_record(workdir: str) -> dict | None:
    """The record of the newest saved step of ``workdir`` that has a readable one, or None."""
    directory = os.path.join(workdir, 'checkpoints')
    if not os.path.isdir(directory):
        return None
    for step in sorted((int(n) for n in os.listdir(directory) if n.isdigit()), reverse=True):
        try:
            record = read_record(directory, step)
        except CorruptCheckpointError:
            continue
        if record is not None:
            return record
    return None


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


def save(manager: ocp.CheckpointManager, state, **extra) -> None:
    """Saves ``state`` under its own step (asynchronously once copied off the device).

    First writes the step's record (the digests of ``state`` and the JSON values ``extra``),
    atomically, on process 0, and prunes the records of steps orbax no longer keeps.
    """
    step = int(jax.device_get(state.step))
    manager.wait_until_finished()  # the previous save final, the steps it pruned gone
    if jax.process_index() == 0:
        folder = _records_dir(manager.directory)
        os.makedirs(folder, exist_ok=True)
        record = {'version': RECORD_VERSION, 'step': step, 'digests': digests(state), **extra}
        # Keys in their order, so that the history restored from it is the same text.
        files.write_atomic(_record_path(manager.directory, step), json.dumps(record) + '\n')
        kept = {step, *manager.all_steps()}
        for name in os.listdir(folder):
            stem = name.removesuffix('.json')
            if stem.isdigit() and name.endswith('.json') and int(stem) not in kept:
                os.remove(os.path.join(folder, name))
    manager.save(step, args=ocp.args.StandardSave(state), force=True)


def _verify(manager: ocp.CheckpointManager, step: int, state) -> dict | None:
    """The record of ``step`` after checking ``state`` against it (None: no record).

    Raises:
      CorruptCheckpointError: an array differs from its recorded digest, or the record is
        unreadable.
    """
    record = read_record(manager.directory, step)
    if record is None:
        logging.warning(
            'The checkpoint at step %d has no record in %s (saved by a version before '
            'records); resumed from it without verifying its contents.',
            step, _records_dir(manager.directory))
        return None
    found = digests(state)
    # Arrays the record lacks were filled in by a migration (``migration.py``).
    bad = [path for path, digest in record['digests'].items() if found.get(path) != digest]
    if bad:
        raise CorruptCheckpointError(
            f'{len(bad)} of its {len(record["digests"])} arrays differ from the digests '
            f'recorded when it was saved, e.g. {bad[0]}')
    return record


def restore_latest(manager: ocp.CheckpointManager, template):
    """The latest readable saved state, shaped like ``template``; ``template`` when none exists.

    A step that cannot be read, or whose arrays differ from its record, is skipped with a
    warning naming it, moved aside (see the module docstring) and the step before it is
    tried. A step that lacks only fields added since to a ``NamedTuple`` of the state is
    restored with those fields taken from ``template``
    (:func:`migration.restore_with_new_fields`, a one-line warning).

    Raises:
      CheckpointMismatchError: the saved states have another structure, shape or dtype, or
        no step could be read at all.
    """
    return restore_latest_with_record(manager, template)[0]


def restore_latest_with_record(manager: ocp.CheckpointManager, template):
    """``(state, record)``: :func:`restore_latest` and the record of the restored step (None
    when nothing was restored or the step predates records)."""
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        return template, None
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
        try:
            record = _verify(manager, step, state)
        except CorruptCheckpointError as e:
            unreadable.append((step, e))
            continue
        for bad_step, error in unreadable:
            _set_aside(manager, bad_step, error, resumed_from=step)
        return state, record
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
    # Process 0 moves the step while the others wait on both sides: none may still be reading
    # it, nor list the folder half-moved (orbax's reload stats every step it lists).
    _barrier(f'set aside {step}: tried')
    if jax.process_index() == 0:
        if os.path.exists(target):
            shutil.rmtree(target)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(source, target)
        record = _record_path(manager.directory, step)
        if os.path.exists(record):  # kept with its step; a new save of the step writes anew
            os.replace(record, os.path.join(target, 'record.json'))
    _barrier(f'set aside {step}: moved')
    manager.reload()


def _barrier(name: str) -> None:
    """Waits for every process of a multi-process run to get here; nothing with one process."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _fits(manager: ocp.CheckpointManager, step: int) -> bool:
    """Whether ``step`` can be read at all, without a template (then the template is wrong)."""
    try:
        manager.restore(step, args=ocp.args.StandardRestore())
    except Exception:
        return False
    return True


def _no_readable_step(manager, unreadable) -> CheckpointMismatchError:
    steps = ', '.join(str(step) for step, _ in unreadable)
    first_step, first_error = unreadable[0]
    # Readable, just not as this run's state (a corrupt step may be readable too).
    if not isinstance(first_error, CorruptCheckpointError) and _fits(manager, first_step):
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
