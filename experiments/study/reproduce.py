r"""Runs an experiment grid, resumably and optionally sharded, then aggregates it.

Usage:
  python -m experiments.reproduce --grid digits --workdir runs/digits_grid
  python -m experiments.reproduce --grid paper_cifar --workdir runs/paper --shard 0/4 \
      --set data_dir=/data/tfds          # one of four processes (0/4 .. 3/4)
  python -m experiments.reproduce --grid label_noise --workdir runs/noise --aggregate_only
  python -m experiments.reproduce --grid digits --list

Grids (``experiments/study/grids.py``): ``paper_cifar``, ``label_noise``,
``label_noise_cifar10n``, ``digits``, ``digits_cost``. Each cell trains in
``WORKDIR/<config>-<optimizer>-noise<pct>-seed<seed>`` through
``experiments.image_classification.task.train_and_evaluate``. A cell whose ``summary.json``
says ``completed`` is skipped; an interrupted one resumes from its last checkpoint. So
re-running the same command continues a grid, and ``--shard i/n`` splits it over processes or
machines sharing WORKDIR (cells ``i, i+n, ...``). After training, each finished cell gets
``diagnostics.json`` (top Hessian eigenvalue, m-sharpness), and the grid's tables and plots
are written to
``WORKDIR/results.md`` and ``WORKDIR/*.png``, with the published numbers of
``experiments/study/paper_results.json`` next to ours.
"""

import os
import time
from collections.abc import Callable, Sequence

import jax
from absl import app, flags, logging

from experiments.image_classification import task
from experiments.runtime import cli, errors, files
from experiments.study import aggregate, diagnose, grids, plots

_GRID = flags.DEFINE_enum('grid', None, list(grids.GRIDS), 'The grid to run.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output folder: one subfolder per cell.',
                                allow_override=True)  # demo.py defines it too
_SHARD = flags.DEFINE_string('shard', '0/1', 'Run only cells i, i+n, ... of the grid (i/n).')
_SET = flags.DEFINE_multi_string(
    'set',
    [],
    'Config override for every cell, key=value (e.g. --set data_dir=/data --set num_epochs=10).',
)
_AGGREGATE_ONLY = flags.DEFINE_bool('aggregate_only', False, 'Only aggregate what exists.')
_LIST = flags.DEFINE_bool('list', False, 'Print the cells of the grid and exit.')
_DIAGNOSTICS = flags.DEFINE_bool('diagnostics', True, 'Compute final-model diagnostics.')
_CACHE = flags.DEFINE_string(
    'compilation_cache',
    'WORKDIR/jax_cache',
    "JAX's persistent compilation cache: the cells "
    "of a grid share their compiled steps (on a CPU, most of a small run); '' turns it off.",
)


def is_finished(cell_dir: str) -> bool:
    """Whether the run in ``cell_dir`` completed (its ``summary.json`` says so)."""
    summary = files.read_json(os.path.join(cell_dir, 'summary.json'))
    return bool(summary and summary.get('completed'))


def run_cell(
    grid: grids.Grid,
    cell: grids.Cell,
    workdir: str,
    *,
    overrides=None,
    train_fn: Callable = task.train_and_evaluate,
    diagnostics: bool = True,
    log: Callable = print,
) -> str:
    """Trains one cell unless finished, then adds its diagnostics; returns what was done."""
    cell_dir = os.path.join(workdir, cell.name)
    config = grids.make_config(grid, cell, overrides)
    if is_finished(cell_dir):
        done = 'skipped (finished)'
    else:
        start = time.time()
        summary = train_fn(config, cell_dir)
        done = (
            f'trained: test acc {100 * summary["final_test_accuracy"]:.2f}% in '
            f'{time.time() - start:.0f} s'
        )
    if diagnostics and grid.diagnostics and diagnose.read(cell_dir) is None:
        result = diagnose.diagnose(config, cell_dir, grid.diagnostics)
        done += (
            f'; lambda_max {result["hessian_top_eigenvalue"]:.3g}, '
            f'm-sharpness {result["m_sharpness"]:.3g}'
        )
    log(f'{cell.name}: {done}')
    return done


def run_grid(
    grid: grids.Grid,
    workdir: str,
    *,
    shard: tuple[int, int] = (0, 1),
    overrides=None,
    train_fn: Callable = task.train_and_evaluate,
    diagnostics: bool = True,
    log: Callable = print,
) -> list[grids.Cell]:
    """Runs this process's shard of ``grid`` in order; returns its cells."""
    os.makedirs(workdir, exist_ok=True)
    todo = grids.shard(grids.cells(grid), *shard)
    for i, cell in enumerate(todo):
        log(f'[{i + 1}/{len(todo)}] {cell.name}')
        run_cell(
            grid,
            cell,
            workdir,
            overrides=overrides,
            train_fn=train_fn,
            diagnostics=diagnostics,
            log=log,
        )
    return todo


def list_cells(grid: grids.Grid, workdir: str | None, shard: tuple[int, int]) -> str:
    lines = [f'{grid.name}: {grid.description}']
    for cell in grids.shard(grids.cells(grid), *shard):
        state = ''
        if workdir:
            state = ' (finished)' if is_finished(os.path.join(workdir, cell.name)) else ''
        lines.append(f'  {cell.name}{state}')
    return '\n'.join(lines)


def main(argv: Sequence[str]):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
    logging.set_verbosity(logging.WARNING)
    if _GRID.value is None:
        raise app.UsageError('--grid is required, e.g. --grid digits.')
    with cli.exit_on_run_errors():  # the exit codes of experiments.train
        grid = grids.get_grid(_GRID.value)
        shard = grids.parse_shard(_SHARD.value)
        overrides = grids.parse_overrides(_SET.value)
        for cell in grids.cells(grid)[:1]:  # fail on a bad --set before any training
            grids.make_config(grid, cell, overrides)
        if _LIST.value:
            print(list_cells(grid, _WORKDIR.value, shard))
            return
        if _WORKDIR.value is None:
            raise errors.ConfigError('--workdir is required, e.g. --workdir runs/digits_grid.')
        if _CACHE.value and not _AGGREGATE_ONLY.value:
            jax.config.update(
                'jax_compilation_cache_dir', _CACHE.value.replace('WORKDIR', _WORKDIR.value)
            )
        if not _AGGREGATE_ONLY.value:
            run_grid(
                grid,
                _WORKDIR.value,
                shard=shard,
                overrides=overrides,
                diagnostics=_DIAGNOSTICS.value,
            )
    path, text = aggregate.write_report(grid, _WORKDIR.value, plot_fn=plots.grid_plots)
    print('\n' + text)
    print(f'Report: {path}')


if __name__ == '__main__':
    app.run(main)
