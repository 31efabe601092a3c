"""Checks a training config before anything is loaded, written or compiled.

:func:`validate_config` raises :class:`experiments.trainer.ConfigError` with one line that
names the key (as the ``--config.KEY`` flag that sets it) and the values it accepts. It runs
first in ``train_and_evaluate``, so a bad value never costs a compilation and never touches
the workdir. What depends on the data itself (e.g. a batch larger than a tiny mock split) is
still checked where the data is loaded.
"""

import dataclasses
import math
from collections.abc import Sequence

import jax.numpy as jnp
import ml_collections

from experiments import data, models, trainer
from experiments.models import pyramidnet, wide_resnet

# Per dataset: (training examples, image side); what the checks below need.
DATASET_SHAPES = {
    'cifar10': (50_000, 32),
    'cifar100': (50_000, 32),
    'cifar10_n': (50_000, 32),
    'digits': (1_438, 8),
}


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises :class:`trainer.ConfigError` (one line naming the key) for an invalid config.

    Args:
      config: a configuration like ``experiments/configs/default.py``'s.

    Raises:
      ConfigError: the first invalid value found, e.g.
        ``--config.theta must be in (0, 1], got 0.0 (VaSSO's EMA weight; e.g. 0.4).``

    Examples:
      >>> from experiments.configs import digits_resnet
      >>> config = digits_resnet.get_config()
      >>> validate_config(config)
      >>> config.rho = -0.1
      >>> validate_config(config)
      Traceback (most recent call last):
      ...
      experiments.trainer.ConfigError: --config.rho must be >= 0, got -0.1 (0 turns the ...
    """
    if not isinstance(config, ml_collections.ConfigDict):
        raise TypeError(
            f'config must be an ml_collections.ConfigDict (e.g. '
            f'experiments.configs.default.get_config()), got {type(config).__name__}.'
        )
    _check_choice(config, 'optimizer', trainer.OPTIMIZERS)
    _check_choice(config, 'base_optimizer', trainer.BASE_OPTIMIZERS)
    _check_choice(config, 'lr_schedule', trainer.LR_SCHEDULES)
    _check_choice(config, 'dataset', data.DATASETS)
    _check_choice(config, 'noise_type', data.NOISE_TYPES)
    _check_choice(config, 'model', models.MODEL_NAMES)
    _check_optimizer(config)
    _check_schedule(config)
    _check_data(config)
    _check_model(config)
    trainer.validate_config(config)  # the trainer's own checks, should it grow some
    # Anything the library itself rejects (it checks its hyperparameters eagerly).
    trainer.make_sharpness_link(config)


def _fail(key: str, message: str):
    separator = '' if message.startswith('=') else ' '  # '--config.k=v ...' or '--config.k ...'
    raise trainer.ConfigError(f'--config.{key}{separator}{message}')


def _check_choice(config, key: str, valid: Sequence[str]) -> None:
    if config[key] not in valid:
        raise trainer.ConfigError(
            f'--config.{key}={config[key]!r} is not one of {", ".join(valid)}.'
        )


def _number(config, key: str, *, integer: bool = False):
    value = config[key]
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        _fail(key, f'must be {"an integer" if integer else "a number"}, got {value!r}.')
    if not math.isfinite(value):
        _fail(key, f'must be finite, got {value!r}.')
    return value


def _at_least(config, key: str, low, hint: str = '', *, integer: bool = False) -> None:
    value = _number(config, key, integer=integer)
    if value < low:
        _fail(key, f'must be >= {low}, got {value}{hint}.')


def _in_range(config, key: str, interval: str, hint: str = '') -> None:
    """``interval`` is written as in maths: '[0, 1)', '(0, 1]'..."""
    value = _number(config, key)
    low, high = (float(x) for x in interval[1:-1].split(','))
    above = value >= low if interval[0] == '[' else value > low
    below = value <= high if interval[-1] == ']' else value < high
    if not (above and below):
        _fail(key, f'must be in {interval}, got {value}{hint}.')


def _check_optimizer(config) -> None:
    _at_least(config, 'rho', 0, ' (0 turns the ascent off; e.g. 0.05)')
    if config.optimizer == 'vasso':
        _in_range(config, 'theta', '(0, 1]', " (VaSSO's EMA weight; e.g. 0.4)")
    if config.optimizer == 'asam' or (config.optimizer != 'sgd' and config.adaptive):
        value = _number(config, 'eta')
        if value <= 0:
            _fail('eta', f'must be > 0, got {value} (the offset of |w| + eta; e.g. 0.01).')
    _at_least(config, 'every_k', 1, ' (1 = sharpness-aware at every step)', integer=True)
    _in_range(config, 'momentum', '[0, 1)', ' (e.g. 0.9; 0 turns momentum off)')
    _at_least(config, 'weight_decay', 0, ' (e.g. 5e-4)')
    _in_range(config, 'label_smoothing', '[0, 1)', ' (0 turns it off)')


def _check_schedule(config) -> None:
    lr = _number(config, 'learning_rate')
    if lr <= 0:
        _fail('learning_rate', f'must be > 0, got {lr} (e.g. 0.05).')
    low = _number(config, 'min_learning_rate')
    if not 0 <= low <= lr:
        _fail('min_learning_rate', f'must be in [0, learning_rate={lr}], got {low}.')
    _at_least(config, 'warmup_epochs', 0)
    for key in (
        'batch_size',
        'eval_batch_size',
        'log_every_steps',
        'checkpoint_every_steps',
        'keep_checkpoints',
    ):
        _at_least(config, key, 1, integer=True)
    steps = _number(config, 'num_train_steps', integer=True)
    epochs = _number(config, 'num_epochs')
    if steps <= 0 and epochs <= 0:
        raise trainer.ConfigError(
            'Set --config.num_epochs or --config.num_train_steps to a value > 0.'
        )
    _number(config, 'eval_every_steps', integer=True)
    _number(config, 'seed', integer=True)


def _check_data(config) -> None:
    num_train, side = DATASET_SHAPES[config.dataset]
    _in_range(config, 'label_noise', '[0, 1)', ' (the fraction of labels flipped)')
    _number(config, 'noise_seed', integer=True)
    if config.label_noise and config.dataset == 'cifar10_n':
        _fail('label_noise', 'must be 0 for cifar10_n, which has human label noise already.')
    if config.label_noise and config.noise_type == 'asymmetric' and config.dataset != 'cifar10':
        _fail(
            'noise_type',
            f"='asymmetric' needs --config.dataset=cifar10 (its class map), "
            f"got {config.dataset}; use 'symmetric'.",
        )
    validation = _number(config, 'validation_size', integer=True)
    if not 0 <= validation < num_train:
        _fail(
            'validation_size',
            f'must be in [0, {num_train}) for {config.dataset}, got {validation}.',
        )
    if config.batch_size > num_train - validation:
        _fail(
            'batch_size',
            f'={config.batch_size} exceeds the {num_train - validation} '
            f'training examples of {config.dataset}; lower it.',
        )
    image = f'{side}x{side} images of {config.dataset}'
    for key, hint in (('crop_padding', ''), ('cutout_size', '; 0 turns Cutout off')):
        value = _number(config, key, integer=True)
        if not 0 <= value <= side:
            _fail(key, f'must be in [0, {side}] for the {image}, got {value}{hint}.')
    _in_range(config, 'cutout_prob', '[0, 1]')


def _check_model(config) -> None:
    kwargs = dict(config.model_kwargs)
    if 'dtype' in kwargs:
        try:
            kwargs['dtype'] = jnp.dtype(kwargs['dtype'])
        except TypeError:
            _fail(
                'model_kwargs.dtype',
                f'={kwargs["dtype"]!r} is not a dtype; use float32 or bfloat16.',
            )
    model_class = type(models.get_model(config.model, 10))
    fields = [
        f.name
        for f in dataclasses.fields(model_class)
        if f.init and f.name not in ('num_classes', 'parent', 'name')
    ]
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        _fail(
            f'model_kwargs.{unknown[0]}',
            f'is not an argument of {config.model}; valid: {", ".join(fields)}.',
        )
    for key, fixed in models.named_kwargs(config.model).items():
        if key in kwargs and kwargs[key] != fixed:  # a named architecture's own values
            _fail(f'model_kwargs.{key}', f'={kwargs[key]!r} contradicts --config.model='
                  f'{config.model} ({key}={fixed!r}); use --config.model=wrn or pyramidnet '
                  f'to set {key}.')
    _check_architecture(models.get_model(config.model, 10, **kwargs))


def _check_architecture(model) -> None:
    # The models check these when traced; checked here too, so a bad depth costs no tracing
    # (tracing PyramidNet-110 alone takes seconds).
    if isinstance(model, wide_resnet.WideResNet):
        if model.depth < 10 or (model.depth - 4) % 6:
            _fail(
                'model_kwargs.depth',
                f'must be 6n+4 with n >= 1 for a WideResNet (e.g. 16, 28), got {model.depth}.',
            )
        if model.shortcut not in wide_resnet.SHORTCUTS:
            _fail(
                'model_kwargs.shortcut',
                f'={model.shortcut!r} is not one of {", ".join(wide_resnet.SHORTCUTS)}.',
            )
    if isinstance(model, pyramidnet.PyramidNet):
        layers = 3 if model.bottleneck else 2
        if model.depth < 3 * layers + 2 or (model.depth - 2) % (3 * layers):
            _fail(
                'model_kwargs.depth',
                f'must be {3 * layers}n+2 with n >= 1 for a PyramidNet '
                f'(bottleneck={model.bottleneck}), got {model.depth}.',
            )
