"""CIFAR-100, ResNet-18, VaSSO.

Sources (tags as in ``default.py``): 200 epochs, batch 128, SGD momentum 0.9, cosine lr
0.05 [C]; weight decay 1e-3 [R]; rho 0.2 for CIFAR-100 [S] (the official script's CIFAR-100
radius); theta 0.4 [P]; crop/flip/cutout-16 [D].
"""

from experiments.configs import default


def get_config():
    config = default.get_config()
    config.dataset = 'cifar100'
    config.model = 'resnet18'
    config.rho = 0.2
    return config
