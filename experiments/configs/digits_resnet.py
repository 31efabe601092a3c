"""The offline demo: a small ResNet-18 on scikit-learn's 8x8 digits with 40% label noise.

Not a paper setting: everything is scaled to finish in about a minute per optimiser on two
CPU cores while still showing the effect the paper reports for noisy labels (VaSSO and SAM
resist memorising wrong labels; SGD fits them and loses test accuracy). The recipe is the
CIFAR one of ``default.py`` (SGD momentum 0.9, cosine, crop + flip, weight decay after the
link), shrunk: width 8, batch 64, and no augmentation at all, so that plain SGD can
memorise the wrong labels within 40 epochs. ``rho`` = 0.5 is larger than CIFAR's because
this network is tiny; on the demo, SAM and VaSSO resisted the noise at 0.3 and 0.5 and
diverged at 1.0. ``experiments/demo.py`` runs it once each with ``optimizer`` = sgd, sam and
vasso.
"""

from experiments.configs import default


def get_config():
    config = default.get_config()
    config.dataset = 'digits'
    config.model = 'resnet18'
    config.model_kwargs.width = 8
    config.label_noise = 0.4
    config.optimizer = 'vasso'
    config.num_epochs = 40
    config.batch_size = 64
    config.learning_rate = 0.05
    config.weight_decay = 5e-4
    config.rho = 0.5
    config.theta = 0.4
    config.crop_padding = 0
    config.flip = False
    config.cutout_size = 0
    config.cutout_prob = 0.0
    config.log_every_steps = 22  # one epoch (1438 // 64)
    config.eval_train = True  # train accuracy on noisy and on true labels, un-augmented
    config.checkpoint_every_steps = 10_000
    config.keep_checkpoints = 1
    return config
