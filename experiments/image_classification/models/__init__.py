"""CIFAR-sized Flax linen models, built by name, or a user's model by import path.

Every model is called as ``model.apply(variables, x, train=...)`` on NHWC float images, keeps
BatchNorm statistics in the ``'batch_stats'`` collection, has a ``dtype`` attribute for the
compute dtype, and returns float32 logits.

A model of your own needs no fork: ``--config.model=my_pkg.nets:MyNet`` imports ``MyNet``
and builds ``MyNet(num_classes=..., **config.model_kwargs)``. It must be a Flax linen
module called as ``model.apply(variables, x, train=...)`` on NHWC float images, returning
``[batch, num_classes]`` logits; BatchNorm statistics, if any, go in ``'batch_stats'`` and
dropout draws from the ``'dropout'`` rng.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from experiments.image_classification import models
  >>> model = models.get_model('resnet18', num_classes=10)
  >>> x = jnp.zeros((1, 32, 32, 3))
  >>> variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  >>> sorted(variables)
  ['batch_stats', 'params']
  >>> sum(p.size for p in jax.tree.leaves(variables['params']))
  11173962
"""

import flax.linen as nn

from experiments.image_classification.models import cnn, pyramidnet, resnet, wide_resnet
from experiments.runtime import imports

# name -> (constructor, default keyword arguments); keyword arguments to get_model override.
_REGISTRY = {
    'cnn': (cnn.SmallCNN, {}),
    'resnet18': (resnet.ResNet18, {}),
    'resnet34': (resnet.ResNet34, {}),
    'wrn': (wide_resnet.WideResNet, {}),
    'wrn28_10': (wide_resnet.WideResNet, {'depth': 28, 'widen_factor': 10}),
    'wrn16_4': (wide_resnet.WideResNet, {'depth': 16, 'widen_factor': 4}),
    'pyramidnet': (pyramidnet.PyramidNet, {}),
    'pyramidnet110': (pyramidnet.PyramidNet, {'depth': 110, 'alpha': 270}),
    'pyramidnet272': (pyramidnet.PyramidNet, {'depth': 272, 'alpha': 200, 'bottleneck': True}),
}
MODEL_NAMES = tuple(_REGISTRY)


def named_kwargs(name: str) -> dict:
    """The architecture values that model ``name`` fixes (e.g. ``'wrn28_10'``: depth 28,
    widen factor 10); kwargs may repeat them but not change them. None for an import path."""
    return {} if imports.is_import_path(name) else dict(_REGISTRY[name][1])


def model_class(name: str) -> type:
    """The class ``name`` builds: a registered one, or the object at an import path.

    Raises:
      ValueError: an unknown name; ImportError: an import path that does not resolve.
    """
    if imports.is_import_path(name):
        return imports.resolve(name)
    if name not in _REGISTRY:
        raise ValueError(f'Unknown model {name!r}; valid names: {", ".join(MODEL_NAMES)}, or '
                         'an import path such as my_pkg.nets:MyNet.')
    return _REGISTRY[name][0]


def get_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Returns the model called ``name`` with ``num_classes`` outputs.

    Args:
      name: an import path (``'my_pkg.nets:MyNet'``, built as ``MyNet(num_classes=...,
        **kwargs)``) or one of ``MODEL_NAMES``: ``'cnn'`` (kwargs ``width`` = 16, ``hidden`` =
        128: a small BatchNorm CNN for 28x28 images), ``'resnet18'``, ``'resnet34'`` (kwarg
        ``width``, default 64); ``'wrn'`` (kwargs ``depth`` = 28, ``widen_factor`` = 10),
        ``'wrn28_10'``,
        ``'wrn16_4'`` (all WRNs: ``dropout_rate``, ``shortcut``, ``base_width``);
        ``'pyramidnet'`` (kwargs ``depth`` = 110, ``alpha`` = 270, ``bottleneck``),
        ``'pyramidnet110'`` (alpha 270), ``'pyramidnet272'`` (bottleneck, alpha 200) (all
        PyramidNets: ``base_width``).
      num_classes: number of output logits.
      **kwargs: attributes of the model class; a named architecture's own values (e.g.
        ``'wrn28_10'``'s depth and widen factor) may be repeated but not changed. Every model
        accepts ``dtype`` (compute dtype, e.g. ``jnp.bfloat16``).

    Returns:
      An unbound ``flax.linen.Module``.

    Raises:
      ValueError: for an unknown ``name``, or a kwarg that contradicts it.
    """
    if imports.is_import_path(name):
        return model_class(name)(num_classes=num_classes, **kwargs)
    model_class(name)  # an unknown name is a ValueError
    constructor, defaults = _REGISTRY[name]
    for key, value in kwargs.items():
        if value != defaults.get(key, value):
            generic = 'wrn' if constructor is wide_resnet.WideResNet else 'pyramidnet'
            raise ValueError(
                f'Model {name!r} has {key}={defaults[key]!r}, not {value!r}; use {generic!r} '
                f'to set {key}.')
    return constructor(num_classes=num_classes, **{**defaults, **kwargs})
