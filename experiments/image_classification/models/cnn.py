"""A small VGG-style CNN with BatchNorm, for 28x28 grey images on a CPU budget.

Two stages of two 3x3 convolutions (``width`` and ``2 * width`` channels), each convolution
followed by BatchNorm and ReLU, a 2x2 max-pool after each stage, then a hidden dense layer of
``hidden`` units and the classifier. At width 16 it has about 0.2M parameters; on 28x28
inputs it costs a fraction of the CIFAR ResNet-18 (which keeps full resolution in its first
stage), so a label-noise grid of dozens of runs fits a CPU. The layers are the ResNets' own
(``resnet.conv``, ``resnet.batch_norm``), so it initialises like them.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from experiments.image_classification.models import resnet


class SmallCNN(nn.Module):
    """``conv-BN-ReLU x2, max-pool`` at ``width`` then ``2 * width`` channels, dense, logits."""

    num_classes: int = 10
    width: int = 16
    hidden: int = 128
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = x.astype(self.dtype)
        for features in (self.width, 2 * self.width):
            for _ in range(2):
                x = resnet.conv(features, 3, dtype=self.dtype)(x)
                x = nn.relu(resnet.batch_norm(train, dtype=self.dtype)(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(self.hidden, kernel_init=resnet.DENSE_INIT, dtype=self.dtype)(x))
        return nn.Dense(self.num_classes, kernel_init=resnet.DENSE_INIT,
                        dtype=jnp.float32)(x.astype(jnp.float32))
