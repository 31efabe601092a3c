"""Wide residual networks WRN-d-k (Zagoruyko & Komodakis, 2016) in Flax linen.

Pre-activation blocks (BN-ReLU-conv, twice, dropout between the convolutions) in three stages
of ``(depth - 4) / 6`` blocks with ``base_width * widen_factor * (1, 2, 4)`` channels, after a
3x3 stem convolution with ``base_width`` channels, and a final BN-ReLU before the classifier.

Shortcuts: ``'projection'`` (the default, as in the official WRN and VaSSO code) is a 1x1
convolution of the pre-activated input whenever the shape changes; ``'zero_pad'`` (He et al.'s
option A) instead subsamples the raw input with the block's stride and appends zero channels,
which adds no parameters.
"""

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from experiments.image_classification.models import resnet

SHORTCUTS = ('projection', 'zero_pad')


class WideBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3 plus shortcut."""

    features: int
    strides: int = 1
    dropout_rate: float = 0.0
    shortcut: str = 'projection'
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        pre = nn.relu(resnet.batch_norm(train, self.dtype)(x))
        y = resnet.conv(self.features, 3, self.strides, self.dtype)(pre)
        y = nn.relu(resnet.batch_norm(train, self.dtype)(y))
        y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
        y = resnet.conv(self.features, 3, 1, self.dtype)(y)
        if self.strides == 1 and x.shape[-1] == self.features:
            return x + y
        if self.shortcut == 'projection':
            return resnet.conv(self.features, 1, self.strides, self.dtype)(pre) + y
        x = x[:, ::self.strides, ::self.strides, :]
        pad = self.features - x.shape[-1]
        return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, pad))) + y


class WideResNet(nn.Module):
    """WRN-depth-widen_factor for CIFAR-sized images.

    Attributes:
      num_classes: number of output logits.
      depth: total depth; ``(depth - 4)`` must be divisible by 6 (16, 22, 28, 40, ...).
      widen_factor: multiplies the stage widths (10 for WRN-28-10).
      dropout_rate: dropout between the two convolutions of each block; a non-zero rate
        needs a ``'dropout'`` PRNG key in ``apply(..., rngs={'dropout': key})`` when training.
      shortcut: ``'projection'`` (default) or ``'zero_pad'``; see the module docstring.
      base_width: channels of the stem; the stages have ``base_width * widen_factor * (1, 2,
        4)`` (16 in the paper; tests use 2-4).
      dtype: compute dtype (e.g. ``jnp.bfloat16``). Parameters and logits stay float32.

    ``__call__(x, train)`` takes NHWC float images and returns float32 logits of shape
    ``(batch, num_classes)``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> model = WideResNet(num_classes=10, depth=16, widen_factor=4, dropout_rate=0.3)
      >>> x = jnp.zeros((2, 32, 32, 3))
      >>> variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
      >>> train_step = lambda v: model.apply(v, x, train=True, mutable=['batch_stats'],
      ...                                    rngs={'dropout': jax.random.key(1)})
      >>> logits, _ = jax.eval_shape(train_step, variables)  # WRN-16-4, dropout 0.3
      >>> logits.shape
      (2, 10)

    References:
      Zagoruyko & Komodakis, 2016, Wide Residual Networks. https://arxiv.org/abs/1605.07146
    """

    num_classes: int
    depth: int = 28
    widen_factor: int = 10
    dropout_rate: float = 0.0
    shortcut: str = 'projection'
    base_width: int = 16
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        if self.depth < 10 or (self.depth - 4) % 6:
            raise ValueError(f'WideResNet depth must be 6n+4 with n >= 1 (e.g. 16, 28), '
                             f'got {self.depth}.')
        if self.shortcut not in SHORTCUTS:
            raise ValueError(f'WideResNet shortcut must be one of {SHORTCUTS}, '
                             f'got {self.shortcut!r}.')
        block = functools.partial(WideBlock, dropout_rate=self.dropout_rate,
                                  shortcut=self.shortcut, dtype=self.dtype)
        x = resnet.conv(self.base_width, 3, 1, self.dtype)(x)
        for i in range(3):
            for j in range((self.depth - 4) // 6):
                strides = 2 if i > 0 and j == 0 else 1
                x = block(self.base_width * self.widen_factor * 2**i, strides)(x, train)
        x = nn.relu(resnet.batch_norm(train, self.dtype)(x))
        return resnet.classifier_head(x, self.num_classes)
