"""Tests of the trainer: end-to-end runs under TFDS mock data, BatchNorm policy, resume, CLI."""

import glob
import importlib
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import vasso_jax
from experiments.configs import cifar10_resnet18, cifar10_wrn28_10, default
from experiments.image_classification import models, steps, task
from experiments.image_classification.data import augment
from experiments.runtime import checkpointing, errors, loop, metrics, optimizers
from tests.experiments import tiny_model
from tests.experiments.conftest import run_cli

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_NAMES = ('default', 'cifar10_resnet18', 'cifar100_resnet18', 'cifar10_wrn28_10',
                'cifar100_wrn28_10', 'cifar10_pyramidnet110', 'cifar100_pyramidnet110',
                'digits_resnet')
CONTRACT_KEYS = ('optimizer', 'rho', 'theta', 'model', 'dataset', 'data_dir', 'num_epochs',
                 'num_train_steps', 'batch_size', 'learning_rate', 'weight_decay',
                 'label_smoothing', 'label_noise', 'seed', 'checkpoint_every_steps',
                 'log_every_steps')
SUMMARY_KEYS = ('final_test_accuracy', 'best_test_accuracy', 'final_train_loss', 'steps',
                'wall_time_s', 'params_checksum')


def tiny_config(model='resnet18', optimizer='vasso', **overrides):
    """A CIFAR config shrunk to a few steps of a tiny network (mock data has 40 examples).

    ``model``: ``'resnet18'`` (width 4), ``'wrn'`` (WRN-10-1), or ``'mlp'``: the tests'
    BatchNorm MLP (``tiny_model``), for tests of the run machinery rather than of a network.
    """
    if model == 'resnet18':
        config = cifar10_resnet18.get_config()
        config.model_kwargs.width = 4
    elif model == 'mlp':
        config = cifar10_resnet18.get_config()
        config.model, config.model_kwargs = tiny_model.PATH, ml_collections.ConfigDict()
    else:  # WRN-10-1: the WRN-28-10 recipe on the generic WRN
        config = cifar10_wrn28_10.get_config()
        config.model = 'wrn'
        config.model_kwargs.depth = 10
        config.model_kwargs.widen_factor = 1
    config.optimizer = optimizer
    config.batch_size = 8
    config.eval_batch_size = 16  # 40 test examples: the last batch is padded
    config.num_train_steps = 4
    config.log_every_steps = 2
    config.eval_every_steps = 2
    config.checkpoint_every_steps = 2
    config.progress_bar = False
    config.update(overrides)
    return config


def digits_config(optimizer='vasso', net='wrn', **overrides):
    """The smallest fast run: WRN-10-1 (or another ``tiny_config`` net) on the offline digits,
    no TFDS involved."""
    config = tiny_config(net, optimizer, dataset='digits', crop_padding=1, cutout_size=4,
                         label_noise=0.4)
    config.update(overrides)
    return config


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize('name', CONFIG_NAMES)
def test_config_files_hold_the_contract_keys(name):
    config = importlib.import_module(f'experiments.configs.{name}').get_config()
    for key in CONTRACT_KEYS:
        assert key in config, key
    task.validate_config(config)
    models.get_model(config.model, 10, **task.model_kwargs(config))  # the kwargs fit


def test_paper_defaults():
    config = default.get_config()
    assert (config.num_epochs, config.batch_size, config.momentum) == (200, 128, 0.9)
    assert config.lr_schedule == 'cosine'
    wrn100 = importlib.import_module('experiments.configs.cifar100_wrn28_10').get_config()
    assert (wrn100.learning_rate, wrn100.weight_decay, wrn100.rho, wrn100.theta) == (
        0.1, 1e-3, 0.2, 0.9)


def test_bad_config_is_one_line():
    with pytest.raises(errors.ConfigError, match=r'--config.optimizer=.*sgd, .*sam, vasso'):
        task.validate_config(tiny_config(optimizer='adam'))
    task.validate_config(tiny_config(optimizer='asam', eta=0.0))  # as the library accepts


def test_optimizer_is_the_public_chain():
    """make_optimizer builds exactly what a user writes with the public API."""
    config = tiny_config(optimizer='vasso', rho=0.3, theta=0.5, weight_decay=0.01)
    tx = optimizers.make_optimizer(config, 0.1)
    by_hand = optax.chain(vasso_jax.vasso(0.3, 0.5), optax.add_decayed_weights(0.01),
                          optax.sgd(0.1, momentum=0.9))
    grad_fn = jax.grad(lambda p: jnp.sum(jnp.sin(p['w']) * p['w'] ** 2))
    params = {'w': jnp.array([1.0, -2.0, 0.5])}
    got_state, want_state = tx.init(params), by_hand.init(params)
    for _ in range(3):
        got, got_state = tx.update(grad_fn(params), got_state, params, grad_fn=grad_fn)
        want, want_state = by_hand.update(grad_fn(params), want_state, params, grad_fn=grad_fn)
        np.testing.assert_array_equal(got['w'], want['w'])
        params = optax.apply_updates(params, got)
    assert optimizers.link_diagnostics(got_state) == optimizers.LINK_DIAGNOSTICS
    sgd_state = optimizers.make_optimizer(tiny_config(optimizer='sgd'), 0.1).init(params)
    assert optimizers.link_diagnostics(sgd_state) == ()
    adamw = optimizers.make_optimizer(tiny_config(optimizer='sam', base_optimizer='adamw'), 0.1)
    updates, _ = adamw.update(grad_fn(params), adamw.init(params), params, grad_fn=grad_fn)
    assert np.all(np.isfinite(updates['w']))


def test_schedule_is_cosine_to_zero():
    config = tiny_config(learning_rate=0.1)
    schedule = optimizers.make_schedule(config, 100, 10)
    assert float(schedule(0)) == pytest.approx(0.1)
    assert float(schedule(50)) == pytest.approx(0.05)
    assert float(schedule(100)) == pytest.approx(0.0, abs=1e-8)
    warm = optimizers.make_schedule(tiny_config(learning_rate=0.1, warmup_epochs=1), 100, 10)
    assert float(warm(5)) == pytest.approx(0.05)


# --------------------------------------------------------------------------- pure functions


def test_data_order_is_a_function_of_seed_and_epoch():
    _, data_key, _ = steps.split_keys(0)
    first = steps.epoch_permutation(data_key, 3, 2, 25)
    np.testing.assert_array_equal(first, steps.epoch_permutation(data_key, 3, 2, 25))
    assert first.shape == (2, 25)
    for row in np.asarray(first):  # one permutation per data shard
        assert sorted(row.tolist()) == list(range(25))
    assert not np.array_equal(first[0], first[1])
    assert not np.array_equal(first, steps.epoch_permutation(data_key, 4, 2, 25))


def test_shard_layouts_cover_each_example_once():
    np.testing.assert_array_equal(steps.shard_rows(7, 3), [[0, 3], [1, 4], [2, 5]])
    rows, mask = steps.eval_rows(7, 3)
    np.testing.assert_array_equal(rows, [[0, 3, 6], [1, 4, 0], [2, 5, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [1, 1, 0], [1, 1, 0]])
    assert sorted(rows[mask == 1].tolist()) == list(range(7))


@pytest.mark.parametrize('num_shards, batch_size', [(1, 4), (3, 4), (3, 100), (2, 3)])
def test_eval_counts_every_example_once(num_shards, batch_size):
    """The sums over the sharded split equal a NumPy reference over the plain split."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 1, 1, 2), dtype=np.uint8)
    labels = np.arange(10) % 3
    true_labels = (labels + (np.arange(10) % 4 == 0)) % 3
    rows, mask = steps.eval_rows(10, num_shards)
    split = steps.EvalSplit(images[rows], labels[rows], true_labels[rows], mask)

    class Linear(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            return nn.Dense(3)(x.reshape(len(x), -1))

    model = Linear()
    params = model.init(jax.random.key(0), jnp.zeros((1, 1, 1, 2)), train=False)['params']
    eval_step = steps.make_eval_step(model, lambda x: x / 255.0, 3)
    sums = jax.device_get(steps.evaluate(eval_step, params, {}, split, batch_size))

    kernel, bias = (np.asarray(params['Dense_0'][k], np.float64) for k in ('kernel', 'bias'))
    logits = images.reshape(10, -1) / 255.0 @ kernel + bias
    log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    assert sums['count'] == 10.0
    np.testing.assert_allclose(sums['loss'], -log_probs[np.arange(10), labels].sum(), rtol=1e-5)
    assert sums['correct'] == np.sum(logits.argmax(1) == labels)
    assert sums['correct_true'] == np.sum(logits.argmax(1) == true_labels)


def test_params_checksum_sees_every_bit():
    params = {'a': jnp.zeros(3), 'b': {'c': jnp.ones((2, 2))}}
    same = {'a': jnp.zeros(3), 'b': {'c': jnp.ones((2, 2))}}
    assert loop.params_checksum(params) == loop.params_checksum(same)
    flipped = {'a': jnp.zeros(3).at[1].set(np.float32(1e-45)), 'b': same['b']}
    assert loop.params_checksum(params) != loop.params_checksum(flipped)


def test_batchnorm_statistics_come_from_pass_one_only():
    """After a SAM step the running statistics are pass 1's, not the perturbed pass's."""
    images = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 1), dtype=np.uint8)
    labels = np.arange(16, dtype=np.int32) % 10
    model = tiny_model.MLP(num_classes=10)  # BatchNorm after a dense layer
    config = tiny_config(optimizer='sam', rho=2.0)  # a big radius: the passes differ clearly
    tx = optimizers.make_optimizer(config, 0.1)
    init_key, data_key, augment_key = steps.split_keys(0)
    state = steps.create_train_state(model, tx, image_shape=(8, 8, 1), init_key=init_key,
                                       augment_key=augment_key)

    def augment_fn(key, x):
        return augment.augment(key, x, mean=0.5, std=0.25, crop_padding=1, flip=True,
                               cutout_size=0, cutout_prob=0.0)

    step = jax.jit(steps.make_train_step(
        model, tx, augment_fn, num_classes=10, batch_size=8, epoch_steps=2,
        diagnostics=optimizers.link_diagnostics(state.opt_state)))
    data = steps.shard_split(images, labels, labels, 1)
    perm = steps.epoch_permutation(data_key, 0, 1, 16)
    new_state, _ = step(state, steps.zero_metrics(optimizers.LINK_DIAGNOSTICS), data, perm)

    # Pass 1 alone, on the same batch with the same keys.
    x, y, _ = steps.get_batch(state.step, perm, data, batch_size=8, epoch_steps=2)
    augment_key, dropout_key = jax.random.split(jax.random.fold_in(state.rng, state.step))
    x = augment_fn(augment_key, x)
    loss_fn = steps.make_loss_fn(model, 10)

    @jax.jit
    def reference_statistics(params):
        grads, (_, pass1) = jax.grad(loss_fn, has_aux=True)(params, state.batch_stats, x, y,
                                                            dropout_key)
        # Pass 2 at SAM's perturbed point w + rho * g / |g|.
        scale = config.rho / optax.tree.norm(grads)
        perturbed = jax.tree.map(lambda w, g: w + scale * g, params, grads)
        return pass1, loss_fn(perturbed, state.batch_stats, x, y, dropout_key)[1][1]

    pass1_stats, pass2_stats = reference_statistics(state.params)

    got, want, other = (jax.tree.leaves(t) for t in (new_state.batch_stats, pass1_stats,
                                                      pass2_stats))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    gap = max(float(jnp.max(jnp.abs(g - o))) for g, o in zip(got, other, strict=True))
    assert gap > 1e-3  # pass 2's statistics really are different, and were dropped


# --------------------------------------------------------------------------- end to end


def check_workdir(workdir, summary, config):
    with open(os.path.join(workdir, 'summary.json')) as f:
        assert json.load(f) == summary
    for key in SUMMARY_KEYS:
        assert summary[key] is not None, key
    assert summary['steps'] == config.num_train_steps and summary['completed']
    assert 0.0 <= summary['final_test_accuracy'] <= summary['best_test_accuracy'] <= 1.0
    assert np.isfinite(summary['final_train_loss'])
    assert len(summary['params_checksum']) == 64
    with open(os.path.join(workdir, 'config.json')) as f:
        assert json.load(f)['optimizer'] == config.optimizer
    assert glob.glob(os.path.join(workdir, 'tensorboard', 'events.out.tfevents.*'))
    history = metrics.read_history(workdir)
    train = [r for r in history if 'train_loss' in r]
    evals = [r for r in history if 'test_accuracy' in r]
    assert [r['step'] for r in train] == [2, 4]
    assert [r['step'] for r in evals] == [2, 4]
    assert summary['final_test_accuracy'] == evals[-1]['test_accuracy']
    return train


@pytest.mark.slow
@pytest.mark.parametrize('model, optimizer', [  # each optimiser once, each model at least once
    ('wrn', 'sgd'), ('resnet18', 'sam'), ('wrn', 'vasso'), ('wrn', 'asam')])
def test_end_to_end_under_mock_data(mock_tfds, tmp_path, model, optimizer):
    config = tiny_config(model, optimizer)
    summary = task.train_and_evaluate(config, str(tmp_path))
    train = check_workdir(str(tmp_path), summary, config)
    assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2', '4']
    for record in train:
        assert np.isfinite(record['grad_norm'])
        if optimizer == 'sgd':
            assert 'cosine' not in record
        else:
            assert -1.0 <= record['cosine'] <= 1.0 + 1e-5 and record['direction_norm'] > 0
        if optimizer == 'sam':
            assert record['cosine'] == pytest.approx(1.0, abs=1e-4)


@pytest.mark.slow
def test_same_seed_same_checksum_and_resume_is_bitwise(tmp_path):
    """Same config twice gives the same params; N steps straight == N/2, stop, resume to N.

    VaSSO, so that its direction ``d`` (and the momentum, counters, BatchNorm statistics and
    RNG key) must come back from the checkpoint exactly.
    """
    config = digits_config('vasso', 'mlp', num_train_steps=6, log_every_steps=1,
                           eval_every_steps=2, checkpoint_every_steps=3)
    straight_dir, resumed_dir = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
    straight = task.train_and_evaluate(config, straight_dir)
    half = task.train_and_evaluate(config, resumed_dir, stop_at_step=3)
    assert half['steps'] == 3 and not half['completed']
    # The same config and seed, run twice, reach bit-identical params at step 3.
    manager = checkpointing.make_manager(straight_dir, keep=2)
    at_3 = manager.restore(3, args=ocp.args.StandardRestore())
    manager.close()
    assert loop.params_checksum(at_3['params']) == half['params_checksum']

    resumed = task.train_and_evaluate(config, resumed_dir)
    assert resumed['steps'] == 6 and resumed['completed']
    assert resumed['params_checksum'] == straight['params_checksum']
    for key in ('final_test_accuracy', 'best_test_accuracy', 'final_train_loss'):
        assert resumed[key] == straight[key], key

    def history(workdir):
        return [{k: v for k, v in r.items() if k not in ('elapsed_s', 'images_per_sec')}
                for r in metrics.read_history(workdir)]

    assert history(resumed_dir) == history(straight_dir)
    # A finished workdir is not trained again: the summary is rebuilt from the history.
    again = task.train_and_evaluate(config, resumed_dir)
    assert again['params_checksum'] == straight['params_checksum']
    assert again['best_test_accuracy'] == straight['best_test_accuracy']


def test_a_checkpoint_of_another_optimizer_is_a_clear_error(tmp_path):
    task.train_and_evaluate(digits_config('sgd', 'mlp', num_train_steps=1), str(tmp_path))
    vasso = digits_config('vasso', 'mlp', num_train_steps=1)
    with pytest.raises(ValueError, match=r"optimizer: 'sgd' -> 'vasso'.*--allow_config_change"):
        task.train_and_evaluate(vasso, str(tmp_path))  # refused: another config
    with pytest.raises(checkpointing.CheckpointMismatchError, match='pass a new --workdir'):
        task.train_and_evaluate(vasso, str(tmp_path), allow_config_change=True)
    with open(tmp_path / 'config.json') as f:
        assert json.load(f)['optimizer'] == 'sgd'  # the workdir still describes its run


def test_resume_drops_history_written_after_the_checkpoint(tmp_path):
    writer = metrics.MetricWriter(str(tmp_path))
    for step in (1, 2, 3):
        writer.write(step, {'train_loss': float(step)})
    writer.close()
    writer = metrics.MetricWriter(str(tmp_path), start_step=2)
    writer.close()
    assert [r['step'] for r in metrics.read_history(str(tmp_path))] == [1, 2]


def test_a_crash_while_resuming_keeps_the_metrics(tmp_path, monkeypatch):
    writer = metrics.MetricWriter(str(tmp_path))
    for step in (1, 2, 3):
        writer.write(step, {'train_loss': float(step)})
    writer.close()
    before = (tmp_path / 'metrics.jsonl').read_text()
    real_dumps = json.dumps
    calls = []

    def dumps_then_crash(record, *args, **kwargs):  # dies half-way through the rewrite
        calls.append(record)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_dumps(record, *args, **kwargs)

    monkeypatch.setattr(metrics.json, 'dumps', dumps_then_crash)
    with pytest.raises(KeyboardInterrupt):
        metrics.MetricWriter(str(tmp_path), start_step=3)
    assert (tmp_path / 'metrics.jsonl').read_text() == before


# --------------------------------------------------------------------------- the CLI

@pytest.mark.slow
def test_cli_trains_under_mock_data(tmp_path):
    # The documented command; only the network's width is cut (64 -> 8) to keep CPU time low.
    result = run_cli(['--config', 'experiments/configs/cifar10_resnet18.py',
                      '--workdir', str(tmp_path), '--config.num_train_steps=2',
                      '--config.model_kwargs.width=8'], mock_examples=128)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / 'summary.json') as f:
        summary = json.load(f)
    assert summary['steps'] == 2 and summary['optimizer'] == 'vasso'
    assert 'params_checksum' in result.stdout and 'best_test_accuracy' in result.stdout
    assert metrics.read_history(str(tmp_path))


def test_cli_offline_prints_one_line_and_exits_2(tmp_path):
    result = run_cli(['--config', 'experiments/configs/cifar10_resnet18.py',
                      '--workdir', str(tmp_path / 'run'), '--config.num_train_steps=2'],
                     env={'TFDS_DATA_DIR': str(tmp_path / 'empty')})
    assert result.returncode == 2
    assert 'Traceback' not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and '--config.data_dir' in lines[0], result.stderr


def test_cli_rejects_a_bad_value_in_one_line(tmp_path):
    result = run_cli(['--config', 'experiments/configs/digits_resnet.py',
                      '--workdir', str(tmp_path), '--config.optimizer=adam'])
    assert result.returncode == 2
    links = ', '.join(optimizers.link_factories())
    assert result.stderr.strip().splitlines() == [
        f"error: --config.optimizer='adam' is not one of sgd, {links}."]




def test_a_run_collapsed_to_the_constant_predictor_is_named_with_its_fix(tmp_path, caplog):
    config = digits_config('sam', 'mlp', num_train_steps=4, log_every_steps=1, rho=0.5)
    config.model = tiny_model.CONSTANT_PATH  # loss ln 10 whatever it does
    with caplog.at_level('WARNING'):
        summary = task.train_and_evaluate(config, str(tmp_path))
    warnings = [r.getMessage() for r in caplog.records if 'constant predictor' in r.getMessage()]
    assert len(warnings) == 1, warnings  # once, after 3 collapsed logs in a row
    assert 'ln(10) = 2.303 for 3 logs' in warnings[0]
    assert '--config.rho (now 0.5) or --config.learning_rate' in warnings[0]
    assert summary['completed']  # a warning, not a failure: the run is a finding too
