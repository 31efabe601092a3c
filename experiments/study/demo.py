r"""The offline demo: SGD, SAM and VaSSO on 8x8 digits with 40% symmetric label noise.

Usage:
  python -m experiments.demo --workdir runs/demo [--num_epochs 40]

Trains ``experiments/configs/digits_resnet.py`` once per optimiser through the same code path
as CIFAR (``experiments.image_classification.task.train_and_evaluate``; only the dataset and
the config differ), each in ``WORKDIR/<optimizer>``. No network access: the digits ship with
scikit-learn. Then prints a table (test accuracy, train accuracy on the noisy labels it was
trained on and on the true labels) and saves ``WORKDIR/test_accuracy.png`` (test accuracy and
noisy-label train accuracy per epoch). Re-running on a finished workdir only re-reads it.
"""

import os
import time

from absl import app, flags, logging

from experiments.configs import digits_resnet
from experiments.image_classification import task
from experiments.runtime import cli, metrics
from experiments.study import grids

OPTIMIZERS = grids.OPTIMIZERS  # the study's three: sgd, sam, vasso

_WORKDIR = flags.DEFINE_string('workdir', 'runs/demo', 'Output folder (one subfolder a run).',
                                allow_override=True)  # reproduce.py defines it too
_NUM_EPOCHS = flags.DEFINE_integer('num_epochs', None, 'Override the config\'s epochs.')


def demo_config(optimizer: str, *, num_epochs: int | None = None, progress_bar: bool = True):
    """The demo's config for ``optimizer`` (optionally fewer epochs)."""
    config = digits_resnet.get_config()
    config.optimizer = optimizer
    if num_epochs is not None:
        config.num_epochs = num_epochs
    config.progress_bar = progress_bar
    return config


def run_demo(workdir: str, *, num_epochs: int | None = None,
             optimizers=OPTIMIZERS, progress_bar: bool = True) -> dict[str, dict]:
    """Trains each optimiser in ``workdir/<optimizer>``; returns their summaries."""
    summaries = {}
    for optimizer in optimizers:
        config = demo_config(optimizer, num_epochs=num_epochs, progress_bar=progress_bar)
        summaries[optimizer] = task.train_and_evaluate(config, os.path.join(workdir, optimizer))
    return summaries


def format_table(summaries: dict[str, dict]) -> str:
    """The results as a fixed-width text table (accuracies in percent)."""
    header = (f'{"optimizer":<10}{"test acc":>10}{"best test":>11}{"train acc":>11}'
              f'{"train acc":>11}{"time":>8}')
    subheader = f'{"":<10}{"":>10}{"":>11}{"(noisy)":>11}{"(true)":>11}{"(s)":>8}'
    rows = [header, subheader, '-' * len(header)]

    def pct(value):
        return f'{100 * value:.1f}%' if value is not None else 'n/a'

    for name, s in summaries.items():
        rows.append(f'{name:<10}{pct(s["final_test_accuracy"]):>10}'
                    f'{pct(s["best_test_accuracy"]):>11}'
                    f'{pct(s.get("final_train_eval_accuracy")):>11}'
                    f'{pct(s.get("final_train_eval_true_accuracy")):>11}'
                    f'{s["wall_time_s"]:>8.0f}')
    return '\n'.join(rows)


def plot(workdir: str, optimizers=OPTIMIZERS) -> str:
    """Saves test accuracy and noisy-label train accuracy per epoch; returns the PNG path."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, (ax_test, ax_train) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for optimizer in optimizers:
        history = [r for r in metrics.read_history(os.path.join(workdir, optimizer))
                   if 'test_accuracy' in r]
        epochs = [r['epoch'] for r in history]
        ax_test.plot(epochs, [100 * r['test_accuracy'] for r in history], label=optimizer)
        ax_train.plot(epochs, [100 * r.get('train_eval_accuracy', float('nan'))
                               for r in history], label=optimizer)
    ax_test.set(title='Test accuracy', xlabel='epoch', ylabel='accuracy (%)')
    ax_train.set(title='Train accuracy on the noisy labels (memorisation)', xlabel='epoch')
    for ax in (ax_test, ax_train):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle('ResNet-18 (width 8) on 8x8 digits, 40% symmetric label noise')
    fig.tight_layout()
    path = os.path.join(workdir, 'test_accuracy.png')
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
    logging.set_verbosity(logging.WARNING)
    start = time.time()
    with cli.exit_on_run_errors():
        summaries = run_demo(_WORKDIR.value, num_epochs=_NUM_EPOCHS.value)
    print('\n' + format_table(summaries))
    print(f'\nPlot: {plot(_WORKDIR.value)}')
    print(f'Total time: {time.time() - start:.0f} s (runs in {_WORKDIR.value}/<optimizer>)')


if __name__ == '__main__':
    app.run(main, flags_parser=cli.parse_flags)
