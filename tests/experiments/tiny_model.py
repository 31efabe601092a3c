"""A tiny classifier for the tests of the training machinery (runs, resumes, processes, grids).

Those tests check what the runtime does with a model, not the model: this one has the parts
that matter to the runtime (parameters, BatchNorm statistics that pass 2 must not move twice,
a ``train`` flag) and compiles in about a second, where even WRN-10-1's train step takes 3-6 s
on CPU. Select it with ``config.model = tests.experiments.tiny_model.PATH`` and empty
``config.model_kwargs``.
"""

import flax.linen as nn
import jax.numpy as jnp

PATH = 'tests.experiments.tiny_model:MLP'


class MLP(nn.Module):
    num_classes: int
    hidden: int = 16

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(self.hidden)(x.reshape(x.shape[0], -1))
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(self.num_classes)(nn.relu(x))


CONSTANT_PATH = 'tests.experiments.tiny_model:Constant'


class Constant(nn.Module):
    """A classifier that has collapsed for good: the same (uniform) logits for every image,
    whatever its one parameter; what a too-large sharpness-aware rho can leave behind."""

    num_classes: int

    @nn.compact
    def __call__(self, x, train: bool = False):
        scale = self.param('scale', nn.initializers.zeros, (1,))
        return jnp.zeros((x.shape[0], self.num_classes)) * scale
