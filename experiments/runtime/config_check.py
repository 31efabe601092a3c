"""One config check, per layer, run before anything is loaded, written or compiled.

:func:`check` raises :class:`~experiments.runtime.errors.ConfigError` with one line that names
the key (as the ``--config.KEY`` flag that sets it) and the values it accepts. It checks, in
order, the runtime's keys (schedule, batch, logging, checkpoints, data parallelism), the task's
keys (``task.check_config``) and the optimiser (built once: the library's own checks of its
hyperparameters are the validation, so the trainer never disagrees with it). What depends on
the data itself (e.g. a batch larger than a tiny mock split) is checked where it is loaded.

The small helpers (:func:`number`, :func:`at_least`, :func:`in_range`, :func:`choice`,
:func:`seed`, :func:`fail`) are the ones every task's check uses.
"""

import math
from collections.abc import Sequence

import ml_collections
import optax

from experiments.runtime import errors, optimizers


def fail(key: str, message: str):
    """Raises ``ConfigError('--config.KEY message')`` (``'--config.KEY=...'`` if it starts
    with ``=``)."""
    separator = '' if message.startswith('=') else ' '
    raise errors.ConfigError(f'--config.{key}{separator}{message}')


def choice(config, key: str, valid: Sequence[str]) -> None:
    if config[key] not in valid:
        raise errors.ConfigError(
            f'--config.{key}={config[key]!r} is not one of {", ".join(valid)}.')


def number(config, key: str, *, integer: bool = False):
    value = config[key]
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        fail(key, f'must be {"an integer" if integer else "a number"}, got {value!r}.')
    if not math.isfinite(value):
        fail(key, f'must be finite, got {value!r}.')
    return value


def at_least(config, key: str, low, hint: str = '', *, integer: bool = False) -> None:
    value = number(config, key, integer=integer)
    if value < low:
        fail(key, f'must be >= {low}, got {value}{hint}.')


def in_range(config, key: str, interval: str, hint: str = '') -> None:
    """``interval`` is written as in maths: '[0, 1)', '(0, 1]'..."""
    value = number(config, key)
    low, high = (float(x) for x in interval[1:-1].split(','))
    above = value >= low if interval[0] == '[' else value > low
    below = value <= high if interval[-1] == ']' else value < high
    if not (above and below):
        fail(key, f'must be in {interval}, got {value}{hint}.')


# Seeds jax.random.key takes without truncating them (it keeps the low 32 bits of larger ones).
SEED_RANGE = (0, 2**32)


def seed(config, key: str) -> int:
    """Refuses a seed outside :data:`SEED_RANGE` (an integer in [0, 2**32))."""
    value = number(config, key, integer=True)
    if not SEED_RANGE[0] <= value < SEED_RANGE[1]:
        fail(key, f'must be an integer in [0, 2**32), got {value}.')
    return value


def check(task, config: ml_collections.ConfigDict) -> None:
    """Raises ``ConfigError`` for the first invalid value of ``config`` (one line).

    Args:
      task: the run's task (``experiments.runtime.task.Task``).
      config: a config of that task, e.g. ``experiments/configs/default.py``'s.

    Raises:
      TypeError: ``config`` is not an ``ml_collections.ConfigDict``.
      errors.ConfigError: the first invalid value found, e.g.
        ``--config.batch_size must be >= 1, got 0.``
    """
    if not isinstance(config, ml_collections.ConfigDict):
        raise TypeError(
            f'config must be an ml_collections.ConfigDict (e.g. '
            f'experiments.configs.default.get_config()), got {type(config).__name__}.')
    check_runtime(config)
    task.check_config(config)
    check_optimizer(config)


def check_runtime(config: ml_collections.ConfigDict) -> None:
    """The runtime's keys: schedule, batch, logging, checkpoints, data parallelism."""
    choice(config, 'lr_schedule', optimizers.LR_SCHEDULES)
    lr = number(config, 'learning_rate')
    if lr <= 0:
        fail('learning_rate', f'must be > 0, got {lr} (e.g. 0.05).')
    low = number(config, 'min_learning_rate')
    if not 0 <= low <= lr:
        fail('min_learning_rate', f'must be in [0, learning_rate={lr}], got {low}.')
    at_least(config, 'warmup_epochs', 0)
    if 'warmup_steps' in config:
        at_least(config, 'warmup_steps', 0, ' (0: --config.warmup_epochs decides)', integer=True)
    if (config.lr_schedule == 'inverse_sqrt' and config.get('warmup_steps', 0) <= 0
            and config.warmup_epochs <= 0):
        fail('lr_schedule', "='inverse_sqrt' needs a warm-up: set --config.warmup_steps "
                            '(fairseq: 4000) or --config.warmup_epochs.')
    for key in ('batch_size', 'eval_batch_size', 'log_every_steps', 'checkpoint_every_steps',
                'keep_checkpoints'):
        at_least(config, key, 1, integer=True)
    steps = number(config, 'num_train_steps', integer=True)
    epochs = number(config, 'num_epochs')
    if steps <= 0 and epochs <= 0:
        raise errors.ConfigError(
            'Set --config.num_epochs or --config.num_train_steps to a value > 0.')
    number(config, 'eval_every_steps', integer=True)
    seed(config, 'seed')
    for key, what in (('ascent_group_size', 'whole batch'), ('data_shards', 'one per device')):
        value = number(config, key, integer=True) if key in config else 0
        if value < 0 or (value and config.batch_size % value):
            fail(key, f'={value} must be 0 ({what}) or divide '
                      f'--config.batch_size={config.batch_size}.')
    if not isinstance(config.get('skip_nonfinite', False), bool):
        fail('skip_nonfinite', f'must be True or False, got {config.skip_nonfinite!r}.')


def check_optimizer(config: ml_collections.ConfigDict) -> None:
    """The optimiser: base-optimiser keys, then the chain built once (the library's checks)."""
    in_range(config, 'momentum', '[0, 1)', ' (e.g. 0.9; 0 turns momentum off)')
    at_least(config, 'weight_decay', 0, ' (e.g. 5e-4)')
    optimizers.make_optimizers(config, optax.constant_schedule(config.learning_rate))

