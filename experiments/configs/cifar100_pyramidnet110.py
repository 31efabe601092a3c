"""CIFAR-100, PyramidNet-110 (alpha 270), VaSSO.

Sources (tags as in ``default.py``): the official code has no PyramidNet script, so this
keeps the shared recipe: 200 epochs, batch 128, SGD momentum 0.9, cosine lr 0.05 [C];
weight decay 1e-3 [R]; rho 0.2 for CIFAR-100 [S]; theta 0.4 [P]; crop/flip/cutout-16 [D].
"""

import ml_collections

from experiments.configs import default


def get_config():
    config = default.get_config()
    config.dataset = 'cifar100'
    config.model = 'pyramidnet110'
    config.model_kwargs = ml_collections.ConfigDict(
        {'depth': 110, 'alpha': 270, 'dtype': 'float32'})
    config.rho = 0.2
    return config
