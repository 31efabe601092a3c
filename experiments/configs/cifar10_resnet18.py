"""CIFAR-10, ResNet-18, VaSSO: the official recipe as in ``default.py``.

Sources (tags as in ``default.py``): 200 epochs, batch 128, SGD momentum 0.9, cosine lr
0.05 [C]; weight decay 1e-3 for VaSSO [R] ("ResNet18 on CIFAR10 trained with VaSSO ...
--weight_decay 1e-3"); rho 0.1, theta 0.4 [P]; crop/flip/cutout-16 [D].
The README's SGD baseline is ``--config.optimizer=sgd --config.weight_decay=5e-4`` [R].
"""

from experiments.configs import default


def get_config():
    config = default.get_config()
    config.dataset = 'cifar10'
    config.model = 'resnet18'
    return config
