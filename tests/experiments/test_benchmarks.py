"""Tests for the benchmarks: they run at tiny size (no timing assertions: timings belong in
the benchmark), count compilations, and the efficient mode's steps are what they claim."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import vasso_jax
from experiments.benchmarks import every_k_accuracy, harness, hessian_loop, measure, report, run
from experiments.study import demo
from tests.experiments import tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = harness.TINY


def tiny_variants(names, **kwargs):
    return harness.build_variants(
        TINY,
        names,
        batch_size=8,
        image_shape=(8, 8, 3),
        recipe='tiny',
        compiler_options=harness.FAST_COMPILE,
        **kwargs,
    )


def copy_state(variant):
    return jax.tree.map(jnp.copy, variant.state)


@pytest.mark.slow
def test_make_bench_tiny_writes_its_section_and_keeps_the_rest(tmp_path):
    path = tmp_path / 'BENCHMARKS.md'
    path.write_text(
        f'# Benchmarks\n\nintro\n\n{run.BEGIN}\nold table\n{run.END}\n\n## Notes\nkept\n'
    )
    results = run.main(['--tiny', '--output', str(path)])
    text = path.read_text()
    assert 'intro' in text and '## Notes\nkept' in text and 'old table' not in text
    assert text.count(run.BEGIN) == 1 and '### Targets' in text
    (model,) = results['models']
    rows = {r['variant']: r for r in model['rows']}
    assert list(rows) == ['sgd', 'sam', 'vasso', 'asam', harness.CONTRIB_SAM]
    every_k = model['every_k_rows']
    assert [r['variant'] for r in every_k] == [
        'vasso k=2 (lax.cond)',
        'vasso k=2 (host dispatch)',
    ]
    for r in model['rows'] + every_k:  # one compilation per executable over the whole run
        assert r['compilations'] == r['executables'], r
        assert r['steps_run'] == model['plan'].total_steps
    for r in model['rows']:
        assert r['cache_size'] in (None, 1)
        assert r['step_ms'] > 0 and r['x_sgd'] > 0 and r['optimizer_ms'] > 0
    assert rows['sgd']['x_sgd'] == 1.0 and rows[harness.CONTRIB_SAM]['x_peer'] == 1.0
    # Optimiser state: momentum for all; SAM, ASAM and optax's SAM add no params-sized
    # buffer, VaSSO exactly one (a few scalars aside).
    for name in ('sam', 'asam', harness.CONTRIB_SAM):
        assert rows[name]['extra_buffers'] == pytest.approx(0.0, abs=0.01)
    assert rows['vasso']['extra_buffers'] == pytest.approx(1.0, abs=0.01)
    assert model['augment_images_per_s'] > 0 and model['peak_rss_mib'] > 0
    # The profile of the lax.cond path sees the convolutions inside the branch.
    assert sum(every_k[0]['conv_dim_labels']['control_flow'].values()) > 0
    assert not every_k[1]['conv_dim_labels']['control_flow']


def test_write_section_creates_appends_and_replaces(tmp_path):
    path = str(tmp_path / 'B.md')
    run.write_section(path, 'one')
    assert open(path).read() == f'# Benchmarks\n\n{run.BEGIN}\none\n{run.END}\n'
    run.write_section(path, 'two', begin='<a>', end='</a>')
    run.write_section(path, 'three')
    text = open(path).read()
    assert 'one' not in text and 'three' in text and '<a>\ntwo\n</a>' in text


def test_make_plans_rejects_rounds_that_mix_cycles():
    with pytest.raises(SystemExit, match='multiple of every_k'):
        run.make_plans(run.parse_args(['--steps_per_round', '4', '--every_k', '2,5']))
    plans = run.make_plans(run.parse_args([]))
    assert [p.spec.name for p in plans] == ['resnet18', 'wrn16_4']
    assert plans[0].total_steps == 50 and plans[0].every_k == (2, 5, 10)
    assert plans[0].spec.kwargs == {'width': 16} and not plans[1].every_k


def test_compile_counter_counts_each_compilation_once():
    def train_step(x):
        return x * 2

    fn = jax.jit(train_step)
    with measure.CompileCounter() as counter:
        for _ in range(3):
            fn(jnp.ones(3))
        fn(jnp.ones(4))  # a new shape: a second compilation
        jax.jit(lambda x: x + 1)(1.0)  # not a train step: not counted
    assert counter.count == 2


def test_conv_dim_labels_finds_the_non_canonical_convolutions_in_cond():
    x, w = jnp.ones((2, 4, 4, 2)), jnp.ones((3, 3, 2, 2))

    def loss(w):
        return jnp.sum(
            jax.lax.conv_general_dilated(
                x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
            )
        )

    text = (
        jax.jit(lambda p: jax.lax.cond(p, jax.grad(loss), lambda w: w, w))
        .lower(True)
        .compile()
        .as_text()
    )
    labels = measure.conv_dim_labels(text)
    assert not labels['straight']
    assert set(labels['control_flow']) - {measure.CANONICAL_CONV}


def test_contrib_sam_adapter_matches_vasso_jax_sam():
    """optax.contrib.sam (opaque) through the adapter is SAM with the same base optimiser."""
    loss = lambda w: jnp.sum(jnp.sin(w) * w**2)
    w = jnp.array([0.3, -1.2, 2.0])
    ours = optax.chain(vasso_jax.sam(0.05), optax.sgd(0.1, momentum=0.9))
    peer = harness.contrib_sam(optax.sgd(0.1, momentum=0.9), 0.05)
    a, b = w, w
    sa, sb = ours.init(w), peer.init(w)
    for _ in range(3):
        ua, sa = ours.update(jax.grad(loss)(a), sa, a, grad_fn=jax.grad(loss))
        ub, sb = peer.update(jax.grad(loss)(b), sb, b, grad_fn=jax.grad(loss))
        a, b = optax.apply_updates(a, ua), optax.apply_updates(b, ub)
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_every_k_in_the_trainer_step():
    """Trainer level: an on-step is full VaSSO's step, an off-step the base optimiser's step
    exactly, VaSSO's direction updates on every step, and host dispatch (two executables,
    the second with rho = 0) equals the library's lax.cond."""
    sgd, cond, host = tiny_variants([('sgd', 1), ('vasso', 2, 'cond'), ('vasso', 2, 'host')])
    # Step 0 (two-pass). Host dispatch's first executable is plain VaSSO (every_k = 1).
    cond.run(1)
    host.run(1)
    for a, b in zip(jax.tree.leaves(cond.state), jax.tree.leaves(host.state)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    d0 = jax.tree.map(jnp.copy, cond.state.opt_state[0].direction_state.d)
    before = copy_state(cond)
    # Step 1 (one-pass), and the same state and batch through the base optimiser alone
    # (the chain minus the link).
    sgd.state = before.replace(opt_state=before.opt_state[1:])
    cond.run(1)
    sgd.run(1)
    for a, b in zip(jax.tree.leaves(cond.state.params), jax.tree.leaves(sgd.state.params)):
        np.testing.assert_array_equal(a, b)
    link = cond.state.opt_state[0]
    assert int(link.count) == 2 and int(link.direction_state.count) == 2
    moved = [
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(d0), jax.tree.leaves(link.direction_state.d))
    ]
    assert all(moved)  # d = (1 - theta) d + theta g on the off-step too
    host.run(3)
    cond.run(2)
    for a, b in zip(jax.tree.leaves(cond.state), jax.tree.leaves(host.state)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert len(host.step_fns) == 2


def test_every_k_accuracy_study_tiny(tmp_path, monkeypatch):
    demo_config = demo.demo_config

    def tiny(*args, **kwargs):  # the demo's recipe on the tiny MLP for 2 steps
        config = demo_config(*args, **kwargs)
        config.model, config.model_kwargs = tiny_model.PATH, {}
        config.num_train_steps = 2
        return config

    monkeypatch.setattr(demo, 'demo_config', tiny)
    out = tmp_path / 'B.md'
    results = every_k_accuracy.main(
        [
            '--workdir',
            str(tmp_path / 'runs'),
            '--ks',
            '2',
            '--methods',
            'vasso',
            '--seeds',
            '0',
            '--num_epochs',
            '1',
            '--no_sgd',
            '--output',
            str(out),
        ]
    )
    assert list(results) == [('vasso', 2)]
    text = out.read_text()
    assert every_k_accuracy.BEGIN in text and '| vasso | 2 | 1 |' in text


def test_every_k_accuracy_table_mean_and_spread():
    summaries = [
        {'final_test_accuracy': a, 'best_test_accuracy': a, 'wall_time_s': 10.0} for a in (0.5, 0.7)
    ]
    table = every_k_accuracy.format_table({('sam', 5): summaries})
    assert '| sam | 5 | 2 | 60.0 ± 14.1 | 60.0 ± 14.1 | n/a | n/a | 10 |' in table


def test_report_targets_flag_misses():
    row = lambda name, **kw: {
        'variant': name,
        'x_sgd': 1.0,
        'x_peer': 1.0,
        'extra_buffers': 0.0,
        'compilations': 1,
        'executables': 1,
        **kw,
    }
    model = {
        'label': 'm',
        'plan': run.Plan(TINY, 1, 1, 10),
        'augment_x_sgd_step': 5.0,
        'rows': [row('sgd'), row('sam'), row('vasso', x_sgd=2.5, extra_buffers=1.0)],
    }
    met = {t: ok for t, _, ok in report.targets({'models': [model]})}
    assert met == {
        'm: VaSSO step <= 2.02x SGD': False,
        'm: VaSSO step <= 1.00x optax.contrib.sam': True,
        'm: SAM state adds no params-sized buffer, VaSSO exactly one': True,
        'm: one compilation of each train step': True,
        'm: augmentation >= 10x the train step': False,
    }


@pytest.mark.slow
def test_gpu_script_cpu_path_at_tiny_size(tmp_path):
    out = tmp_path / 'B.md'
    env = {**os.environ, 'PYTHON': sys.executable, 'JAX_PLATFORMS': 'cpu'}
    proc = subprocess.run(
        [os.path.join(ROOT, 'experiments', 'benchmarks', 'gpu.sh'), '--tiny', '--output', str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for dtype in ('float32', 'bfloat16'):
        for optimizer in ('sgd', 'sam', 'vasso'):
            assert f'| {harness.TINY.label} | {dtype} | {optimizer} |' in proc.stdout
    assert 'gpu.sh --tiny' in out.read_text()


def test_tree_bytes():
    state = {'a': jnp.zeros((2, 3), jnp.float32), 'b': jnp.zeros(4, jnp.bfloat16)}
    assert harness.tree_bytes(state) == 2 * 3 * 4 + 4 * 2


@pytest.mark.slow
def test_trainer_cost_tiny_counts_one_compilation_per_executable(tmp_path):
    """The every_k (host dispatch) and one-pass rows: FLOPs, buffers, compilations."""
    from experiments.benchmarks import trainer_cost

    path = tmp_path / 'BENCHMARKS.md'
    path.write_text('# Benchmarks\n\nkept\n')
    results = trainer_cost.main(['--tiny', '--rounds', '1', '--output', str(path)])
    rows = {r['variant']: r for r in results['rows']}
    assert all(r['compilations'] == r['executables'] for r in rows.values())
    assert rows['vasso k=5 (host dispatch)']['executables'] == 2
    assert rows['one_pass_vasso']['executables'] == 1
    # XLA's FLOPs: one-pass ~ SGD, two-pass ~ 2x, host dispatch in between, falling with k.
    flops = [rows[f'vasso k={k} (host dispatch)']['flops_x_sgd'] for k in (2, 5, 10)]
    assert rows['vasso']['flops_x_sgd'] > flops[0] > flops[1] > flops[2] > 1.0
    assert abs(rows['one_pass_vasso']['flops_x_sgd'] - 1.0) < 0.1
    for name in ('one_pass_vasso', 'one_pass_momentum_sam', 'vasso k=5 (host dispatch)'):
        assert 0 <= rows[name]['extra_bytes'] - rows[name]['params_bytes'] <= 64, name
    text = path.read_text()
    assert 'kept' in text and trainer_cost.BEGIN in text and '| one_pass_vasso |' in text


def test_hessian_loop_tiny_times_both_ways_to_the_same_eigenvalue(capsys):
    rows = hessian_loop.main(['--tiny', '--num_iters', '2', '--rounds', '1',
                              '--num_examples', '8'])
    loop, unrolled = rows['while_loop (default)'], rows['unroll=True']
    np.testing.assert_allclose(loop['value'], unrolled['value'], rtol=1e-5)
    assert unrolled['x_unrolled'] == 1.0 and loop['median_s'] > 0
    assert '| unroll=True |' in capsys.readouterr().out
