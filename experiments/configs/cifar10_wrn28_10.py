"""CIFAR-10, WRN-28-10, VaSSO.

Sources (tags as in ``default.py``): 200 epochs, batch 128, SGD momentum 0.9, cosine [C];
lr 0.1 and weight decay 1e-3 from the official WRN-28-10 command [S]; rho 0.1 for CIFAR-10
and theta 0.4 [P]; crop/flip/cutout-16 [D].
"""

import ml_collections

from experiments.configs import default


def get_config():
    config = default.get_config()
    config.dataset = 'cifar10'
    config.model = 'wrn28_10'
    config.model_kwargs = ml_collections.ConfigDict(
        {'depth': 28, 'widen_factor': 10, 'dtype': 'float32'})
    config.learning_rate = 0.1
    return config
