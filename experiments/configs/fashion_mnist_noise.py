"""Fashion-MNIST label-noise study: real 28x28 images, offline (see README "Results").

Recipe chosen so that plain SGD memorises the wrong labels within the run (otherwise there is
nothing for SAM or VaSSO to prevent): a random 10,000-image training subset (the same images
for every run), ResNet-18 of width 8 with BatchNorm, no augmentation, 40 epochs. Calibrated on
one seed at 40% symmetric noise before the grid (numbers in the README).
"""

from experiments.configs import default


def get_config():
    config = default.get_config()
    config.dataset = 'fashion_mnist'
    config.train_subset = 10_000
    config.model = 'resnet18'
    config.model_kwargs.width = 8
    config.label_noise = 0.4
    config.optimizer = 'vasso'
    config.num_epochs = 40
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
    return config
