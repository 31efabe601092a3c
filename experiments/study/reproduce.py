r"""Runs an experiment grid, resumably and optionally sharded, then aggregates it.

Usage:
  python -m experiments.reproduce --grid digits --workdir runs/digits_grid
  python -m experiments.reproduce --grid paper_cifar --workdir runs/paper --shard 0/4 \
      --set data_dir=/data/tfds          # one of four processes (0/4 .. 3/4)
  python -m experiments.reproduce --grid label_noise_fmnist --workdir runs/fmnist --claim
      # in as many processes as there are devices (or cores): each takes the next free cell
  python -m experiments.reproduce --grid label_noise --workdir runs/noise --aggregate_only
  python -m experiments.reproduce --grid digits --list

Grids (``experiments/study/grids.py``): ``paper_cifar``, ``label_noise``,
``label_noise_cifar10n``, ``digits``, ``digits_cost``, ``label_noise_fmnist``,
``label_noise_fmnist_sweep``, ``label_noise_fmnist_rho60``, ``iwslt_de_en``. Each cell trains in
``WORKDIR/<config>-<optimizer>-noise<pct>-seed<seed>`` through its task's
``train_and_evaluate`` (``experiments.<config.task>.task``, image classification by
default). A cell whose ``summary.json`` says ``completed`` is skipped; an interrupted one
resumes from its last checkpoint. So re-running the same command continues a grid, and
``--shard i/n`` splits it over processes or machines sharing WORKDIR (cells ``i, i+n, ...``);
``--claim`` instead lets any number of processes sharing WORKDIR take the next unclaimed cell,
which keeps them busy when cells differ in cost (:mod:`experiments.study.claims`).
After training, each finished cell of a grid with diagnostics gets ``diagnostics.json`` (top
Hessian eigenvalue, m-sharpness), and the grid's tables and plots are written to
``WORKDIR/results.md`` and ``WORKDIR/*.png``, with the published numbers of
``experiments/study/paper_results.json`` next to ours.

A grid that takes longer than a machine lives: ``--results_dir experiments/study/results/GRID
--git_commit`` commits each finished cell's summary, metrics and diagnostics as it completes;
the same command on a fresh clone restores them and carries on with the rest. The report and
its plots are copied there too (not committed: a shard's report covers what exists when it
ends), so ``--aggregate_only --results_dir DIR`` on a fresh clone regenerates the report that
the README quotes from the records alone.
"""

import contextlib
import importlib
import os
import time
from collections.abc import Callable, Sequence

import jax
from absl import app, flags, logging

from experiments.runtime import cli, errors, files
from experiments.study import aggregate, claims, diagnose, grids, plots, records

_GRID = flags.DEFINE_enum('grid', None, list(grids.GRIDS), 'The grid to run.')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output folder: one subfolder per cell.',
                                allow_override=True)  # demo.py defines it too
_SHARD = flags.DEFINE_string('shard', '0/1', 'Run only cells i, i+n, ... of the grid (i/n).')
_CLAIM = flags.DEFINE_bool(
    'claim', False, 'Share the cells with the other --claim processes of WORKDIR: each trains '
    'the next cell no other has claimed, so they balance themselves when cells differ in cost.')
_SET = flags.DEFINE_multi_string(
    'set',
    [],
    'Config override for every cell, key=value (e.g. --set data_dir=/data --set num_epochs=10).',
)
_AGGREGATE_ONLY = flags.DEFINE_bool('aggregate_only', False, 'Only aggregate what exists.')
_LIST = flags.DEFINE_bool('list', False, 'Print the cells of the grid and exit.')
_DIAGNOSTICS = flags.DEFINE_bool('diagnostics', True, 'Compute final-model diagnostics.')
_RESULTS_DIR = flags.DEFINE_string(
    'results_dir', '', 'Keep each finished cell\'s summary, metrics and diagnostics here too (a '
    'repository folder, e.g. experiments/study/results/GRID), and restore them from here into '
    'a fresh workdir: a long grid survives the machine.')
_GIT_COMMIT = flags.DEFINE_bool(
    'git_commit', False, 'With --results_dir: git-commit each cell\'s record once it is done.')
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


def train(config, workdir: str) -> dict:
    """Trains ``config`` with its task (``experiments.<config.task>.task``)."""
    module = importlib.import_module(f'experiments.{grids.task_name(config)}.task')
    return module.train_and_evaluate(config, workdir)


def describe(summary: dict) -> str:
    """The headline of a finished run: test accuracy, or BLEU for translation."""
    if summary.get('final_test_accuracy') is not None:
        return f'test acc {100 * summary["final_test_accuracy"]:.2f}%'
    if summary.get('final_bleu') is not None:
        return f'BLEU {summary["final_bleu"]:.2f}'
    return 'no evaluation'


def run_cell(
    grid: grids.Grid,
    cell: grids.Cell,
    workdir: str,
    *,
    overrides=None,
    train_fn: Callable = train,
    diagnostics: bool = True,
    log: Callable = print,
    results_dir: str = '',
    git_commit: bool = False,
) -> str:
    """Trains one cell unless finished, then adds its diagnostics (and keeps its record in
    ``results_dir``, see :mod:`.records`); returns what was done."""
    cell_dir = os.path.join(workdir, cell.name)
    config = grids.make_config(grid, cell, overrides)
    if is_finished(cell_dir):
        done = 'skipped (finished)'
    else:
        start = time.time()
        summary = train_fn(config, cell_dir)
        done = f'trained: {describe(summary)} in {time.time() - start:.0f} s'
    if diagnostics and grid.diagnostics and diagnose.read(cell_dir) is None:
        result = diagnose.diagnose(config, cell_dir, grid.diagnostics)
        done += (
            f'; lambda_max {result["hessian_top_eigenvalue"]:.3g}, '
            f'm-sharpness {result["m_sharpness"]:.3g}'
        )
    if results_dir and (done != 'skipped (finished)'
                        or not records.is_recorded(results_dir, cell.name)):
        records.record(cell_dir, results_dir, cell.name, git_commit=git_commit)
        done += f'; recorded in {results_dir}'
    log(f'{cell.name}: {done}')
    return done


def run_grid(
    grid: grids.Grid,
    workdir: str,
    *,
    shard: tuple[int, int] = (0, 1),
    log: Callable = print,
    results_dir: str = '',
    claim: bool = False,
    **options,
) -> list[grids.Cell]:
    """Runs this process's shard of ``grid`` in order; returns its cells.

    With ``claim``, a cell claimed by another process sharing ``workdir`` is left to it
    (:mod:`.claims`). ``log``, ``results_dir`` and ``options`` (``overrides``, ``train_fn``,
    ``diagnostics``, ``git_commit``) are :func:`run_cell`'s, for every cell.
    """
    os.makedirs(workdir, exist_ok=True)
    todo = grids.shard(grids.cells(grid), *shard)
    if results_dir:
        restored = records.restore(results_dir, workdir, [c.name for c in todo])
        if restored:
            log(f'Restored {len(restored)} finished cells from {results_dir}.')
    for i, cell in enumerate(todo):
        with claims.claim(workdir, cell.name) if claim else contextlib.nullcontext() as owner:
            if owner is not None:  # another process trains it, or checks that it is finished
                done = (f'{cell.name}: skipped (finished)'
                        if is_finished(os.path.join(workdir, cell.name))
                        else claims.describe(workdir, cell.name, owner))
                log(f'[{i + 1}/{len(todo)}] {done}')
                continue
            log(f'[{i + 1}/{len(todo)}] {cell.name}')
            run_cell(grid, cell, workdir, log=log, results_dir=results_dir, **options)
    return todo


def list_cells(grid: grids.Grid, workdir: str | None, shard: tuple[int, int]) -> str:
    lines = [f'{grid.name}: {grid.description}']
    held = claims.held(workdir) if workdir else {}
    for cell in grids.shard(grids.cells(grid), *shard):
        state = ''
        if workdir and is_finished(os.path.join(workdir, cell.name)):
            state = ' (finished)'
        elif cell.name in held:
            state = f' (claimed by {claims.who(held[cell.name])})'
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
        if _GIT_COMMIT.value and not _RESULTS_DIR.value:
            raise errors.ConfigError('--git_commit needs --results_dir, e.g. '
                                     f'--results_dir experiments/study/results/{grid.name}.')
        if _AGGREGATE_ONLY.value and _RESULTS_DIR.value:
            records.restore(_RESULTS_DIR.value, _WORKDIR.value,
                            [c.name for c in grids.cells(grid)])
        if not _AGGREGATE_ONLY.value:
            run_grid(
                grid,
                _WORKDIR.value,
                shard=shard,
                claim=_CLAIM.value,
                overrides=overrides,
                diagnostics=_DIAGNOSTICS.value,
                results_dir=_RESULTS_DIR.value,
                git_commit=_GIT_COMMIT.value,
            )
    path, text = aggregate.write_report(grid, _WORKDIR.value, plot_fn=plots.grid_plots,
                                        results_dir=_RESULTS_DIR.value)
    print('\n' + text)
    print(f'Report: {path}')


if __name__ == '__main__':
    app.run(main)
