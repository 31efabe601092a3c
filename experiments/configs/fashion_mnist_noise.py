"""Fashion-MNIST label-noise study: 70,000 real 28x28 images, offline (README "Results").

Data: Debian's ``dataset-fashion-mnist`` idx files (found automatically), a folder of them
(``--config.data_dir``), or TFDS's prepared ``fashion_mnist``. The recipe must put plain SGD in
the memorisation regime (its accuracy on the noisy training labels far above the clean
fraction by the end), or there is nothing for SAM or VaSSO to prevent. Chosen for a 2-core CPU
budget: a fixed random 10,000-image training subset (the same images for every run), the small
BatchNorm CNN (``'cnn'``, width 16), no augmentation, 30 epochs, batch 128, SGD momentum 0.9,
lr 0.05 cosine, weight decay 5e-4. ``rho`` is calibrated on one seed at 40% symmetric noise
before the grid runs (the window is narrow: too large a rho collapses training to the
constant predictor, loss ln 10).
"""

from experiments.configs import default


def get_config():
    config = default.get_config()
    config.dataset = 'fashion_mnist'
    config.train_subset = 10_000
    config.model = 'cnn'
    config.model_kwargs = {'width': 16, 'hidden': 128, 'dtype': 'float32'}
    config.label_noise = 0.4
    config.optimizer = 'vasso'
    config.num_epochs = 30
    config.batch_size = 128
    config.learning_rate = 0.05
    config.weight_decay = 5e-4
    config.rho = 0.1
    config.theta = 0.4
    config.crop_padding = 0
    config.flip = False
    config.cutout_size = 0
    config.cutout_prob = 0.0
    config.log_every_steps = 78  # one epoch (10000 // 128)
    config.eval_train = True  # accuracy on the noisy and on the true training labels
    config.checkpoint_every_steps = 780
    config.keep_checkpoints = 1
    config.progress_bar = False
    return config
