"""The Fashion-MNIST study with asymmetric (class-pair) noise in place of symmetric noise.

The pairs (``FASHION_MNIST_ASYMMETRIC_MAP`` in
``experiments/image_classification/data/noise.py``): T-shirt <-> shirt, pullover -> coat,
sandal -> sneaker, ankle boot -> sneaker; 40% of each source class flipped, exactly.
"""

from experiments.configs import fashion_mnist_noise


def get_config():
    config = fashion_mnist_noise.get_config()
    config.noise_type = 'asymmetric'
    return config
