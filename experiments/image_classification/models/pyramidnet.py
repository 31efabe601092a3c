"""PyramidNet (Han et al., 2017) for CIFAR in Flax linen.

Instead of doubling the width at each downsampling, PyramidNet widens every block by the same
amount (the additive rule): with ``N`` blocks in all, block ``k`` has
``round(base_width + k * alpha / N)`` channels, so the last stage ends ``alpha`` channels wider
than the stem. Three stages of ``N / 3`` blocks, stride 2 at the start of stages 2 and 3.

Blocks follow the official code: BN-conv3x3-BN-ReLU-conv3x3-BN (basic) or
BN-conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1(x4)-BN (bottleneck), with no ReLU after the
addition. Shortcuts are parameter-free: 2x2 average pooling when the block downsamples, then
zero channels appended to match the wider residual branch. The stem is conv3x3-BN (no ReLU);
the network ends with BN-ReLU, global average pooling and a dense layer.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from experiments.image_classification.models import resnet


class PyramidBlock(nn.Module):
    """One PyramidNet residual unit; the output has ``features * (4 if bottleneck else 1)``."""

    features: int
    strides: int = 1
    bottleneck: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        norm = lambda: resnet.batch_norm(train, self.dtype)
        y = norm()(x)
        if self.bottleneck:
            y = resnet.conv(self.features, 1, 1, self.dtype)(y)
            y = nn.relu(norm()(y))
            y = resnet.conv(self.features, 3, self.strides, self.dtype)(y)
            y = nn.relu(norm()(y))
            y = resnet.conv(self.features * 4, 1, 1, self.dtype)(y)
        else:
            y = resnet.conv(self.features, 3, self.strides, self.dtype)(y)
            y = nn.relu(norm()(y))
            y = resnet.conv(self.features, 3, 1, self.dtype)(y)
        y = norm()(y)
        if self.strides != 1:
            # PyTorch's AvgPool2d(2, ceil_mode=True): an odd edge averages the pixels it has,
            # which keeps the shortcut the same size as the stride-2, padding-1 convolution.
            x = nn.avg_pool(x, (2, 2), (2, 2), padding='SAME', count_include_pad=False)
        pad = y.shape[-1] - x.shape[-1]
        return y + jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, pad)))


class PyramidNet(nn.Module):
    """PyramidNet-depth (alpha) for CIFAR-sized images.

    Attributes:
      num_classes: number of output logits.
      depth: total depth; ``depth - 2`` must be divisible by 6 (basic) or 9 (bottleneck).
        110 gives 18 basic blocks per stage.
      alpha: total widening over the network (270 for PyramidNet-110, alpha=270).
      bottleneck: use bottleneck blocks (4x expansion), as in PyramidNet-272 (alpha=200).
      base_width: channels of the stem, which each of the ``N`` blocks widens by
        ``alpha / N`` (16 in the paper; tests use 2-4).
      dtype: compute dtype (e.g. ``jnp.bfloat16``). Parameters and logits stay float32.

    ``__call__(x, train)`` takes NHWC float images and returns float32 logits of shape
    ``(batch, num_classes)``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> model = PyramidNet(num_classes=100, depth=110, alpha=270)
      >>> x = jnp.zeros((2, 32, 32, 3))
      >>> logits, variables = jax.eval_shape(
      ...     lambda: model.init_with_output(jax.random.key(0), x, train=False))
      >>> logits.shape, variables['params']['Dense_0']['kernel'].shape  # 16 + 270 channels
      ((2, 100), (286, 100))

    References:
      Han, Kim & Kim, 2017, Deep Pyramidal Residual Networks.
      https://arxiv.org/abs/1610.02915
    """

    num_classes: int
    depth: int = 110
    alpha: float = 270
    bottleneck: bool = False
    base_width: int = 16
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        layers_per_block = 3 if self.bottleneck else 2
        per_stage, rest = divmod(self.depth - 2, 3 * layers_per_block)
        if per_stage < 1 or rest:
            raise ValueError(f'PyramidNet depth must be {3 * layers_per_block}n+2 with n >= 1 '
                             f'(bottleneck={self.bottleneck}), got {self.depth}.')
        x = resnet.conv(self.base_width, 3, 1, self.dtype)(x)
        x = resnet.batch_norm(train, self.dtype)(x)
        step = self.alpha / (3 * per_stage)
        for k in range(3 * per_stage):
            strides = 2 if k in (per_stage, 2 * per_stage) else 1
            # Python's round (ties to even) reproduces the official code's widths exactly.
            features = int(round(self.base_width + (k + 1) * step))
            x = PyramidBlock(features, strides, self.bottleneck, self.dtype)(x, train)
        x = nn.relu(resnet.batch_norm(train, self.dtype)(x))
        return resnet.classifier_head(x, self.num_classes)
