"""CIFAR-100, WRN-28-10, VaSSO: exactly the official ``train.sh``.

Sources (tags as in ``default.py``): 200 epochs, batch 128, SGD momentum 0.9, cosine [C];
``--lr 0.1 --weight_decay 1e-3 --rho 0.2 --theta 0.9`` [S]; crop/flip/cutout-16 [D].
"""

import ml_collections

from experiments.configs import default


def get_config():
    config = default.get_config()
    config.dataset = 'cifar100'
    config.model = 'wrn28_10'
    config.model_kwargs = ml_collections.ConfigDict(
        {'depth': 28, 'widen_factor': 10, 'dtype': 'float32'})
    config.learning_rate = 0.1
    config.rho = 0.2
    config.theta = 0.9
    return config
