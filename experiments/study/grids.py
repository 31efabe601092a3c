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
  ``iwslt_de_en``: the translation task (``experiments/translation``): Transformer on TED
    talks De->En, AdamW / SAM / VaSSO before AdamW, 3 seeds, scored by BLEU (GPU).

A cell trains the task its config names (``config.task``, default image classification).

  ``digits_cost``: the demo's recipe (digits, 40 epochs) for the cost-saving variants: SGD,
    SAM, VaSSO, VaSSO with ``every_k = 5`` (host dispatch), one-pass VaSSO and one-pass
    Momentum-SAM; noise 0/40%, 3 seeds.

  ``label_noise_fmnist``: real Fashion-MNIST offline (a 10k-image training subset), small
    BatchNorm CNN, symmetric noise 0/40/60% and asymmetric 40%, SGD/SAM/VaSSO/ASAM, 3 seeds
    (hours on two CPU cores); ``label_noise_fmnist_sweep``: its theta and rho
    sensitivity at 40% noise, one seed; ``label_noise_fmnist_rho60``: SAM, VaSSO and ASAM
    at smaller rho at 60% noise, where the recipe's collapses them, 3 seeds.

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

# The optimisers the study compares (the demo's too).
OPTIMIZERS = ('sgd', 'sam', 'vasso')
DEFAULT_TASK = 'image_classification'


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
      optimizer_overrides: fields set per optimiser, e.g. SGD's own weight decay. They may
        set ``optimizer`` itself, so one optimiser can run under several names (a
        hyperparameter sweep: ``'vasso_theta0.9': {'optimizer': 'vasso', 'theta': 0.9}``).
      config_overrides: fields set per config module.
      diagnostics: final-model diagnostics to compute per cell, or None.
      skip: ``(config, label_noise)`` pairs left out of the product, e.g. a noise level that
        a config's noise type does not take.
      config_labels: short names of the configs for table columns and plot titles (the
        module name where absent).
      compare_cost: whether the report compares the cells' wall times (a table and a plot).
        Only meaningful when every cell ran alone on the same idle machine; False for a grid
        whose cells shared their machine, so that no one reads a cost off them.
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
    diagnostics: Diagnostics | None = None
    skip: frozenset[tuple[str, float]] = frozenset()
    config_labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    compare_cost: bool = True


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
# The GPU grids' final-model diagnostics (top Hessian eigenvalue, m-sharpness).
_GPU_DIAGNOSTICS = Diagnostics(num_examples=1024, num_iters=20, m=128, groups_per_step=1,
                               batch_size=256)
# The CPU grids': a quarter of the examples, groups of 16.
_CPU_DIAGNOSTICS = Diagnostics(num_examples=256, num_iters=20, m=16)


def _paper_gpu_grid(name: str, description: str, configs: tuple[str, ...], *,
                    overrides: Mapping[str, Any] | None = None, **fields) -> Grid:
    """A CIFAR grid of the paper's recipe on a GPU: SGD's own weight decay, stability logging
    (and ``overrides``), the final-model diagnostics; ``fields`` as :class:`Grid`'s."""
    return Grid(name, description, configs, overrides={**_LOG_STABILITY, **(overrides or {})},
                optimizer_overrides=_PAPER_OPTIMIZERS, diagnostics=_GPU_DIAGNOSTICS, **fields)


# The sensitivity sweep of the Fashion-MNIST study: names -> the optimiser and its values, around
# the recipe's rho (experiments/configs/fashion_mnist_noise.py) and the paper's theta 0.4.
_FMNIST_RHO = 0.1
_FMNIST_SWEEP = {
    **{f'vasso_theta{t}': {'optimizer': 'vasso', 'theta': t} for t in (0.1, 0.4, 0.9, 1.0)},
    **{f'{m}_rho{f}x': {'optimizer': m, 'rho': f * _FMNIST_RHO}
       for m in ('sam', 'vasso') for f in (0.5, 2)},
}

# The recipe's rho per method. ASAM's radius lives on a rescaled space: its authors use ~10x
# SAM's (CIFAR-10, ResNet: 0.5 against 0.05).
_FMNIST_RHOS = {'sam': _FMNIST_RHO, 'vasso': _FMNIST_RHO, 'asam': 10 * _FMNIST_RHO}
# At 60% symmetric noise the recipe's rho collapses SAM, VaSSO and ASAM to the constant
# predictor (README): the three at a half and a quarter of their rho.
_FMNIST_RHO_60 = {f'{m}_rho{f}x': {'optimizer': m, 'rho': f * rho}
                  for f in (0.5, 0.25) for m, rho in _FMNIST_RHOS.items()}

GRIDS: dict[str, Grid] = {
    grid.name: grid
    for grid in (
        _paper_gpu_grid(
            'paper_cifar',
            'CIFAR-10/100 x ResNet-18 / WRN-28-10 / PyramidNet-110, SGD/SAM/VaSSO, 3 seeds, the '
            'recipe of each config file (GPU).',
            configs=(
                'cifar10_resnet18',
                'cifar10_wrn28_10',
                'cifar10_pyramidnet110',
                'cifar100_resnet18',
                'cifar100_wrn28_10',
                'cifar100_pyramidnet110',
            ),
        ),
        _paper_gpu_grid(
            'label_noise',
            'CIFAR-10, ResNet-18, symmetric label noise 20/40/60/80%, SGD/SAM/VaSSO, 3 seeds '
            '(GPU).',
            configs=('cifar10_resnet18',),
            label_noise=(0.2, 0.4, 0.6, 0.8),
            overrides={'eval_train': True},
        ),
        _paper_gpu_grid(
            'label_noise_cifar10n',
            'CIFAR-10N (human labels, worse_label: ~40% wrong), ResNet-18, SGD/SAM/VaSSO, 3 '
            'seeds (GPU).',
            configs=('cifar10_resnet18',),
            overrides={'eval_train': True, 'dataset': 'cifar10_n'},
        ),
        Grid(
            name='digits',
            description='8x8 digits (offline), ResNet-18 width 8, label noise 0/20/40/60%, '
            'SGD/SAM/VaSSO, 3 seeds, 30 epochs (CPU minutes).',
            configs=('digits_resnet',),
            label_noise=(0.0, 0.2, 0.4, 0.6),
            # 30 epochs, not the demo's 40, so the 36 runs fit in ~30 minutes on two cores.
            overrides={**_LOG_STABILITY, 'num_epochs': 30},
            diagnostics=_CPU_DIAGNOSTICS,
        ),
        Grid(
            name='label_noise_fmnist',
            description='Fashion-MNIST (real, offline), 10k-image subset, small BatchNorm CNN, '
            'symmetric noise 0/40/60% and asymmetric 40%, SGD/SAM/VaSSO/ASAM, 3 seeds (CPU).',
            configs=('fashion_mnist_noise', 'fashion_mnist_noise_asym'),
            optimizers=('sgd', 'sam', 'vasso', 'asam'),
            label_noise=(0.0, 0.4, 0.6),
            skip=frozenset({('fashion_mnist_noise_asym', 0.0), ('fashion_mnist_noise_asym', 0.6)}),
            overrides=_LOG_STABILITY,
            optimizer_overrides={'asam': {'rho': _FMNIST_RHOS['asam']}},
            diagnostics=_CPU_DIAGNOSTICS,
            config_labels={'fashion_mnist_noise': 'symmetric',
                           'fashion_mnist_noise_asym': 'asymmetric'},
            # Its cells ran two at a time, one core each, beside other work (README): their
            # wall times say nothing of an optimiser's cost.
            compare_cost=False,
        ),
        Grid(
            name='label_noise_fmnist_sweep',
            description='Fashion-MNIST at 40% symmetric noise, seed 0: VaSSO theta 0.1/0.4/0.9/1.0 '
            '(1.0 is SAM) and SAM/VaSSO at 0.5x and 2x the recipe\'s rho.',
            configs=('fashion_mnist_noise',),
            optimizers=tuple(_FMNIST_SWEEP),
            seeds=(0,),
            label_noise=(0.4,),
            overrides=_LOG_STABILITY,
            optimizer_overrides=_FMNIST_SWEEP,
            compare_cost=False,
        ),
        Grid(
            name='label_noise_fmnist_rho60',
            description='Fashion-MNIST at 60% symmetric noise, 3 seeds: SAM, VaSSO and ASAM '
            'at 0.5x and 0.25x the recipe\'s rho (the recipe\'s rho collapses them at 60%).',
            configs=('fashion_mnist_noise',),
            optimizers=tuple(_FMNIST_RHO_60),
            label_noise=(0.6,),
            overrides=_LOG_STABILITY,
            optimizer_overrides=_FMNIST_RHO_60,
            compare_cost=False,
        ),
        Grid(
            name='iwslt_de_en',
            description='TED talks De->En (ted_multi_translate), Transformer (fairseq '
            'transformer_iwslt_de_en), AdamW / SAM+AdamW / VaSSO+AdamW, 3 seeds, BLEU (GPU).',
            configs=('iwslt_de_en_transformer',),
            # 'sgd' names no sharpness-aware link: plain AdamW, the config's base optimiser.
            overrides={'progress_bar': False},
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
            optimizer_overrides={'vasso_k5': {'optimizer': 'vasso', 'every_k': 5}},
            # No Hessian diagnostics: they would read a one-pass run's held (perturbed) params.
        ),
    )
}


def get_grid(name: str) -> Grid:
    """The grid called ``name``; a one-line error lists the valid names."""
    if name not in GRIDS:
        raise errors.ConfigError(f'--grid={name!r} is not one of {", ".join(GRIDS)}.')
    return GRIDS[name]


def columns(grid: Grid) -> list[tuple[str, float]]:
    """The ``(config, label_noise)`` settings of ``grid``, less its ``skip``: a table's columns."""
    return [(c, n) for c in grid.configs for n in grid.label_noise if (c, n) not in grid.skip]


def cells(grid: Grid) -> list[Cell]:
    """All cells of ``grid``: seed outermost, then noise level, config and optimiser."""
    return [
        Cell(config, optimizer, noise, seed)
        for seed in grid.seeds
        for noise in grid.label_noise
        for config in grid.configs
        if (config, noise) not in grid.skip
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


def task_name(config: ml_collections.ConfigDict) -> str:
    """The task a cell's config trains (``config.task``)."""
    return config.get('task', DEFAULT_TASK)


def make_config(
    grid: Grid, cell: Cell, overrides: Mapping[str, Any] | None = None
) -> ml_collections.ConfigDict:
    """The config of ``cell``: its config file, the cell's values, then the overrides.

    Order (later wins): the config file, the cell's optimizer, ``grid.overrides``,
    ``grid.config_overrides``, ``grid.optimizer_overrides``, the cell's seed, label noise and
    noise seed, then ``overrides`` (the command line's ``--set``).
    """
    config = importlib.import_module(f'experiments.configs.{cell.config}').get_config()
    if 'log_stability' not in config:  # read by the trainer; off unless a grid turns it on
        config.log_stability = False
    own = {'seed': cell.seed}
    if 'label_noise' in config or cell.label_noise:  # a task without label noise has no keys
        own.update(label_noise=cell.label_noise, noise_seed=cell.seed)
    layers = (
        {'optimizer': cell.optimizer},  # before its overrides: a sweep's names map to one
        grid.overrides,
        grid.config_overrides.get(cell.config, {}),
        grid.optimizer_overrides.get(cell.optimizer, {}),
        own,
        overrides or {},
    )
    for layer in layers:
        for key, value in layer.items():
            set_field(config, key, value)
    return config
