"""Experiment grids: configs x optimizers x label-noise levels x seeds, one run per cell.

A :class:`Grid` names config files (``experiments/configs/<name>.py``), optimisers, seeds and
label-noise levels, plus the few fields it changes; :func:`cells` expands it in a fixed order
(seed outermost, so the first cells of a grid already give a complete one-seed table) and
:func:`make_config` builds the config of one cell. ``python -m experiments.reproduce`` runs
them; see that module for the command line.

Grids:
  ``paper_cifar``: the paper's CIFAR tables (ResNet-18, WRN-28-10, PyramidNet-110 on
    CIFAR-10/100; SGD, SAM, VaSSO; 3 seeds) with the recipe of each config file.
  ``label_noise``: CIFAR-10, ResNet-18, symmetric noise 20/40/60/80%, SGD/SAM/VaSSO, 3 seeds.
  ``label_noise_cifar10n``: the same with CIFAR-10N's real human labels (``worse_label``,
    about 40% wrong) in place of synthetic noise.
  ``digits``: the offline study: 8x8 digits, noise 0/20/40/60%, SGD/SAM/VaSSO, 3 seeds,
    minutes on a CPU.

  ``digits_cost``: the demo's recipe (digits, 40 epochs) for the cost-saving variants: SGD,
    SAM, VaSSO, VaSSO with ``every_k = 5`` (host dispatch), one-pass VaSSO and one-pass
    Momentum-SAM; noise 0/40%, 3 seeds.

``digits`` takes about 30 minutes on two CPU cores; the CIFAR grids are for GPUs (54, 36 and 9
runs of 200 epochs) and are meant to be split with ``--shard``.
"""

import ast
import dataclasses
import importlib
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from experiments.runtime import errors

OPTIMIZERS = ('sgd', 'sam', 'vasso')


@dataclasses.dataclass(frozen=True)
class Diagnostics:
    """Final-model diagnostics computed after a cell finishes (see ``experiments.diagnose``).

    Attributes:
      num_examples: size of the fixed training subset (un-augmented, the labels trained on).
      num_iters: Lanczos iterations for the top Hessian eigenvalue.
      m: examples per group of the m-sharpness estimate (must divide ``num_examples``).
      groups_per_step: m-sharpness groups evaluated at once (None: all, with ``vmap``).
      batch_size: examples per forward pass of the Hessian-vector products.
    """

    num_examples: int = 256
    num_iters: int = 20
    m: int = 16
    groups_per_step: int | None = None
    batch_size: int = 256


@dataclasses.dataclass(frozen=True)
class Grid:
    """A grid of runs.

    Attributes:
      name: the name on the command line.
      description: one line for ``--list`` and the report.
      configs: config modules in ``experiments.configs`` (one model / dataset each).
      optimizers: values of ``config.optimizer``.
      seeds: values of ``config.seed`` (also the label-noise seed, so the optimisers of one
        seed see the same corrupted labels: a paired comparison).
      label_noise: values of ``config.label_noise``.
      overrides: fields set in every cell (dotted keys reach nested fields).
      optimizer_overrides: fields set per optimiser, e.g. SGD's own weight decay.
      config_overrides: fields set per config module.
      variants: labels in ``optimizers`` that are not ``config.optimizer`` values, each with
        the fields it sets (its ``optimizer`` among them), e.g. ``{'vasso_k5': {'optimizer':
        'vasso', 'every_k': 5}}``; applied after the cell's own values.
      diagnostics: final-model diagnostics to compute per cell, or None.
    """

    name: str
    description: str
    configs: tuple[str, ...]
    optimizers: tuple[str, ...] = OPTIMIZERS
    seeds: tuple[int, ...] = (0, 1, 2)
    label_noise: tuple[float, ...] = (0.0,)
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    optimizer_overrides: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    config_overrides: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    variants: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    diagnostics: Diagnostics | None = None


@dataclasses.dataclass(frozen=True, order=True)
class Cell:
    """One run of a grid; ``name`` is its folder under the grid's workdir."""

    config: str
    optimizer: str
    label_noise: float
    seed: int

    @property
    def name(self) -> str:
        noise = round(100 * self.label_noise)
        return f'{self.config}-{self.optimizer}-noise{noise:02d}-seed{self.seed}'


# The official README trains its SGD baseline with weight decay 5e-4 and SAM / VaSSO with 1e-3
# (tag [R] in experiments/configs/default.py); the grids apply that to every model.
_PAPER_OPTIMIZERS = {'sgd': {'weight_decay': 5e-4}}

# Stability logging costs three params-sized float32 trees, fine on a GPU for these models.
_LOG_STABILITY = {'log_stability': True, 'progress_bar': False}

GRIDS: dict[str, Grid] = {
    grid.name: grid
    for grid in (
        Grid(
            name='paper_cifar',
            description='CIFAR-10/100 x ResNet-18 / WRN-28-10 / PyramidNet-110, SGD/SAM/VaSSO, '
            '3 seeds, the recipe of each config file (GPU).',
            configs=(
                'cifar10_resnet18',
                'cifar10_wrn28_10',
                'cifar10_pyramidnet110',
                'cifar100_resnet18',
                'cifar100_wrn28_10',
                'cifar100_pyramidnet110',
            ),
            overrides=_LOG_STABILITY,
            optimizer_overrides=_PAPER_OPTIMIZERS,
            diagnostics=Diagnostics(
                num_examples=1024, num_iters=20, m=128, groups_per_step=1, batch_size=256
            ),
        ),
        Grid(
            name='label_noise',
            description='CIFAR-10, ResNet-18, symmetric label noise 20/40/60/80%, SGD/SAM/VaSSO, '
            '3 seeds (GPU).',
            configs=('cifar10_resnet18',),
            label_noise=(0.2, 0.4, 0.6, 0.8),
            overrides={**_LOG_STABILITY, 'eval_train': True},
            optimizer_overrides=_PAPER_OPTIMIZERS,
            diagnostics=Diagnostics(
                num_examples=1024, num_iters=20, m=128, groups_per_step=1, batch_size=256
            ),
        ),
        Grid(
            name='label_noise_cifar10n',
            description='CIFAR-10N (human labels, worse_label: ~40% wrong), ResNet-18, '
            'SGD/SAM/VaSSO, 3 seeds (GPU).',
            configs=('cifar10_resnet18',),
            overrides={**_LOG_STABILITY, 'eval_train': True, 'dataset': 'cifar10_n'},
            optimizer_overrides=_PAPER_OPTIMIZERS,
            diagnostics=Diagnostics(
                num_examples=1024, num_iters=20, m=128, groups_per_step=1, batch_size=256
            ),
        ),
        Grid(
            name='digits',
            description='8x8 digits (offline), ResNet-18 width 8, label noise 0/20/40/60%, '
            'SGD/SAM/VaSSO, 3 seeds, 30 epochs (CPU minutes).',
            configs=('digits_resnet',),
            label_noise=(0.0, 0.2, 0.4, 0.6),
            # 30 epochs, not the demo's 40, so the 36 runs fit in ~30 minutes on two cores.
            overrides={**_LOG_STABILITY, 'num_epochs': 30},
            diagnostics=Diagnostics(num_examples=256, num_iters=20, m=16),
        ),
        Grid(
            name='digits_cost',
            description='8x8 digits, the demo\'s recipe (ResNet-18 width 8, 40 epochs), noise '
            '0/40%, SGD/SAM/VaSSO/VaSSO every_k=5/one-pass VaSSO/one-pass Momentum-SAM, 3 seeds '
            '(CPU).',
            configs=('digits_resnet',),
            optimizers=('sgd', 'sam', 'vasso', 'vasso_k5', 'one_pass_vasso',
                        'one_pass_momentum_sam'),
            label_noise=(0.0, 0.4),
            overrides={'progress_bar': False},
            variants={'vasso_k5': {'optimizer': 'vasso', 'every_k': 5}},
            # No Hessian diagnostics: they would read a one-pass run's held (perturbed) params.
        ),
    )
}


def get_grid(name: str) -> Grid:
    """The grid called ``name``; a one-line error lists the valid names."""
    if name not in GRIDS:
        raise errors.ConfigError(f'--grid={name!r} is not one of {", ".join(GRIDS)}.')
    return GRIDS[name]


def cells(grid: Grid) -> list[Cell]:
    """All cells of ``grid``: seed outermost, then noise level, config and optimiser."""
    return [
        Cell(config, optimizer, noise, seed)
        for seed in grid.seeds
        for noise in grid.label_noise
        for config in grid.configs
        for optimizer in grid.optimizers
    ]


def parse_shard(text: str) -> tuple[int, int]:
    """``'i/n'`` -> ``(i, n)`` with ``0 <= i < n``."""
    try:
        index, count = (int(part) for part in text.split('/'))
    except ValueError:
        index, count = -1, 0
    if not 0 <= index < count:
        raise errors.ConfigError(f'--shard={text!r} must be i/n with 0 <= i < n, e.g. 0/4.')
    return index, count


def shard(all_cells: Sequence[Cell], index: int, count: int) -> list[Cell]:
    """Cells ``index, index + count, ...``: the shards of one grid are disjoint and complete."""
    return list(all_cells[index::count])


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``['num_epochs=10', 'data_dir=/data']`` -> a dict; values are Python literals or strings."""
    out = {}
    for item in items:
        key, sep, text = item.partition('=')
        if not sep or not key:
            raise errors.ConfigError(
                f'--set {item!r} must look like key=value, e.g. num_epochs=10.'
            )
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        out[key.strip()] = value
    return out


def set_field(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
    """Sets a dotted ``key`` of ``config``; an unknown key or a wrong type is a one-line error."""
    *parents, leaf = key.split('.')
    node = config
    for part in parents:
        node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        raise errors.ConfigError(
            f'{key!r} is not a config field; check the name against experiments/configs/default.py.'
        )
    try:
        setattr(node, leaf, value)
    except TypeError as e:
        raise errors.ConfigError(f'{key}={value!r} has the wrong type ({e}).') from None


def make_config(
    grid: Grid, cell: Cell, overrides: Mapping[str, Any] | None = None
) -> ml_collections.ConfigDict:
    """The config of ``cell``: its config file, the cell's values, then the overrides.

    Order (later wins): the config file, ``grid.overrides``, ``grid.config_overrides``,
    ``grid.optimizer_overrides``, the cell (optimizer, seed, label noise and its seed),
    ``grid.variants`` of the cell's optimizer, then ``overrides`` (the command line's
    ``--set``).
    """
    config = importlib.import_module(f'experiments.configs.{cell.config}').get_config()
    if 'log_stability' not in config:  # read by the trainer; off unless a grid turns it on
        config.log_stability = False
    layers = (
        grid.overrides,
        grid.config_overrides.get(cell.config, {}),
        grid.optimizer_overrides.get(cell.optimizer, {}),
        {
            'optimizer': cell.optimizer,
            'seed': cell.seed,
            'label_noise': cell.label_noise,
            'noise_seed': cell.seed,
        },
        grid.variants.get(cell.optimizer, {}),
        overrides or {},
    )
    for layer in layers:
        for key, value in layer.items():
            set_field(config, key, value)
    return config
