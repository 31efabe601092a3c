"""CIFAR ResNet-18 and ResNet-34 (He et al., 2016) in Flax linen, and the shared layers.

The CIFAR variant used by the SAM and VaSSO PyTorch code: a 3x3 stride-1 stem convolution and
no max-pool, so a 32x32 image keeps full resolution in the first stage. Four stages of basic
blocks with ``width * (1, 2, 4, 8)`` channels (64, 128, 256, 512 at the default width); a 1x1
convolution plus BatchNorm projects the shortcut whenever the shape changes.

``conv``, ``batch_norm`` and ``classifier_head`` are shared by every model in this package so
that all of them initialise and normalise exactly like the PyTorch reference code.

BatchNorm statistics live in the ``'batch_stats'`` collection; ``train=True`` normalises with
batch statistics and updates the running averages (apply with ``mutable=['batch_stats']``).
"""

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

# torchvision's kaiming_normal_(mode='fan_out', nonlinearity='relu'): an untruncated normal.
CONV_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# PyTorch's default nn.Linear weight init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
DENSE_INIT = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')
# Flax momentum is the weight kept by the old average: 0.9 here is PyTorch's momentum=0.1.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def conv(features: int, kernel_size: int, strides: int = 1, dtype: Any = jnp.float32):
    """A bias-free square convolution with PyTorch's padding and Kaiming fan-out init.

    Padding is ``kernel_size // 2`` on every side rather than ``'SAME'``: for stride 2 on an
    even input 'SAME' pads only the bottom/right, which shifts every window by one pixel
    relative to the reference networks.
    """
    pad = kernel_size // 2
    return nn.Conv(features, (kernel_size, kernel_size), strides, padding=pad, use_bias=False,
                   kernel_init=CONV_INIT, dtype=dtype)


def batch_norm(train: bool, dtype: Any = jnp.float32):
    """BatchNorm with PyTorch's defaults; running averages are used when not training."""
    return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                        epsilon=BN_EPSILON, dtype=dtype)


def classifier_head(x, num_classes: int):
    """Global average pool and a dense layer, both in float32.

    The head is cheap, and doing it in float32 gives the loss full-precision logits whatever
    the compute dtype of the body.
    """
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return nn.Dense(num_classes, kernel_init=DENSE_INIT, dtype=jnp.float32)(x)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a (projected) identity shortcut."""

    features: int
    strides: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        y = conv(self.features, 3, self.strides, self.dtype)(x)
        y = nn.relu(batch_norm(train, self.dtype)(y))
        y = conv(self.features, 3, 1, self.dtype)(y)
        y = batch_norm(train, self.dtype)(y)
        shortcut = x
        if self.strides != 1 or x.shape[-1] != self.features:
            shortcut = conv(self.features, 1, self.strides, self.dtype)(x)
            shortcut = batch_norm(train, self.dtype)(shortcut)
        return nn.relu(y + shortcut)


class ResNet(nn.Module):
    """CIFAR ResNet with basic blocks.

    Attributes:
      num_classes: number of output logits.
      stage_sizes: blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
      width: channels of the stem and the first stage; each later stage doubles them. 64 is
        the paper's network; tests use 4-8.
      dtype: compute dtype (e.g. ``jnp.bfloat16``). Parameters and logits stay float32.

    ``__call__(x, train)`` takes NHWC float images and returns float32 logits of shape
    ``(batch, num_classes)``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> model = ResNet18(num_classes=10, width=4, dtype=jnp.bfloat16)
      >>> x = jnp.zeros((2, 8, 8, 1))
      >>> init = lambda: model.init(jax.random.key(0), x, train=False)
      >>> train_step = lambda v: model.apply(v, x, train=True, mutable=['batch_stats'])
      >>> logits, updates = jax.eval_shape(train_step, jax.eval_shape(init))
      >>> logits.shape, logits.dtype, sorted(updates)
      ((2, 10), dtype('float32'), ['batch_stats'])

    References:
      He et al., 2016, Deep Residual Learning for Image Recognition.
      https://arxiv.org/abs/1512.03385
    """

    num_classes: int
    stage_sizes: Sequence[int]
    width: int = 64
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        x = conv(self.width, 3, 1, self.dtype)(x)
        x = nn.relu(batch_norm(train, self.dtype)(x))
        for i, num_blocks in enumerate(self.stage_sizes):
            for j in range(num_blocks):
                strides = 2 if i > 0 and j == 0 else 1
                x = BasicBlock(self.width * 2**i, strides, self.dtype)(x, train)
        return classifier_head(x, self.num_classes)


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2))
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3))
