"""The image-classification keys of a config: dataset, label noise, augmentation, model.

:func:`check_config` is the task's part of the one config check
(``experiments.runtime.config_check.check``: runtime keys, then these, then the optimiser), and
raises :class:`experiments.runtime.errors.ConfigError` with one line that names the key. It
runs before anything is loaded, written or compiled.
"""

import dataclasses

import jax.numpy as jnp
import ml_collections

from experiments.image_classification import data, models
from experiments.image_classification.models import pyramidnet, wide_resnet
from experiments.runtime import imports
from experiments.runtime.config_check import choice, fail, in_range, number, seed

# The built-in models' size arguments (channels, units, layers): integers >= 1.
SIZE_KWARGS = ('width', 'hidden', 'depth', 'widen_factor', 'base_width')

# Per dataset: (training examples, image side); what the checks below need.
DATASET_SHAPES = {
    'cifar10': (50_000, 32),
    'cifar100': (50_000, 32),
    'cifar10_n': (50_000, 32),
    'digits': (1_438, 8),
    'fashion_mnist': (60_000, 28),
}


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises ``ConfigError`` (one line naming the key) for an invalid task key.

    Examples:
      >>> from experiments.configs import digits_resnet
      >>> config = digits_resnet.get_config()
      >>> check_config(config)
      >>> config.cutout_size = 9
      >>> check_config(config)
      Traceback (most recent call last):
      ...
      experiments.runtime.errors.ConfigError: --config.cutout_size must be in [0, 8] for the ...
    """
    if not imports.is_import_path(config.dataset):
        choice(config, 'dataset', data.DATASETS)
    choice(config, 'noise_type', data.NOISE_TYPES)
    if not imports.is_import_path(config.model):
        choice(config, 'model', models.MODEL_NAMES)
    in_range(config, 'label_smoothing', '[0, 1)', ' (0 turns it off)')
    _check_data(config)
    _check_model(config)


def _check_data(config) -> None:
    in_range(config, 'label_noise', '[0, 1)', ' (the fraction of labels flipped)')
    seed(config, 'noise_seed')
    in_range(config, 'cutout_prob', '[0, 1]')
    if config.dataset not in DATASET_SHAPES:  # an import path: checked once it is loaded
        return
    num_train, side = DATASET_SHAPES[config.dataset]
    if config.label_noise and config.dataset == 'cifar10_n':
        fail('label_noise', 'must be 0 for cifar10_n, which has human label noise already.')
    if (config.label_noise and config.noise_type == 'asymmetric'
            and config.dataset not in data.noise.ASYMMETRIC_MAPS):
        fail(
            'noise_type',
            f"='asymmetric' has class maps for {', '.join(data.noise.ASYMMETRIC_MAPS)} only, "
            f"got {config.dataset}; use 'symmetric'.",
        )
    validation = number(config, 'validation_size', integer=True)
    if not 0 <= validation < num_train:
        fail(
            'validation_size',
            f'must be in [0, {num_train}) for {config.dataset}, got {validation}.',
        )
    subset = number(config, 'train_subset', integer=True)
    if not 0 <= subset <= num_train - validation:
        fail(
            'train_subset',
            f'must be in [0, {num_train - validation}] for {config.dataset} (0 = all), '
            f'got {subset}.',
        )
    available = subset or num_train - validation
    if config.batch_size > available:
        fail(
            'batch_size',
            f'={config.batch_size} exceeds the {available} '
            f'training examples of {config.dataset}; lower it.',
        )
    image = f'{side}x{side} images of {config.dataset}'
    for key, hint in (('crop_padding', ''), ('cutout_size', '; 0 turns Cutout off')):
        value = number(config, key, integer=True)
        if not 0 <= value <= side:
            fail(key, f'must be in [0, {side}] for the {image}, got {value}{hint}.')


def _check_model(config) -> None:
    kwargs = dict(config.model_kwargs)
    if 'dtype' in kwargs:
        try:
            kwargs['dtype'] = jnp.dtype(kwargs['dtype'])
        except TypeError:
            fail(
                'model_kwargs.dtype',
                f'={kwargs["dtype"]!r} is not a dtype; use float32 or bfloat16.',
            )
    try:
        model_class = (models.model_class(config.model) if imports.is_import_path(config.model)
                       else type(models.get_model(config.model, 10)))
    except ImportError as e:
        fail('model', f'={config.model!r}: {e}')
    if not dataclasses.is_dataclass(model_class):
        fail('model', f'={config.model!r} is not a Flax linen module class.')
    fields = [
        f.name
        for f in dataclasses.fields(model_class)
        if f.init and f.name not in ('num_classes', 'parent', 'name')
    ]
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        fail(
            f'model_kwargs.{unknown[0]}',
            f'is not an argument of {config.model}; valid: {", ".join(fields) or "none"}.',
        )
    if not imports.is_import_path(config.model):
        _check_sizes(kwargs)
    for key, fixed in models.named_kwargs(config.model).items():
        if key in kwargs and kwargs[key] != fixed:  # a named architecture's own values
            fail(f'model_kwargs.{key}', f'={kwargs[key]!r} contradicts --config.model='
                  f'{config.model} ({key}={fixed!r}); use --config.model=wrn or pyramidnet '
                  f'to set {key}.')
    _check_architecture(models.get_model(config.model, 10, **kwargs))


def _check_sizes(kwargs: dict) -> None:
    # Checked before the model is built: a width of 0 would divide by zero in its initialiser.
    for key in SIZE_KWARGS:
        value = kwargs.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            fail(f'model_kwargs.{key}', f'must be an integer >= 1, got {value!r}.')
    alpha = kwargs.get('alpha', 0)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha < 1e6:
        fail('model_kwargs.alpha', f'must be a number in [0, 1e6) (the widening over the '
                                   f'network, e.g. 270), got {alpha!r}.')
    rate = kwargs.get('dropout_rate', 0.0)
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
        fail('model_kwargs.dropout_rate', f'must be in [0, 1), got {rate!r}.')
    if not isinstance(kwargs.get('bottleneck', False), bool):
        fail('model_kwargs.bottleneck', f'must be True or False, got {kwargs["bottleneck"]!r}.')


def _check_architecture(model) -> None:
    # The models check these when traced; checked here too, so a bad depth costs no tracing
    # (tracing PyramidNet-110 alone takes seconds).
    if isinstance(model, wide_resnet.WideResNet):
        if model.depth < 10 or (model.depth - 4) % 6:
            fail(
                'model_kwargs.depth',
                f'must be 6n+4 with n >= 1 for a WideResNet (e.g. 16, 28), got {model.depth}.',
            )
        if model.shortcut not in wide_resnet.SHORTCUTS:
            fail(
                'model_kwargs.shortcut',
                f'={model.shortcut!r} is not one of {", ".join(wide_resnet.SHORTCUTS)}.',
            )
    if isinstance(model, pyramidnet.PyramidNet):
        layers = 3 if model.bottleneck else 2
        if model.depth < 3 * layers + 2 or (model.depth - 2) % (3 * layers):
            fail(
                'model_kwargs.depth',
                f'must be {3 * layers}n+2 with n >= 1 for a PyramidNet '
                f'(bottleneck={model.bottleneck}), got {model.depth}.',
            )
