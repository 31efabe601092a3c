r"""Trains a task (image classification by default) with SGD or a sharpness-aware optimiser.

Usage:
  python -m experiments.train --config experiments/configs/cifar10_resnet18.py \
      --workdir runs/c10_r18_vasso [--config.optimizer=sam --config.rho=0.05 ...]

The workdir receives ``config.json``, ``metrics.jsonl``, TensorBoard events in
``tensorboard/``, orbax checkpoints in ``checkpoints/`` (each verified against its record in
``checkpoint_records/``) and ``summary.json``. Running the same
command again on the workdir resumes from its last checkpoint.

The task is ``config.task`` (a folder of ``experiments/`` with a ``task.TASK``; default
``image_classification``); the run itself is ``experiments.runtime.loop``.
"""

import importlib

from absl import app, flags, logging
from ml_collections import config_flags

from experiments.runtime import cli, distributed, loop, metrics

DEFAULT_TASK = 'image_classification'

_WORKDIR = flags.DEFINE_string('workdir', None, 'Folder for checkpoints, metrics and summary.')
_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'A config file, e.g. experiments/configs/cifar10_resnet18.py.',
    lock_config=True)
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    'allow_config_change', False,
    'Continue a workdir that was started with another config (see README, Resuming).')
# Multi-process runs (one process per host): JAX's own distributed runtime. Not needed on one
# host, nor where JAX detects the cluster itself (TPU pods, SLURM, Open MPI, Kubernetes).
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'HOST:PORT of process 0, e.g. 10.0.0.1:1234.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes of the run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, in [0, num_processes).')
_DISTRIBUTED_TIMEOUT = flags.DEFINE_integer(
    'distributed_timeout_s', 300, 'Seconds to wait for all processes to join.')
flags.mark_flags_as_required(['config', 'workdir'])


def get_task(config):
    """The task object of ``config.task`` (``experiments.<task>.task.TASK``)."""
    return importlib.import_module(f'experiments.{config.get("task", DEFAULT_TASK)}.task').TASK


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
    if not flags.FLAGS['verbosity'].present:  # quiet by default; --verbosity=0 shows INFO
        logging.set_verbosity(logging.WARNING)
    with cli.exit_on_run_errors():
        distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                               timeout_s=_DISTRIBUTED_TIMEOUT.value)
        summary = loop.train_and_evaluate(get_task(_CONFIG.value), _CONFIG.value,
                                          _WORKDIR.value,
                                          allow_config_change=_ALLOW_CONFIG_CHANGE.value)
    print(metrics.format_summary(summary))
    print(f'\nOutputs in {_WORKDIR.value}')


if __name__ == '__main__':
    app.run(main, flags_parser=cli.parse_flags)
