"""Aggregates a grid's runs into markdown tables (mean ± std over seeds) and a comparison with
the published numbers of ``experiments/study/paper_results.json``.

Each cell folder holds the trainer's ``summary.json`` and ``metrics.jsonl`` and, when the grid
asks for them, ``diagnostics.json`` (``experiments.diagnose``). Only completed runs count; a
table entry over fewer seeds than the grid has says so, e.g. ``96.10 ± 0.05 (n=2)``. The
standard deviation is the sample one (``ddof=1``), 0 for a single seed.
"""

import dataclasses
import os
import shutil
from collections.abc import Callable, Sequence

import numpy as np

from experiments.runtime import files, metrics
from experiments.study import diagnose, grids

PAPER_RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'paper_results.json')
REPORT_FILE = 'results.md'


@dataclasses.dataclass(frozen=True)
class Run:
    """What one cell left on disk (``summary`` is None until it finished once)."""

    cell: grids.Cell
    workdir: str
    summary: dict | None
    diagnostics: dict | None
    stability: dict

    @property
    def completed(self) -> bool:
        return bool(self.summary and self.summary.get('completed'))

    def value(self, metric: str):
        """``metric`` from the summary, the diagnostics or the stability summary (or None)."""
        for source in (self.summary or {}, self.diagnostics or {}, self.stability):
            if source.get(metric) is not None:
                return source[metric]
        return None


@dataclasses.dataclass(frozen=True)
class Metric:
    """A table: which value, its title, and how to print it."""

    key: str
    title: str
    scale: float = 1.0
    fmt: str = '.3g'


ACCURACY_TABLES = (
    Metric('final_test_accuracy', 'Final test accuracy (%)', 100.0, '.2f'),
    Metric('best_test_accuracy', 'Best test accuracy during training (%)', 100.0, '.2f'),
)
BLEU_TABLES = (
    Metric('final_bleu', 'Final BLEU (sacrebleu, detokenised)', 1.0, '.2f'),
    Metric('best_bleu', 'Best BLEU during training', 1.0, '.2f'),
    Metric('final_eval_perplexity', 'Final validation perplexity', 1.0, '.2f'),
)
NOISE_TABLES = (
    Metric(
        'final_train_eval_accuracy',
        'Train accuracy on the noisy labels trained on (%)',
        100.0,
        '.1f',
    ),
    Metric(
        'final_train_eval_true_accuracy',
        'Train accuracy on the true labels of the same images (%)',
        100.0,
        '.1f',
    ),
)
DIAGNOSTIC_TABLES = (
    Metric('hessian_top_eigenvalue', 'Top Hessian eigenvalue of the training loss (final params)'),
    Metric('m_sharpness', 'm-sharpness (final params)'),
)
STABILITY_TABLES = (
    Metric('eps_cosine', 'cos(eps_t, eps_t-1), mean over training', 1.0, '.3f'),
    Metric('eps_variance', 'Variance of eps across steps (whole run)'),
)


def stability_summary(history) -> dict[str, float]:
    """Run-level adversary stability from a metrics history (``metrics.jsonl`` records).

    ``eps_cosine``: mean of the logged interval means (every step weighs the same when the
    log intervals are equal); ``eps_variance``: the last logged value (it already covers the
    whole run). Empty when the run did not log stability (``vasso_jax.track_stability``).
    """
    cosines = [r['eps_cosine'] for r in history if r.get('eps_cosine') is not None]
    variances = [r['eps_variance'] for r in history if r.get('eps_variance') is not None]
    out = {}
    if cosines:
        out['eps_cosine'] = float(sum(cosines) / len(cosines))
    if variances:
        out['eps_variance'] = float(variances[-1])
    return out


def collect(grid: grids.Grid, workdir: str) -> list[Run]:
    """A :class:`Run` for every cell of ``grid`` under ``workdir`` (finished or not)."""
    runs = []
    for cell in grids.cells(grid):
        cell_dir = os.path.join(workdir, cell.name)
        summary = files.read_json(os.path.join(cell_dir, metrics.SUMMARY_FILE))
        history = metrics.read_history(cell_dir) if summary else []
        runs.append(
            Run(cell, cell_dir, summary, diagnose.read(cell_dir), stability_summary(history))
        )
    return runs


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else 0.0


def group_values(runs: Sequence[Run], metric: str) -> dict[tuple, list[float]]:
    """``{(config, label_noise, optimizer): [value per completed seed]}``."""
    groups: dict[tuple, list[float]] = {}
    for run in runs:
        value = run.value(metric) if run.completed else None
        if value is not None:
            key = (run.cell.config, run.cell.label_noise, run.cell.optimizer)
            groups.setdefault(key, []).append(float(value))
    return groups


def format_entry(
    values: Sequence[float], num_seeds: int, scale: float = 1.0, fmt: str = '.3g'
) -> str:
    """``'mean ± std'`` (scaled), with ``(n=k)`` when fewer than ``num_seeds`` runs count;
    the value alone in a one-seed grid, which has no spread to report."""
    if not values:
        return '—'
    mean, std = mean_std([scale * v for v in values])
    if num_seeds == 1:
        return f'{mean:{fmt}}'
    text = f'{mean:{fmt}} ± {std:{fmt}}'
    return text if len(values) >= num_seeds else f'{text} (n={len(values)})'


def column_label(grid: grids.Grid, config: str, noise: float) -> str:
    parts = [grid.config_labels.get(config, config)] if len(grid.configs) > 1 else []
    if len(grid.label_noise) > 1 or noise:
        parts.append(f'noise {round(100 * noise)}%')
    return ' / '.join(parts) or config


def table(grid: grids.Grid, runs: Sequence[Run], metric: Metric) -> str:
    """A markdown table: one row per optimiser, one column per (config, noise level).

    Empty (``''``) when no completed run has the value; optimisers without any value (e.g.
    SGD in the stability tables) are left out.
    """
    groups = group_values(runs, metric.key)
    if not groups:
        return ''
    columns = grids.columns(grid)
    lines = [
        f'**{metric.title}**',
        '',
        '| optimizer | ' + ' | '.join(column_label(grid, c, n) for c, n in columns) + ' |',
        '|---|' + '---:|' * len(columns),
    ]
    for optimizer in grid.optimizers:
        if not any((c, n, optimizer) in groups for c, n in columns):
            continue
        entries = [
            format_entry(
                groups.get((c, n, optimizer), []), len(grid.seeds), metric.scale, metric.fmt
            )
            for c, n in columns
        ]
        lines.append(f'| {optimizer} | ' + ' | '.join(entries) + ' |')
    return '\n'.join(lines)


def cost_table(grid: grids.Grid, runs: Sequence[Run]) -> str:
    """Markdown: per optimiser and column, final test accuracy and the run's wall time (both
    mean ± std over seeds) and the wall time as a multiple of SGD's in that column.

    Wall time is the trainer's ``wall_time_s`` (training and evaluation, compilation included),
    so it is comparable only between runs of one machine under the same load. Empty when no
    completed run has both values.
    """
    accuracy = group_values(runs, 'final_test_accuracy')
    wall = group_values(runs, 'wall_time_s')
    if not accuracy or not wall:
        return ''
    columns = grids.columns(grid)
    header, rule = ['optimizer'], ['---']
    for c, n in columns:
        label = column_label(grid, c, n)
        header += [f'{label}: test acc. (%)', f'{label}: wall time (s)', f'{label}: × sgd']
        rule += ['---:'] * 3
    lines = [
        '**Accuracy against wall time**',
        '',
        '| ' + ' | '.join(header) + ' |',
        '|' + '|'.join(rule) + '|',
    ]
    for optimizer in grid.optimizers:
        if not any((c, n, optimizer) in accuracy for c, n in columns):
            continue
        entries = []
        for c, n in columns:
            seconds = wall.get((c, n, optimizer), [])
            sgd = wall.get((c, n, 'sgd'), [])
            ratio = (f'{mean_std(seconds)[0] / mean_std(sgd)[0]:.2f}'
                     if seconds and sgd else '—')
            entries += [
                format_entry(accuracy.get((c, n, optimizer), []), len(grid.seeds), 100.0,
                             '.2f'),
                format_entry(seconds, len(grid.seeds), 1.0, '.0f'),
                ratio,
            ]
        lines.append(f'| {optimizer} | ' + ' | '.join(entries) + ' |')
    return '\n'.join(lines)


def load_paper_results(path: str = PAPER_RESULTS) -> dict:
    return files.read_json(path)


def paper_entries(grid: grids.Grid, paper: dict) -> list[dict]:
    """The published numbers that this grid's cells are compared with."""
    return [e for e in paper['results'] if grid.name in e['grids']]


def paper_comparison(grid: grids.Grid, runs: Sequence[Run], paper: dict) -> str:
    """Markdown: each published number next to ours and the difference.

    Ours is the final test accuracy, or the entry's ``metric`` (e.g. ``best_test_accuracy``,
    what the official VaSSO code reports) where it names one.
    """
    entries = paper_entries(grid, paper)
    if not entries:
        return ''
    by_metric = {}
    lines = [
        '| setting | optimizer | published (%) | ours (%) | ours − published | source |',
        '|---|---|---:|---:|---:|---|',
    ]
    for entry in entries:
        target = entry['compare_with']
        key = (target['config'], target['label_noise'], target['optimizer'])
        published = entry['test_accuracy']
        spread = entry.get('uncertainty')
        published_text = f'{published:.1f}' + (f' ± {spread:.1f}' if spread is not None else '')
        metric = entry.get('metric', 'final_test_accuracy')
        if metric not in by_metric:
            by_metric[metric] = group_values(runs, metric)
        values = by_metric[metric].get(key, [])
        ours = format_entry(values, len(grid.seeds), 100.0, '.2f')
        if metric != 'final_test_accuracy':
            ours += f' ({metric.removesuffix("_test_accuracy")})'

        diff = f'{100 * mean_std(values)[0] - published:+.2f}' if values else '—'
        setting = column_label(grid, target['config'], target['label_noise'])
        lines.append(
            f'| {setting} | {target["optimizer"]} | {published_text} | {ours} | {diff} '
            f'| {entry["source"]}, {entry["table"]} |'
        )
    notes = sorted(
        {f'- {e["source"]}, {e["table"]}: {e["note"]}' for e in entries if e.get('note')}
    )
    sources = sorted({e['source'] for e in entries})
    refs = [f'- {s}: {paper["sources"][s]["citation"]}' for s in sources]
    return '\n'.join(lines + [''] + notes + refs)


def report(
    grid: grids.Grid, runs: Sequence[Run], paper: dict | None = None, plots: Sequence[str] = ()
) -> str:
    """The whole markdown report of a grid."""
    done = sum(run.completed for run in runs)
    parts = [
        f'# Grid `{grid.name}`',
        '',
        grid.description,
        '',
        f'{done}/{len(runs)} runs completed; ' + (
            f'mean ± std over seeds {list(grid.seeds)}.' if len(grid.seeds) > 1
            else f'one seed ({grid.seeds[0]}): single runs, no spread.'),
    ]
    metric_lists: list[Sequence[Metric]] = [ACCURACY_TABLES, BLEU_TABLES]  # empty ones drop
    if any(grid.label_noise) or 'dataset' in grid.overrides:
        metric_lists.append(NOISE_TABLES)
    metric_lists += [DIAGNOSTIC_TABLES, STABILITY_TABLES]
    for metric_list in metric_lists:
        for metric in metric_list:
            text = table(grid, runs, metric)
            if text:
                parts += ['', text]
    cost = cost_table(grid, runs) if grid.compare_cost else ''
    if cost:
        parts += ['', cost]
    comparison = paper_comparison(grid, runs, paper) if paper else ''
    if comparison:
        parts += ['', '## Published numbers', '', comparison]
    if plots:
        parts += ['', '## Plots', ''] + [
            f'![{os.path.basename(p)}]({os.path.basename(p)})' for p in plots
        ]
    return '\n'.join(parts) + '\n'


def write_report(
    grid: grids.Grid, workdir: str, *, plot_fn: Callable | None = None, results_dir: str = ''
) -> tuple[str, str]:
    """Collects ``workdir``, draws the plots (``plot_fn(grid, runs, workdir) -> paths``) and
    writes ``WORKDIR/results.md``; returns ``(path, markdown)``.

    With ``results_dir`` (the grid's records in the repository, :mod:`.records`) the report
    and its plots are copied there too, so the tables quoted elsewhere (the README) can be
    checked against what the records generate.
    """
    runs = collect(grid, workdir)
    plots = plot_fn(grid, runs, workdir) if plot_fn else ()
    text = report(grid, runs, load_paper_results(), plots)
    path = os.path.join(workdir, REPORT_FILE)
    files.write_atomic(path, text)  # the processes of a grid may end together
    if results_dir:
        os.makedirs(results_dir, exist_ok=True)
        for src in (path, *plots):
            with files.atomic_path(os.path.join(results_dir, os.path.basename(src))) as tmp:
                shutil.copyfile(src, tmp)
    return path, text
