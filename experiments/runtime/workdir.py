"""Workdir safety: one live run per workdir, and a workdir keeps the config it was started with.

- :func:`lock` holds an exclusive ``flock`` on ``WORKDIR/.lock`` for the run's lifetime; the OS
  releases it when the process ends, however it ends (``kill -9`` included), so a stale lock
  never blocks a rerun. A second run on the workdir is refused with the holder's pid.
- :func:`check_config` compares the config with the one the run's latest checkpoint was saved
  with (its record, see ``checkpointing.py``), else with ``WORKDIR/config.json``, and refuses
  a run whose config differs in a key that changes the maths (:data:`EXEMPT_KEYS` do not),
  unless told to allow it. :func:`save_config` writes ``config.json`` atomically;
  :func:`restore_config` rewrites a deleted one from the checkpoint's record.
"""

import contextlib
import errno
import fcntl
import json
import os
import socket

import ml_collections
from absl import logging

from experiments.runtime import errors, files

CONFIG_FILE = 'config.json'
LOCK_FILE = '.lock'
# Longest names the run writes under WORKDIR (the orbax names are those of a save in progress;
# 20 digits hold any step or timestamp orbax appends). The tensorboard event file is added with
# this machine's host name.
_DIGITS = '0' * 20
_LONGEST_WRITES = (
    f'checkpoints/{_DIGITS}.orbax-checkpoint-tmp-{_DIGITS}/default.orbax-checkpoint-tmp-'
    f'{_DIGITS}/ocdbt.process_{_DIGITS}/d/{"0" * 32}.tmp',
    f'checkpoints_unreadable/{_DIGITS}/default/ocdbt.process_{_DIGITS}/d/{"0" * 32}',
    f'checkpoints/{_DIGITS}/default/array_metadatas/process_{_DIGITS}.tmp',
)
# Keys that change what is logged, evaluated or checkpointed and when, but never the params:
# a run may continue with other values for them.
EXEMPT_KEYS = (
    'progress_bar',
    'log_every_steps',
    'eval_every_steps',
    'eval_batch_size',
    'eval_train',
    'checkpoint_every_steps',
    'keep_checkpoints',
    'data_dir',
)


class WorkdirError(errors.BadInputError):
    """The workdir cannot take this run; the message is one line and names the fix."""


def create(workdir) -> str | None:
    """Creates the folder ``workdir`` (and its parents) if needed.

    Returns:
      The top-most folder this call created (``workdir`` or one of its parents), or None when
      ``workdir`` existed: what :func:`remove_if_unused` may remove again.

    Raises:
      WorkdirError: ``workdir`` is not a path, is a file, is too long for the file system
        (:func:`check_path_length`), or cannot be created.
    """
    if not isinstance(workdir, (str, os.PathLike)) or not os.fspath(workdir):
        raise WorkdirError(f'--workdir must be a folder path, got {workdir!r}.')
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(f'--workdir {workdir} is a file, not a folder; pass a folder.')
    check_path_length(workdir)
    top = None
    parent = os.path.abspath(workdir)
    while not os.path.exists(parent):
        top, parent = parent, os.path.dirname(parent)
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise WorkdirError(
            f'Cannot create --workdir {workdir} ({e.strerror}); pass a folder you can write to.'
        ) from e
    return top


def remove_if_unused(workdir: str, created: str | None) -> None:
    """Removes ``workdir`` and the parents up to ``created`` when they hold nothing but the lock.

    For a run that created its workdir and failed before writing anything (a config value
    checked late, data not prepared): it leaves no empty workdir behind.
    """
    if created is None or not os.path.isdir(workdir):
        return
    if set(os.listdir(workdir)) - {LOCK_FILE}:
        return
    with contextlib.suppress(OSError):
        os.remove(os.path.join(workdir, LOCK_FILE))
        folder = os.path.abspath(workdir)
        while True:
            os.rmdir(folder)  # fails, and stops, at a folder that holds something
            if folder == created:
                break
            folder = os.path.dirname(folder)


@contextlib.contextmanager
def lock(workdir: str):
    """Holds an exclusive lock on ``workdir`` while the ``with`` block runs.

    Args:
      workdir: an existing folder. In a multi-process run, process 0 alone holds it
        (``runtime/loop.py``).

    Raises:
      WorkdirError: another live process holds the lock.
      errors.EnvironmentFailure: the workdir cannot be written (read-only, no permission).
    """
    path = os.path.join(workdir, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        raise errors.EnvironmentFailure(
            f'Cannot write to --workdir {workdir} ({e.strerror}); make it writable or pass '
            'another --workdir.', e.errno) from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 32, 0).decode(errors='replace').strip() or 'unknown'
            raise WorkdirError(
                f'Workdir {workdir} is in use by another run (pid {holder}); wait for it to '
                'end or pass another --workdir.'
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f'{os.getpid()}\n'.encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (deleting it would race a new run)


def config_dict(config: ml_collections.ConfigDict) -> dict:
    """The config as ``config.json`` holds it (plain JSON types)."""
    return json.loads(config.to_json_best_effort(sort_keys=True))


def _flatten(tree: dict, prefix: str = '') -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f'{prefix}{key}.'))
        else:
            flat[f'{prefix}{key}'] = value
    return flat


def changed_keys(old: dict, new: dict) -> list[str]:
    """Dotted keys whose values differ (``model_kwargs.width``), exempt keys left out."""
    old, new = _flatten(old), _flatten(new)
    keys = sorted(set(old) | set(new))
    return [k for k in keys if old.get(k) != new.get(k) and k.split('.')[0] not in EXEMPT_KEYS]


def check_config(
    workdir: str,
    config: ml_collections.ConfigDict,
    *,
    defaults: ml_collections.ConfigDict | None = None,
    allow_change: bool = False,
    recorded: dict | None = None,
) -> None:
    """Refuses ``config`` when ``workdir`` was started with a config that differs from it.

    Args:
      workdir: the run's folder; nothing is checked when it has no ``config.json`` and
        ``recorded`` is None.
      config: this run's config.
      defaults: the task's default config; a top-level key missing from an older workdir's
        ``config.json`` ran at its default there.
      allow_change: continue anyway (with a warning naming the changed keys).
      recorded: the config saved with the run's latest checkpoint; when given it is the one
        compared (``config.json`` may have been edited or deleted since).

    Raises:
      WorkdirError: the configs differ in a non-exempt key, or ``config.json`` is unreadable.
    """
    path = os.path.join(workdir, CONFIG_FILE)
    if recorded is not None:
        old = recorded
    elif not os.path.exists(path):
        return
    else:
        try:
            old = files.read_json(path)
        except (OSError, ValueError) as e:
            raise WorkdirError(
                f'{path} is unreadable ({e}); repair or delete it, or pass another --workdir.'
            ) from e
    # A key added to the trainer since the workdir was started ran at its default.
    if defaults is not None:
        flat_defaults = _flatten(config_dict(defaults))
        old = {**{k: v for k, v in flat_defaults.items() if '.' not in k}, **old}
    changed = changed_keys(old, config_dict(config))
    if not changed:
        return
    flat_old, flat_new = _flatten(old), _flatten(config_dict(config))
    diffs = ', '.join(f'{k}: {flat_old.get(k)!r} -> {flat_new.get(k)!r}' for k in changed)
    if allow_change:
        logging.warning('Workdir %s continues with a changed config (%s).', workdir, diffs)
        return
    raise WorkdirError(
        f'Workdir {workdir} was started with another config ({diffs}); rerun '
        'with --allow_config_change to continue it with this one, or pass '
        'another --workdir.'
    )


def restore_config(workdir: str, recorded: dict, step: int) -> None:
    """Rewrites a missing ``config.json`` from the config recorded with checkpoint ``step``."""
    path = os.path.join(workdir, CONFIG_FILE)
    if os.path.exists(path):
        return
    files.write_json(path, recorded)
    logging.warning('%s was missing; restored it from the record of the checkpoint at step %d.',
                    path, step)


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Writes ``WORKDIR/config.json`` atomically: a crash leaves the old file or the new one."""
    files.write_atomic(
        os.path.join(workdir, CONFIG_FILE),
        config.to_json_best_effort(indent=2, sort_keys=True) + '\n',
    )


def check_path_length(workdir: str) -> None:
    """Refuses ``workdir`` when a path the run writes there would exceed the OS limits.

    Raises:
      WorkdirError: a component of ``workdir`` is longer than the file system's name
        limit, or ``workdir`` leaves no room for the run's longest path (PC_PATH_MAX).
    """
    path = os.path.abspath(os.fspath(workdir))
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    name_max, path_max = (os.pathconf(existing, key) for key in ('PC_NAME_MAX', 'PC_PATH_MAX'))
    long_names = [name for name in path.split(os.sep) if len(name.encode()) > name_max]
    if long_names:
        raise WorkdirError(
            f'--workdir has a folder name of {len(long_names[0].encode())} bytes, over the file '
            f"system's limit of {name_max}; pass a --workdir with shorter names.")
    tensorboard = f'tensorboard/events.out.tfevents.{_DIGITS}.{socket.gethostname()}.{_DIGITS}'
    longest = max(len(name.encode()) for name in (*_LONGEST_WRITES, tensorboard))
    length = len(path.encode()) + 1 + longest
    if length >= path_max:
        raise WorkdirError(
            f'--workdir is {len(path.encode())} bytes long (absolute); the run writes paths of '
            f"up to {length} bytes there, over the file system's limit of {path_max - 1}; pass "
            f'a --workdir of at most {path_max - 2 - longest} bytes.')
