"""Plots of a grid: test-accuracy curves, a bar chart with error bars, accuracy against wall
time (with the Pareto front; for grids that compare cost), the fit of noisy and true training
labels (for runs that evaluate their training set), adversary stability.

Every figure has one panel per (config, label-noise level) of the grid and one line (or bar)
per optimiser, averaged over the seeds that have data (shaded / error bar: ± one standard
deviation). Curves use every run that logged, finished or not.
"""

import os
from collections.abc import Sequence

import numpy as np

from experiments.runtime import files, metrics
from experiments.study import aggregate, grids

COLORS = {'sgd': 'tab:gray', 'sam': 'tab:blue', 'vasso': 'tab:red', 'asam': 'tab:green',
          'vasso_k5': 'tab:orange', 'one_pass_vasso': 'tab:purple',
          'one_pass_momentum_sam': 'tab:brown'}
_PALETTE = ('tab:blue', 'tab:orange', 'tab:green', 'tab:red', 'tab:purple', 'tab:brown',
            'tab:pink', 'tab:gray', 'tab:olive', 'tab:cyan')


def _pyplot():
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> None:
    """Saves ``fig`` as the PNG ``path``, atomically: the processes of a grid may end together."""
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format='png')


def mean_curve(histories: Sequence[list[dict]], key: str):
    """``(epochs, mean, std)`` of ``key`` over runs, on the steps that every run logged."""
    series = [
        {r['step']: (r.get('epoch'), r[key]) for r in h if r.get(key) is not None}
        for h in histories
    ]
    series = [s for s in series if s]
    if not series:
        return None
    steps = sorted(set.intersection(*(set(s) for s in series)))
    if not steps:
        return None
    values = np.array([[s[step][1] for step in steps] for s in series], np.float64)
    epochs = np.array(
        [series[0][step][0] if series[0][step][0] is not None else step for step in steps],
        np.float64,
    )
    return epochs, values.mean(0), values.std(0)


def _panels(grid: grids.Grid):
    return grids.columns(grid)


def _spread(grid: grids.Grid) -> str:
    """What a plot's bands and error bars show: there are none for a one-seed grid."""
    if len(grid.seeds) == 1:
        return f'one seed ({grid.seeds[0]}), no spread'
    return f'mean ± std over {len(grid.seeds)} seeds'


def _legend(ax, n_panels: int, n_entries: int) -> None:
    """A legend inside the axes, or beside a lone panel when it would hide the curves."""
    if n_panels == 1 and n_entries > 4:
        ax.legend(fontsize=8, loc='upper left', bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    else:
        ax.legend(fontsize=8)


def _colors(grid: grids.Grid) -> dict[str, str]:
    """One colour per optimizer, the same in every panel and plot of the grid.

    The known optimizers keep theirs (``COLORS``); variants (``sam_rho0.5x``) take the
    palette's unused colours in the grid's order, so a curve and its band always agree.
    """
    fixed = {o: COLORS[o] for o in grid.optimizers if o in COLORS}
    free = [c for c in _PALETTE if c not in fixed.values()]
    variants = [o for o in grid.optimizers if o not in fixed]
    return {**fixed, **{o: free[i % len(free)] for i, o in enumerate(variants)}}


def _histories(runs, config, noise, optimizer):
    return [
        metrics.read_history(r.workdir)
        for r in runs
        if (r.cell.config, r.cell.label_noise, r.cell.optimizer) == (config, noise, optimizer)
    ]


def curves(
    grid: grids.Grid,
    runs: Sequence[aggregate.Run],
    path: str,
    *,
    keys: Sequence[tuple[str, str, float, bool]],
    title: str,
) -> str | None:
    """One row per ``(metric key, y label, scale, log y)``, one column per panel; None if no
    data."""
    plt = _pyplot()
    panels = _panels(grid)
    fig, axes = plt.subplots(
        len(keys),
        len(panels),
        # a lone panel gets room for its title and a legend beside it
        figsize=(max(4 * len(panels), 7.5), 3.2 * len(keys)),
        squeeze=False,
        sharex='col',
    )
    drawn = False
    colors = _colors(grid)
    for col, (config, noise) in enumerate(panels):
        histories = {o: _histories(runs, config, noise, o) for o in grid.optimizers}
        for row, (key, ylabel, scale, log) in enumerate(keys):
            ax = axes[row][col]
            for optimizer, hs in histories.items():
                curve = mean_curve(hs, key)
                if curve is None:
                    continue
                epochs, mean, std = curve
                color = colors[optimizer]
                n = sum(any(r.get(key) is not None for r in h) for h in hs)
                ax.plot(epochs, scale * mean, label=f'{optimizer} (n={n})', color=color)
                ax.fill_between(
                    epochs, scale * (mean - std), scale * (mean + std), alpha=0.2, color=color
                )
                drawn = True
            if log and ax.lines:
                ax.set_yscale('log')
            if row == 0:
                ax.set_title(aggregate.column_label(grid, config, noise))
            if row == len(keys) - 1:
                ax.set_xlabel('epoch')
            if col == 0:
                ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if ax.lines:
                _legend(ax, len(panels), len(ax.lines))
    fig.suptitle(title)
    fig.tight_layout()
    if drawn:
        _save(fig, path)
    plt.close(fig)
    return path if drawn else None


def bars(
    grid: grids.Grid, runs: Sequence[aggregate.Run], path: str, metric: str = 'final_test_accuracy'
) -> str | None:
    """Grouped bars of ``metric`` (percent), mean ± std over seeds (no error bar for one
    seed); None if no data."""
    groups = aggregate.group_values(runs, metric)
    if not groups:
        return None
    plt = _pyplot()
    panels = _panels(grid)
    width = 0.8 / len(grid.optimizers)
    fig, ax = plt.subplots(figsize=(max(7.5, 1.6 * len(panels) + 2), 3.8))
    x = np.arange(len(panels))
    lows = []
    colors = _colors(grid)
    for i, optimizer in enumerate(grid.optimizers):
        stats = [
            aggregate.mean_std(groups[(c, n, optimizer)])
            if (c, n, optimizer) in groups
            else (np.nan, 0.0)
            for c, n in panels
        ]
        mean = 100 * np.array([s[0] for s in stats])
        std = 100 * np.array([s[1] for s in stats])
        lows.append(np.nanmin(mean - std) if np.isfinite(mean).any() else np.nan)
        ax.bar(
            x + (i - (len(grid.optimizers) - 1) / 2) * width,
            mean,
            width,
            yerr=std if len(grid.seeds) > 1 else None,
            capsize=3,
            label=optimizer,
            color=colors[optimizer],
        )
    low = np.nanmin(lows)
    ax.set_ylim(max(0.0, low - 5), 100)
    ax.set_xticks(x, [aggregate.column_label(grid, c, n) for c, n in panels])
    ax.set_ylabel('final test accuracy (%)')
    ax.set_title(f'{grid.name}: {_spread(grid)}')
    ax.grid(axis='y', alpha=0.3)
    _legend(ax, len(panels), len(grid.optimizers))
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points ``(cost, value)`` that no other point beats on both (lower or
    equal cost and higher or equal value, one of them strictly), in order of cost."""
    front = [
        i for i, (cost, value) in enumerate(points)
        if not any(c <= cost and v >= value and (c, v) != (cost, value) for c, v in points)
    ]
    return sorted(front, key=lambda i: points[i])


def pareto(
    grid: grids.Grid, runs: Sequence[aggregate.Run], path: str,
    metric: str = 'final_test_accuracy',
) -> str | None:
    """Accuracy (percent) against wall time per optimiser, one panel per column, mean ± std
    over seeds as error bars on both axes, the Pareto front joined; None if no data."""
    accuracy = aggregate.group_values(runs, metric)
    wall = aggregate.group_values(runs, 'wall_time_s')
    panels = [p for p in _panels(grid) if any((*p, o) in accuracy for o in grid.optimizers)]
    if not panels or not wall:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    colors = _colors(grid)
    for ax, (config, noise) in zip(axes[0], panels):
        points, names = [], []
        for optimizer in grid.optimizers:
            key = (config, noise, optimizer)
            if key not in accuracy or key not in wall:
                continue
            (x, dx), (y, dy) = aggregate.mean_std(wall[key]), aggregate.mean_std(accuracy[key])
            ax.errorbar(x, 100 * y, xerr=dx, yerr=100 * dy, fmt='o', capsize=3,
                        color=colors[optimizer], label=optimizer)
            points.append((x, 100 * y))
            names.append(optimizer)
        front = pareto_front(points)
        ax.plot([points[i][0] for i in front], [points[i][1] for i in front], '--', color='k',
                alpha=0.4, label='Pareto front')
        ax.set_xlabel('wall time of a run (s)')
        ax.set_ylabel('final test accuracy (%)')
        ax.set_title(aggregate.column_label(grid, config, noise))
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize='small')
    fig.suptitle(f'{grid.name}: accuracy against wall time (mean ± std over seeds)')
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def grid_plots(grid: grids.Grid, runs: Sequence[aggregate.Run], workdir: str) -> list[str]:
    """All plots of a grid into ``workdir``; returns the paths drawn."""
    drawn = [
        curves(
            grid,
            runs,
            os.path.join(workdir, 'test_accuracy.png'),
            keys=[('test_accuracy', 'test accuracy (%)', 100.0, False)],
            title=f'{grid.name}: test accuracy ({_spread(grid)})',
        ),
        bars(grid, runs, os.path.join(workdir, 'final_accuracy.png')),
        pareto(grid, runs, os.path.join(workdir, 'accuracy_vs_wall_time.png'))
        if grid.compare_cost else None,
        curves(  # drawn for runs that evaluate their training set (config.eval_train)
            grid,
            runs,
            os.path.join(workdir, 'memorisation.png'),
            keys=[
                ('train_eval_accuracy', 'train acc., labels trained on (%)', 100.0, False),
                ('train_eval_true_accuracy', 'train acc., true labels (%)', 100.0, False),
            ],
            title=f'{grid.name}: fit of the noisy labels against the true ones',
        ),
        curves(
            grid,
            runs,
            os.path.join(workdir, 'stability.png'),
            keys=[
                ('eps_cosine', 'cos(eps_t, eps_t-1)', 1.0, False),
                ('eps_variance', 'variance of eps_1..eps_t', 1.0, False),
            ],
            title=f'{grid.name}: adversary stability over training',
        ),
    ]
    return [p for p in drawn if p]
