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

import ml_collections
from absl import logging

from experiments.runtime import errors, files

CONFIG_FILE = 'config.json'
LOCK_FILE = '.lock'
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


def create(workdir) -> None:
    """Creates the folder ``workdir`` (and its parents) if needed.

    Raises:
      WorkdirError: ``workdir`` is not a path, is a file, or cannot be created.
    """
    if not isinstance(workdir, (str, os.PathLike)) or not os.fspath(workdir):
        raise WorkdirError(f'--workdir must be a folder path, got {workdir!r}.')
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(f'--workdir {workdir} is a file, not a folder; pass a folder.')
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise WorkdirError(
            f'Cannot create --workdir {workdir} ({e.strerror}); pass a folder you can write to.'
        ) from e


@contextlib.contextmanager
def lock(workdir: str, *, enabled: bool = True):
    """Holds an exclusive lock on ``workdir`` while the ``with`` block runs.

    Args:
      workdir: an existing folder.
      enabled: False makes this a no-op (e.g. on processes other than 0 of a multi-process
        run, which share process 0's workdir).

    Raises:
      WorkdirError: another live process holds the lock.
    """
    if not enabled:
        yield
        return
    path = os.path.join(workdir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
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

