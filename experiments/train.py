r"""Trains a CIFAR classifier with SGD, SAM, VaSSO or ASAM.

Usage:
  python -m experiments.train --config experiments/configs/cifar10_resnet18.py \
      --workdir runs/c10_r18_vasso [--config.optimizer=sam --config.rho=0.05 ...]

The workdir receives ``config.json``, ``metrics.jsonl``, TensorBoard events in
``tensorboard/``, orbax checkpoints in ``checkpoints/`` and ``summary.json``. Running the same
command again on the workdir resumes from its last checkpoint.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import checkpointing, data, loop, metrics, trainer

_WORKDIR = flags.DEFINE_string('workdir', None, 'Folder for checkpoints, metrics and summary.')
_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'A config file, e.g. experiments/configs/cifar10_resnet18.py.',
    lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
    logging.set_verbosity(logging.WARNING)
    try:
        summary = loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (data.DatasetNotFoundError, trainer.ConfigError,
            checkpointing.CheckpointMismatchError) as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
    print(metrics.format_summary(summary))
    print(f'\nOutputs in {_WORKDIR.value}')


if __name__ == '__main__':
    app.run(main)
