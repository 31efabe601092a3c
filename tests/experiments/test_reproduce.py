"""Tests of the grid runner, the aggregation, the published numbers and stability tracking."""

import dataclasses
import importlib
import json
import os
import socket
import subprocess
import sys
import threading

import jax
import numpy as np
import optax
import pytest

import vasso_jax
from experiments.image_classification import steps, task
from experiments.image_classification.data import augment
from experiments.runtime import errors, files, optimizers
from experiments.study import aggregate, claims, diagnose, grids, plots, records, reproduce
from tests.experiments import tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# --------------------------------------------------------------------------- grids


@pytest.mark.parametrize('name', list(grids.GRIDS))
def test_every_cell_of_every_grid_has_a_valid_config(name):
    grid = grids.GRIDS[name]
    cells = grids.cells(grid)
    assert (
        len({c.name for c in cells})
        == len(cells)
        == (len(grids.columns(grid)) * len(grid.optimizers) * len(grid.seeds))
    )
    for cell in cells:
        config = grids.make_config(grid, cell)
        importlib.import_module(
            f'experiments.{grids.task_name(config)}.task').validate_config(config)
        method = grid.optimizer_overrides.get(cell.optimizer, {}).get('optimizer', cell.optimizer)
        assert (config.optimizer, config.seed) == (method, cell.seed)
        if 'label_noise' in config:  # a task with label noise
            assert (config.label_noise, config.noise_seed) == (cell.label_noise, cell.seed)


def test_grids_hold_the_issue_settings():
    digits = grids.GRIDS['digits']
    assert len(grids.cells(digits)) == 36
    assert digits.label_noise == (0.0, 0.2, 0.4, 0.6) and len(digits.seeds) == 3
    assert grids.GRIDS['label_noise'].label_noise == (0.2, 0.4, 0.6, 0.8)
    noisy_humans = grids.make_config(
        grids.GRIDS['label_noise_cifar10n'], grids.cells(grids.GRIDS['label_noise_cifar10n'])[0]
    )
    assert (noisy_humans.dataset, noisy_humans.label_noise) == ('cifar10_n', 0.0)
    paper = grids.GRIDS['paper_cifar']
    assert {c.split('_')[1] for c in paper.configs} == {'resnet18', 'wrn28', 'pyramidnet110'}
    sgd = grids.make_config(paper, grids.Cell('cifar10_resnet18', 'sgd', 0.0, 0))
    vasso = grids.make_config(paper, grids.Cell('cifar10_resnet18', 'vasso', 0.0, 0))
    assert (sgd.weight_decay, vasso.weight_decay) == (5e-4, 1e-3)  # the official README's
    cost = grids.GRIDS['digits_cost']  # issue 14's study: the demo's recipe, 36 runs
    assert len(grids.cells(cost)) == 36 and cost.label_noise == (0.0, 0.4)
    every_5 = grids.make_config(cost, grids.Cell('digits_resnet', 'vasso_k5', 0.4, 1))
    assert (every_5.optimizer, every_5.every_k, every_5.num_epochs, every_5.rho) == (
        'vasso', 5, 40, 0.5)
    assert {'one_pass_vasso', 'one_pass_momentum_sam', 'sgd', 'sam', 'vasso'} <= set(
        cost.optimizers)


def test_fashion_mnist_grids_hold_the_issue_settings():
    grid = grids.GRIDS['label_noise_fmnist']
    settings = {(grids.make_config(grid, c).noise_type, c.label_noise) for c in grids.cells(grid)}
    assert settings == {('symmetric', 0.0), ('symmetric', 0.4), ('symmetric', 0.6),
                        ('asymmetric', 0.4)}
    assert len(grids.cells(grid)) == 4 * 4 * 3  # settings x optimizers x seeds
    assert set(grid.optimizers) == {'sgd', 'sam', 'vasso', 'asam'}
    sweep = grids.GRIDS['label_noise_fmnist_sweep']
    configs = [grids.make_config(sweep, c) for c in grids.cells(sweep)]
    recipe = grids.make_config(grid, grids.Cell('fashion_mnist_noise', 'vasso', 0.4, 0))
    thetas = {c.theta for c in configs if c.optimizer == 'vasso' and c.rho == recipe.rho}
    assert thetas == {0.1, 0.4, 0.9, 1.0}
    rhos = {(c.optimizer, c.rho / recipe.rho) for c in configs if c.theta == recipe.theta}
    assert {('sam', 0.5), ('sam', 2.0), ('vasso', 0.5), ('vasso', 2.0)} <= rhos
    assert all(c.label_noise == 0.4 and c.seed == 0 for c in configs)


def test_skipped_settings_are_neither_run_nor_tabulated(tmp_path):
    grid = grids.Grid('t', 't', configs=('a', 'b'), optimizers=('sgd',), seeds=(0,),
                      label_noise=(0.0, 0.4), skip=frozenset({('b', 0.0)}))
    assert [c.name for c in grids.cells(grid)] == [
        'a-sgd-noise00-seed0', 'a-sgd-noise40-seed0', 'b-sgd-noise40-seed0']
    for cell in grids.cells(grid):
        write_run(str(tmp_path), cell, 0.5)
    runs = aggregate.collect(grid, str(tmp_path))
    header = aggregate.table(grid, runs, aggregate.ACCURACY_TABLES[0]).splitlines()[2]
    assert header == '| optimizer | a / noise 0% | a / noise 40% | b / noise 40% |'


def test_cells_put_the_seed_outermost():
    grid = grids.Grid(
        't', 't', configs=('a',), optimizers=('sgd', 'sam'), seeds=(0, 1), label_noise=(0.0, 0.4)
    )
    names = [c.name for c in grids.cells(grid)]
    assert names[:4] == [
        'a-sgd-noise00-seed0',
        'a-sam-noise00-seed0',
        'a-sgd-noise40-seed0',
        'a-sam-noise40-seed0',
    ]


def test_shards_are_disjoint_and_complete():
    cells = grids.cells(grids.GRIDS['digits'])
    shards = [grids.shard(cells, i, 5) for i in range(5)]
    assert sorted(c for s in shards for c in s) == sorted(cells)
    assert grids.parse_shard('3/5') == (3, 5)
    for bad in ('5/5', '-1/2', 'a/b', '1'):
        with pytest.raises(errors.ConfigError, match='must be i/n'):
            grids.parse_shard(bad)


def test_overrides_are_checked_and_typed():
    assert grids.parse_overrides(['num_epochs=3', 'data_dir=/x', 'rho=0.2']) == {
        'num_epochs': 3,
        'data_dir': '/x',
        'rho': 0.2,
    }
    with pytest.raises(errors.ConfigError, match='key=value'):
        grids.parse_overrides(['num_epochs'])
    grid, cell = grids.GRIDS['digits'], grids.cells(grids.GRIDS['digits'])[0]
    config = grids.make_config(grid, cell, {'model_kwargs.width': 4, 'seed': 7})
    assert (config.model_kwargs.width, config.seed) == (4, 7)  # --set wins over the cell
    with pytest.raises(errors.ConfigError, match="'nope' is not a config field"):
        grids.make_config(grid, cell, {'nope': 1})
    with pytest.raises(errors.ConfigError, match='wrong type'):
        grids.make_config(grid, cell, {'num_epochs': 'many'})
    with pytest.raises(errors.ConfigError, match='--grid'):
        grids.get_grid('imagenet')


# --------------------------------------------------------------------------- aggregation

SMALL = grids.Grid(
    'small',
    'a hand-made grid',
    configs=('a_cfg', 'b_cfg'),
    optimizers=('sgd', 'vasso'),
    seeds=(0, 1),
)


def write_run(workdir, cell, accuracy, *, completed=True, eps=None, diagnostics=None,
              wall=100.0):
    """A fake finished cell: summary.json, metrics.jsonl, optionally diagnostics.json."""
    cell_dir = os.path.join(workdir, cell.name)
    os.makedirs(cell_dir, exist_ok=True)
    summary = {
        'completed': completed,
        'final_test_accuracy': accuracy,
        'best_test_accuracy': accuracy + 0.01,
        'wall_time_s': wall,
    }
    with open(os.path.join(cell_dir, 'summary.json'), 'w') as f:
        json.dump(summary, f)
    with open(os.path.join(cell_dir, 'metrics.jsonl'), 'w') as f:
        for step in (1, 2):
            record = {'step': step, 'epoch': float(step), 'test_accuracy': accuracy - 0.1 / step}
            if eps is not None:
                record.update(eps_cosine=eps * step, eps_variance=1e-3 / step)
            f.write(json.dumps(record) + '\n')
    if diagnostics is not None:
        with open(os.path.join(cell_dir, 'diagnostics.json'), 'w') as f:
            json.dump(diagnostics, f)


def test_hand_made_summaries_give_the_expected_table(tmp_path):
    workdir = str(tmp_path)
    cell = lambda config, optimizer, seed: grids.Cell(config, optimizer, 0.0, seed)
    write_run(workdir, cell('a_cfg', 'sgd', 0), 0.90)
    write_run(workdir, cell('a_cfg', 'sgd', 1), 0.92, wall=120.0)
    write_run(
        workdir,
        cell('a_cfg', 'vasso', 0),
        0.95,
        wall=210.0,
        eps=0.2,
        diagnostics={'hessian_top_eigenvalue': 10.0, 'm_sharpness': 0.5},
    )
    write_run(
        workdir,
        cell('a_cfg', 'vasso', 1),
        0.97,
        wall=230.0,
        eps=0.4,
        diagnostics={'hessian_top_eigenvalue': 20.0, 'm_sharpness': 0.7},
    )
    write_run(workdir, cell('b_cfg', 'sgd', 0), 0.80)
    write_run(workdir, cell('b_cfg', 'sgd', 1), 0.10, completed=False)  # interrupted: ignored
    runs = aggregate.collect(SMALL, workdir)
    assert sum(r.completed for r in runs) == 5

    final = aggregate.table(SMALL, runs, aggregate.ACCURACY_TABLES[0])
    assert final == '\n'.join(
        [
            '**Final test accuracy (%)**',
            '',
            '| optimizer | a_cfg | b_cfg |',
            '|---|---:|---:|',
            '| sgd | 91.00 ± 1.41 | 80.00 ± 0.00 (n=1) |',
            '| vasso | 96.00 ± 1.41 | — |',
        ]
    )
    hessian = aggregate.table(SMALL, runs, aggregate.DIAGNOSTIC_TABLES[0])
    assert hessian.splitlines()[-1] == '| vasso | 15 ± 7.07 | — |'
    assert 'sgd' not in hessian  # no diagnostics for SGD here: the row is left out
    cosine = aggregate.table(SMALL, runs, aggregate.STABILITY_TABLES[0])
    # eps_cosine per run: mean of the logged (0.2, 0.4) and (0.4, 0.8): 0.3 and 0.6.
    assert cosine.splitlines()[-1] == '| vasso | 0.450 ± 0.212 | — |'

    paper = {
        'sources': {'X 2020': {'citation': 'X et al., 2020'}},
        'results': [
            {
                'source': 'X 2020',
                'table': 'Table 9',
                'grids': ['small'],
                'compare_with': {'config': 'a_cfg', 'optimizer': 'vasso', 'label_noise': 0.0},
                'test_accuracy': 95.5,
                'uncertainty': 0.2,
                'note': 'a note',
            },
            {
                'source': 'X 2020',
                'table': 'Figure 1',
                'grids': ['small'],
                'compare_with': {'config': 'a_cfg', 'optimizer': 'sgd', 'label_noise': 0.0},
                'test_accuracy': 92.0,
                'metric': 'best_test_accuracy',  # seeds' best: 0.91 and 0.93
            },
        ],
    }
    comparison = aggregate.paper_comparison(SMALL, runs, paper)
    assert '| a_cfg | vasso | 95.5 ± 0.2 | 96.00 ± 1.41 | +0.50 | X 2020, Table 9 |' in comparison
    assert '| a_cfg | sgd | 92.0 | 92.00 ± 1.41 (best) | +0.00 | X 2020, Figure 1 |' in comparison
    assert 'X et al., 2020' in comparison and 'a note' in comparison

    cost = aggregate.cost_table(SMALL, runs)
    assert cost.splitlines()[-2:] == [  # wall: sgd 110 ± 14.1, vasso 220 ± 14.1 (2.00x)
        '| sgd | 91.00 ± 1.41 | 110 ± 14 | 1.00 | 80.00 ± 0.00 (n=1) | 100 ± 0 (n=1) | 1.00 |',
        '| vasso | 96.00 ± 1.41 | 220 ± 14 | 2.00 | — | — | — |',
    ]

    paths = plots.grid_plots(SMALL, runs, workdir)
    assert [os.path.basename(p) for p in paths] == [
        'test_accuracy.png',
        'final_accuracy.png',
        'accuracy_vs_wall_time.png',
        'stability.png',
    ]
    assert all(os.path.getsize(p) > 1000 for p in paths)
    text = aggregate.report(SMALL, runs, paper, paths)
    assert '5/8 runs completed' in text and '![stability.png](stability.png)' in text


def test_a_noise_grid_reports_both_label_fits_and_a_shared_machine_no_cost(tmp_path):
    grid = dataclasses.replace(SMALL, label_noise=(0.4,), seeds=(0,), compare_cost=False,
                               config_labels={'a_cfg': 'A'})
    workdir = str(tmp_path)
    for config in ('a_cfg', 'b_cfg'):
        cell = grids.Cell(config, 'sgd', 0.4, 0)
        write_run(workdir, cell, 0.7)
        summary_path = os.path.join(workdir, cell.name, 'summary.json')
        summary = files.read_json(summary_path)
        summary.update(final_train_eval_accuracy=0.95, final_train_eval_true_accuracy=0.61)
        with open(summary_path, 'w') as f:
            json.dump(summary, f)
        with open(os.path.join(workdir, cell.name, 'metrics.jsonl'), 'a') as f:
            f.write(json.dumps({'step': 2, 'epoch': 2.0, 'train_eval_accuracy': 0.95,
                                'train_eval_true_accuracy': 0.61}) + '\n')
    runs = aggregate.collect(grid, workdir)
    text = aggregate.report(grid, runs)
    noisy, true = (text.split(f'**{m.title}**')[1] for m in aggregate.NOISE_TABLES)
    assert '| optimizer | A / noise 40% | b_cfg / noise 40% |' in noisy
    assert '| sgd | 95.0 | 95.0 |' in noisy  # one seed: the value, no ± 0
    assert '| sgd | 61.0 | 61.0 |' in true
    assert 'one seed (0): single runs, no spread.' in text
    assert 'wall time' not in text  # cells that shared a machine: no cost table
    paths = plots.grid_plots(grid, runs, workdir)
    assert [os.path.basename(p) for p in paths] == [
        'test_accuracy.png', 'final_accuracy.png', 'memorisation.png']


def test_a_one_seed_sweep_plot_claims_no_spread_and_keeps_its_legend_off_the_curves(
        tmp_path, monkeypatch):
    names = tuple(f'vasso_theta{t}' for t in (0.1, 0.4, 0.9, 1.0)) + ('sam_rho2x',)
    grid = dataclasses.replace(SMALL, configs=('a_cfg',), optimizers=names, seeds=(0,))
    workdir = str(tmp_path)
    for i, name in enumerate(names):
        write_run(workdir, grids.Cell('a_cfg', name, 0.0, 0), 0.8 + 0.01 * i)
    drawn = {}

    def keep(fig, path):  # what each figure says, before grid_plots closes it
        legend = fig.axes[0].get_legend()
        drawn[os.path.basename(path)] = (
            fig.get_suptitle() or fig.axes[0].get_title(),
            legend.get_bbox_to_anchor().transformed(fig.axes[0].transAxes.inverted()).x0)

    monkeypatch.setattr(plots, '_save', keep)
    plots.grid_plots(grid, aggregate.collect(grid, workdir), workdir)
    title, legend_x = drawn['test_accuracy.png']
    assert 'one seed (0), no spread' in title and '±' not in title
    assert legend_x > 1.0  # five curves in one panel: the legend sits to its right
    title, legend_x = drawn['final_accuracy.png']
    assert title == 'small: one seed (0), no spread' and legend_x > 1.0
    assert plots._spread(SMALL) == 'mean ± std over 2 seeds'


def test_each_curve_and_its_band_share_one_colour_and_variants_get_distinct_ones(
        tmp_path, monkeypatch):
    from matplotlib import colors as mcolors

    names = ('sgd', 'sam_rho0.5x', 'vasso_rho0.5x', 'asam_rho0.5x')
    grid = dataclasses.replace(SMALL, configs=('a_cfg',), optimizers=names)
    workdir = str(tmp_path)
    for i, name in enumerate(names):
        for seed in grid.seeds:
            write_run(workdir, grids.Cell('a_cfg', name, 0.0, seed), 0.8 + 0.01 * i)
    drawn = {}

    def keep(fig, path):
        ax = fig.axes[0]
        if os.path.basename(path) == 'test_accuracy.png':
            drawn['curves'] = (
                [mcolors.to_hex(line.get_color()) for line in ax.lines],
                [mcolors.to_hex(band.get_facecolor()[0], keep_alpha=False)
                 for band in ax.collections])

    monkeypatch.setattr(plots, '_save', keep)
    plots.grid_plots(grid, aggregate.collect(grid, workdir), workdir)
    lines, bands = drawn['curves']
    assert lines == bands and len(set(lines)) == len(names)
    assert lines[0] == mcolors.to_hex(plots.COLORS['sgd'])  # a known name keeps its colour
    assert mcolors.to_hex(plots.COLORS['sgd']) not in lines[1:]


def test_pareto_front_keeps_the_points_nothing_beats():
    # (cost, value): (1, 50) cheapest; (2, 60) better; (3, 55) beaten by (2, 60); (4, 70) best.
    points = [(3.0, 55.0), (1.0, 50.0), (4.0, 70.0), (2.0, 60.0), (2.0, 60.0)]
    assert plots.pareto_front(points) == [1, 3, 4, 2]
    assert plots.pareto_front([(1.0, 1.0)]) == [0]


def test_mean_curve_averages_the_common_steps():
    histories = [
        [{'step': 1, 'epoch': 0.5, 'x': 1.0}, {'step': 2, 'epoch': 1.0, 'x': 3.0}],
        [{'step': 2, 'epoch': 1.0, 'x': 5.0}],
    ]
    epochs, mean, std = plots.mean_curve(histories, 'x')
    np.testing.assert_allclose((epochs, mean, std), ([1.0], [4.0], [1.0]))
    assert plots.mean_curve([[{'step': 1}]], 'x') is None


def test_paper_results_are_sourced_and_consistent():
    paper = aggregate.load_paper_results()
    assert paper['results'] and paper['not_found']
    for entry in paper['results']:
        assert entry['source'] in paper['sources']
        target = entry['compare_with']
        for name in entry['grids']:
            grid = grids.GRIDS[name]
            assert target['config'] in grid.configs
            assert target['optimizer'] in grid.optimizers
            assert target['label_noise'] in grid.label_noise
        quoted = float(entry['quoted'].split('±')[0].split()[0])
        want = 100.0 - quoted if 'error' in entry['quoted'] else quoted
        assert entry['test_accuracy'] == pytest.approx(want)


# --------------------------------------------------------------------------- stability


def test_stability_summary():
    history = [
        {'step': 1, 'eps_cosine': 0.2, 'eps_variance': 3.0},
        {'step': 2, 'loss': 1.0},
        {'step': 3, 'eps_cosine': 0.6, 'eps_variance': 1.0},
    ]
    expected = {'eps_cosine': pytest.approx(0.4), 'eps_variance': 1.0}
    assert aggregate.stability_summary(history) == expected
    assert aggregate.stability_summary([{'step': 1}]) == {}


@pytest.mark.slow
def test_trainer_logs_what_the_tracker_computes():
    """Three jitted train steps of VaSSO with log_stability: the logged per-step metrics equal
    vasso_jax.perturbation_stability fed with the eps_t that the link kept."""
    images = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 1), dtype=np.uint8)
    labels = np.arange(16, dtype=np.int32) % 10
    model = tiny_model.MLP(num_classes=10)
    config = grids.make_config(grids.GRIDS['digits'], grids.Cell('digits_resnet', 'vasso', 0.0, 0))
    assert config.log_stability
    tx = optimizers.make_optimizer(config, 0.05)
    init_key, data_key, augment_key = steps.split_keys(0)
    state = steps.create_train_state(
        model, tx, image_shape=(8, 8, 1), init_key=init_key, augment_key=augment_key
    )
    diagnostics = optimizers.link_diagnostics(state.opt_state)
    assert diagnostics == optimizers.LINK_DIAGNOSTICS + optimizers.STABILITY_DIAGNOSTICS
    augment_fn = lambda key, x: augment.normalize(x, mean=0.5, std=0.25)
    step = jax.jit(
        steps.make_train_step(
            model,
            tx,
            augment_fn,
            num_classes=10,
            batch_size=8,
            epoch_steps=2,
            diagnostics=diagnostics,
        )
    )
    data = steps.shard_split(images, labels, labels, 1)
    perm = steps.epoch_permutation(data_key, 0, 1, 16)
    tracker = vasso_jax.perturbation_stability()
    tracked = tracker.init(state.params)
    for _ in range(3):
        state, sums = step(state, steps.zero_metrics(diagnostics), data, perm)
        logged = steps.summarize_train_metrics(jax.device_get(sums))
        want, tracked = tracker.update(optax.tree.get(state.opt_state, 'perturbation'), tracked)
        for name in ('cosine', 'mean_cosine', 'variance'):
            np.testing.assert_allclose(logged[f'eps_{name}'], want[name], rtol=1e-5, atol=1e-9)
    assert 0.0 < logged['eps_cosine'] <= 1.0  # VaSSO's direction turns slowly


# --------------------------------------------------------------------------- end to end


def tiny_grid(**kwargs):
    """2 data sets x 2 optimisers x 1 seed on 40 mock CIFAR examples, 4 steps each."""
    return grids.Grid(
        'tiny',
        'tiny',
        configs=('cifar10_wrn28_10', 'cifar100_wrn28_10'),
        optimizers=('sgd', 'vasso'),
        seeds=(0,),
        overrides={
            'batch_size': 8,
            'eval_batch_size': 16,
            'num_train_steps': 4,
            'log_every_steps': 2,
            'eval_every_steps': 2,
            'checkpoint_every_steps': 2,
            'progress_bar': False,
        },
        config_overrides={  # the tests' tiny MLP: the grid machinery is the point, not the model
            name: {'model': tiny_model.PATH, 'model_kwargs': {}}
            for name in ('cifar10_wrn28_10', 'cifar100_wrn28_10')},
        **kwargs,
    )


@pytest.mark.slow
def test_grid_runs_resumes_and_aggregates(tmp_path, mock_tfds):
    grid, workdir = tiny_grid(), str(tmp_path)
    names = [c.name for c in grids.cells(grid)]
    calls = []

    def interrupted_on_third(config, cell_dir):
        calls.append(os.path.basename(cell_dir))
        if len(calls) == 3:  # preempted halfway through the third cell
            task.train_and_evaluate(config, cell_dir, stop_at_step=2)
            raise KeyboardInterrupt
        return task.train_and_evaluate(config, cell_dir)

    with pytest.raises(KeyboardInterrupt):
        reproduce.run_grid(grid, workdir, train_fn=interrupted_on_third, log=lambda _: None)
    assert calls == names[:3]
    finished = {n: os.path.getmtime(os.path.join(workdir, n, 'summary.json')) for n in names[:2]}
    assert os.path.isdir(os.path.join(workdir, names[2], 'checkpoints', '2'))
    assert not reproduce.is_finished(os.path.join(workdir, names[2]))

    calls.clear()
    counting = lambda config, cell_dir: (
        calls.append(os.path.basename(cell_dir)),
        task.train_and_evaluate(config, cell_dir),
    )[1]
    reproduce.run_grid(grid, workdir, train_fn=counting, log=lambda _: None)
    assert calls == names[2:]  # finished cells are not trained again
    for name, mtime in finished.items():
        assert os.path.getmtime(os.path.join(workdir, name, 'summary.json')) == mtime
    history = [json.loads(line) for line in open(os.path.join(workdir, names[2], 'metrics.jsonl'))]
    assert [r['step'] for r in history if 'test_accuracy' in r] == [2, 4]  # no step run twice

    path, text = aggregate.write_report(grid, workdir, plot_fn=plots.grid_plots)
    assert '4/4 runs completed' in text
    runs = aggregate.collect(grid, workdir)
    accuracy = {r.cell.name: r.summary['final_test_accuracy'] for r in runs}
    row = next(line for line in text.splitlines() if line.startswith('| vasso |'))
    assert row == (
        f'| vasso | {100 * accuracy[names[1]]:.2f} | {100 * accuracy[names[3]]:.2f} |'  # one seed
    )
    assert os.path.exists(os.path.join(workdir, 'test_accuracy.png'))


@pytest.mark.slow
def test_diagnostics_of_a_finished_cell(tmp_path, mock_tfds):
    """4 steps; then the final-model diagnostics restore the last checkpoint."""
    spec = grids.Diagnostics(num_examples=16, num_iters=4, m=4, batch_size=8)
    grid = dataclasses.replace(
        tiny_grid(), configs=('cifar10_wrn28_10',), optimizers=('sam',), diagnostics=spec
    )
    cell = grids.cells(grid)[0]
    done = reproduce.run_cell(grid, cell, str(tmp_path), log=lambda _: None)
    assert 'lambda_max' in done
    cell_dir = os.path.join(str(tmp_path), cell.name)
    result = diagnose.read(cell_dir)
    summary = files.read_json(os.path.join(cell_dir, 'summary.json'))
    assert result['params_checksum'] == summary['params_checksum'] and result['step'] == 4
    assert np.isfinite(result['hessian_top_eigenvalue']) and result['hessian_top_eigenvalue'] > 0
    assert np.isfinite(result['m_sharpness'])
    assert 0.0 <= result['subset_accuracy'] <= 1.0
    assert reproduce.run_cell(grid, cell, str(tmp_path), log=lambda _: None) == (
        'skipped (finished)'
    )  # neither trained nor measured again


@pytest.mark.slow
def test_cli_lists_aggregates_and_rejects_bad_flags(tmp_path):
    grid = grids.GRIDS['digits']
    write_run(str(tmp_path), grids.cells(grid)[0], 0.9)
    cmd = [
        sys.executable,
        '-m',
        'experiments.reproduce',
        '--grid',
        'digits',
        '--workdir',
        str(tmp_path),
    ]
    out = subprocess.run(
        cmd + ['--aggregate_only'], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert '| sgd | 90.00 ± 0.00 (n=1) |' in out.stdout
    assert os.path.exists(os.path.join(str(tmp_path), 'results.md'))
    bad = subprocess.run(
        cmd + ['--shard', '3/3'], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert bad.returncode == 2 and bad.stderr.strip().count('\n') == 0
    assert 'must be i/n' in bad.stderr


def test_records_survive_a_fresh_workdir_and_are_committed(tmp_path):
    grid = grids.Grid('t', 't', configs=('digits_resnet',), optimizers=('sgd', 'vasso'),
                      seeds=(0,))
    repo = tmp_path / 'repo'
    repo.mkdir()
    git = lambda *args: subprocess.run(['git', '-C', str(repo), *args], check=True,
                                       capture_output=True, text=True).stdout
    git('init', '-q')
    git('config', 'user.email', 't@example.com')
    git('config', 'user.name', 't')
    results = str(repo / 'results' / 't')
    trained = []

    def fake_train(config, cell_dir):
        trained.append(os.path.basename(cell_dir))
        write_run(os.path.dirname(cell_dir), grids.Cell('digits_resnet', config.optimizer,
                                                        0.0, 0), 0.9)
        return {'final_test_accuracy': 0.9}

    cwd = os.getcwd()
    os.chdir(repo)  # the commit goes to the repository the command runs in
    try:
        reproduce.run_grid(grid, str(tmp_path / 'run1'), train_fn=fake_train, diagnostics=False,
                           log=lambda _: None, results_dir=results, git_commit=True)
    finally:
        os.chdir(cwd)
    names = [c.name for c in grids.cells(grid)]
    assert trained == names
    assert git('log', '--format=%s').split('\n')[:2] == [f'results: t {n}' for n in names[::-1]]
    assert set(git('ls-files').split()) == {
        f'results/t/{n}/{f}' for n in names for f in ('summary.json', 'metrics.jsonl')}

    def must_not_train(config, cell_dir):
        raise AssertionError('a recorded cell was trained again')

    fresh = str(tmp_path / 'fresh')
    reproduce.run_grid(grid, fresh, train_fn=must_not_train, diagnostics=False,
                       log=lambda _: None, results_dir=results)
    runs = aggregate.collect(grid, fresh)
    assert [r.completed for r in runs] == [True, True]


def test_a_commit_waits_for_another_shards_index_lock(tmp_path, monkeypatch):
    repo = tmp_path / 'repo'
    repo.mkdir()
    for args in (['init', '-q'], ['config', 'user.email', 't@example.com'],
                 ['config', 'user.name', 't']):
        subprocess.run(['git', '-C', str(repo), *args], check=True)
    cell_dir = tmp_path / 'cell'
    write_run(str(tmp_path), grids.Cell('c', 'sgd', 0.0, 0), 0.9)
    os.rename(tmp_path / grids.Cell('c', 'sgd', 0.0, 0).name, cell_dir)
    lock = repo / '.git' / 'index.lock'
    monkeypatch.chdir(repo)

    lock.write_text('')  # another shard's git is at work, and finishes 0.5 s later
    threading.Timer(0.5, os.remove, [lock]).start()
    records.record(str(cell_dir), 'results/g', 'c1', git_commit=True)
    log = subprocess.run(['git', 'log', '--format=%s'], capture_output=True, text=True).stdout
    assert log.split('\n')[0] == 'results: g c1'

    lock.write_text('')  # a lock nobody releases: a one-line error once the wait is over
    monkeypatch.setattr(records, 'LOCK_WAIT_S', 0.3)
    with pytest.raises(errors.ConfigError, match=r'`git add` failed .*index\.lock.*by hand'):
        records.record(str(cell_dir), 'results/g', 'c2', git_commit=True)
    assert os.path.exists(repo / 'results' / 'g' / 'c2' / 'summary.json')  # the record is kept


# --------------------------------------------------------------------------- --claim


def claim_grid():
    return grids.Grid('t', 't', configs=('digits_resnet',), optimizers=('sgd', 'sam', 'vasso'),
                      seeds=(0, 1), diagnostics=None)


def fake_train(trained):
    def train(config, cell_dir):
        trained.append(os.path.basename(cell_dir))
        write_run(os.path.dirname(cell_dir), grids.Cell('digits_resnet', config.optimizer,
                                                        0.0, config.seed), 0.9)
        return {'final_test_accuracy': 0.9}
    return train


def hold(workdir, name, owner):
    """A claim of ``name`` made by ``owner`` (another process, as far as the code can tell)."""
    path = os.path.join(workdir, claims.CLAIMS_DIR, name)
    os.makedirs(path)
    files.write_json(os.path.join(path, claims.OWNER_FILE), owner)


def dead_pid():
    child = subprocess.Popen([sys.executable, '-c', 'pass'])
    child.wait()
    return child.pid


def test_claimed_cells_are_left_to_live_owners_and_stale_claims_taken_over(tmp_path):
    workdir, names = str(tmp_path), [c.name for c in grids.cells(claim_grid())]
    here = socket.gethostname()
    hold(workdir, names[1], {'host': here, 'pid': os.getppid()})  # alive: left alone
    hold(workdir, names[2], {'host': 'elsewhere', 'pid': 1})  # cannot be checked: left alone
    hold(workdir, names[3], {'host': here, 'pid': dead_pid()})  # gone: taken over
    os.makedirs(os.path.join(workdir, claims.CLAIMS_DIR, names[4]))  # owner still writing
    write_run(workdir, grids.cells(claim_grid())[5], 0.9)  # finished; its claim
    hold(workdir, names[5], {'host': here, 'pid': os.getppid()})  # only checks that it is
    trained, logs = [], []
    reproduce.run_grid(claim_grid(), workdir, train_fn=fake_train(trained), claim=True,
                       diagnostics=False, log=logs.append)
    assert trained == [names[0], names[3]]
    assert set(claims.held(workdir)) == {names[1], names[2], names[4], names[5]}  # ours: gone
    assert logs[-1] == f'[6/6] {names[5]}: skipped (finished)'
    skipped = [line for line in logs if 'claimed by' in line]
    assert len(skipped) == 3
    assert f'pid {os.getppid()} on {here}' in skipped[0]
    assert os.path.join(workdir, claims.CLAIMS_DIR, names[2]) in skipped[1]
    assert 'a process starting it' in skipped[2]
    listing = reproduce.list_cells(claim_grid(), workdir, (0, 1))
    assert f'{names[0]} (finished)' in listing and 'on elsewhere)' in listing


def test_claiming_processes_train_every_cell_once(tmp_path):
    workdir, names = str(tmp_path), [c.name for c in grids.cells(claim_grid())]
    trained, barrier = [], threading.Barrier(3)

    def worker():
        barrier.wait()  # all three start together and race for every cell
        reproduce.run_grid(claim_grid(), workdir, train_fn=fake_train(trained), claim=True,
                           diagnostics=False, log=lambda _: None)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(trained) == sorted(names)
    assert claims.held(workdir) == {}


def test_a_claim_is_released_when_its_cell_fails(tmp_path):
    workdir = str(tmp_path)

    def preempted(config, cell_dir):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        reproduce.run_grid(claim_grid(), workdir, train_fn=preempted, claim=True,
                           diagnostics=False, log=lambda _: None)
    assert claims.held(workdir) == {}  # the next run may take the cell again


def test_files_written_by_racing_processes_are_whole(tmp_path):
    """Restores, records and reports of processes sharing a workdir replace files atomically."""
    path = str(tmp_path / 'results.md')
    files.write_atomic(path, 'old\n')
    with pytest.raises(RuntimeError):
        with files.atomic_path(path) as tmp:
            open(tmp, 'w').write('half')
            raise RuntimeError('killed while writing')
    assert open(path).read() == 'old\n' and os.listdir(tmp_path) == ['results.md']

    with files.atomic_path(path) as first, files.atomic_path(path) as second:
        assert first != second  # two writers never share a temporary file
        open(first, 'w').write('first\n')
        open(second, 'w').write('second\n')
    assert open(path).read() == 'first\n' and os.listdir(tmp_path) == ['results.md']

    names = [c.name for c in grids.cells(claim_grid())]
    reproduce.run_grid(claim_grid(), str(tmp_path / 'done'), train_fn=fake_train([]),
                       diagnostics=False, log=lambda _: None, results_dir=str(tmp_path / 'rec'))
    failures, rounds, start = [], 20, threading.Barrier(4)

    def restore():  # 4 processes restoring the same records into one fresh workdir, 20 times
        for r in range(rounds):
            start.wait()
            try:
                records.restore(str(tmp_path / 'rec'), str(tmp_path / f'work{r}'), names)
            except OSError as e:
                failures.append(e)

    threads = [threading.Thread(target=restore) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    for r in range(rounds):
        workdir = str(tmp_path / f'work{r}')
        assert all(reproduce.is_finished(os.path.join(workdir, n)) for n in names)
        assert not [f for _, _, fs in os.walk(workdir) for f in fs if f.endswith('.tmp')]
