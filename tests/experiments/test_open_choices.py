"""Open choices: any vasso_jax link, any optax alias, a user's model by import path, and the
skip-non-finite mode, each training a few steps."""

import math
import os
import re
import shlex

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import vasso_jax
from experiments.image_classification import task
from experiments.runtime import errors, optimizers
from tests.experiments.conftest import REPO, run_cli
from tests.experiments.test_train import digits_config


def short(optimizer='vasso', **overrides):
    settings = dict(num_train_steps=2, log_every_steps=1, eval_every_steps=2,
                    checkpoint_every_steps=2)
    return digits_config(optimizer, 'mlp', **{**settings, **overrides})


def test_every_public_link_factory_is_a_choice():
    assert {'sam', 'vasso', 'asam', 'friendly_sam'} <= set(optimizers.link_factories())
    assert 'sharpness_aware' not in optimizers.link_factories()  # needs a direction


def test_friendly_sam_with_kwargs_is_the_library_chain():
    config = short('friendly_sam', optimizer_kwargs={'sigma': 0.5, 'lmbda': 0.6}, rho=0.2)
    tx = optimizers.make_optimizer(config, 0.1)
    by_hand = optax.chain(vasso_jax.friendly_sam(0.2, 0.5, 0.6),
                          optax.add_decayed_weights(config.weight_decay),
                          optax.sgd(0.1, momentum=0.9))
    params = {'w': jnp.array([1.0, -2.0, 0.5])}
    grad_fn = lambda p: {'w': jnp.cos(p['w']) + p['w']}
    got_state, want_state = tx.init(params), by_hand.init(params)
    for _ in range(3):
        got, got_state = tx.update(grad_fn(params), got_state, params, grad_fn=grad_fn)
        want, want_state = by_hand.update(grad_fn(params), want_state, params, grad_fn=grad_fn)
        np.testing.assert_array_equal(got['w'], want['w'])
        params = optax.apply_updates(params, got)


def test_lion_takes_its_kwargs_and_the_weight_decay():
    config = short('sam', base_optimizer='lion', base_optimizer_kwargs={'b1': 0.95})
    tx = optimizers.make_optimizer(config, 1e-3)
    by_hand = optax.chain(vasso_jax.sam(config.rho), optax.lion(1e-3, b1=0.95,
                                                                weight_decay=config.weight_decay))
    params = {'w': jnp.array([1.0, -2.0, 0.5])}
    grad_fn = lambda p: {'w': 2 * p['w']}
    got, _ = tx.update(grad_fn(params), tx.init(params), params, grad_fn=grad_fn)
    want, _ = by_hand.update(grad_fn(params), by_hand.init(params), params, grad_fn=grad_fn)
    np.testing.assert_array_equal(got['w'], want['w'])


@pytest.mark.slow
@pytest.mark.parametrize('overrides', [
    {'optimizer': 'friendly_sam', 'optimizer_kwargs': {'sigma': 0.5, 'lmbda': 0.6}},
    {'optimizer': 'vasso', 'base_optimizer': 'lion', 'learning_rate': 1e-3,
     'base_optimizer_kwargs': {'b1': 0.95, 'b2': 0.98}},
], ids=['friendly_sam', 'lion'])
@pytest.mark.slow
def test_open_choices_train(overrides, tmp_path):
    config = short(**overrides)
    summary = task.train_and_evaluate(config, str(tmp_path))
    assert summary['completed'] and summary['optimizer'] == config.optimizer
    assert math.isfinite(summary['final_train_loss'])


def test_a_bad_import_path_is_one_line():
    with pytest.raises(errors.ConfigError, match=r"^--config.model='no_such_pkg.nets:Net': "
                       r"cannot import 'no_such_pkg.nets'"):
        task.validate_config(short(model='no_such_pkg.nets:Net'))


def _readme_example():
    with open(os.path.join(REPO, 'experiments', 'README.md')) as f:
        text = f.read()
    module = re.search(r'```python\n(# my_nets\.py\n.*?)```', text, re.DOTALL).group(1)
    command = re.search(r'```bash\n(PYTHONPATH=.*?)```', text, re.DOTALL).group(1)
    args = shlex.split(command.replace('\\\n', ' '))
    return module, args[args.index('experiments.train') + 1:]


@pytest.mark.slow
def test_the_readme_user_model_trains_by_import_path(tmp_path):
    module, args = _readme_example()
    (tmp_path / 'my_nets.py').write_text(module)
    workdir = str(tmp_path / 'mlp')
    args = [a for a in args if not a.startswith('runs/')]
    args[args.index('--workdir') + 1:args.index('--workdir') + 1] = [workdir]
    result = run_cli([*args, '--config.progress_bar=False'],
                     env={'PYTHONPATH': f'{REPO}{os.pathsep}{tmp_path}'})
    assert result.returncode == 0, result.stderr
    with open(os.path.join(workdir, 'config.json')) as f:
        assert '"model": "my_nets:MLP"' in f.read()
    assert 'final_test_accuracy' in result.stdout


@pytest.mark.slow
def test_skip_nonfinite_drops_the_steps_counts_them_and_continues(tmp_path, monkeypatch):
    make_schedule = optimizers.make_schedule

    def poisoned(*args, **kwargs):  # the update with optax count 1 (step 2) is NaN
        schedule = make_schedule(*args, **kwargs)
        return lambda count: jnp.where(count == 1, jnp.nan, schedule(count))

    # SGD: one pass compiles fastest, and the skip is the same for every optimiser.
    clean = task.train_and_evaluate(short('sgd', num_train_steps=3, log_every_steps=3),
                                    str(tmp_path / 'clean'), stop_at_step=1)
    monkeypatch.setattr(optimizers, 'make_schedule', poisoned)
    config = short('sgd', num_train_steps=3, log_every_steps=3, skip_nonfinite=True)
    summary = task.train_and_evaluate(config, str(tmp_path / 'skip'))
    # Dropped steps leave the state as it was (optax's count too, so here every later update
    # is NaN again): the params stay those after step 1, bit for bit.
    assert summary['completed'] and summary['skipped_steps'] == 2
    assert summary['params_checksum'] == clean['params_checksum']


@pytest.mark.slow
def test_a_dataset_by_import_path_trains(tmp_path):
    """The digits loader given as an import path is the built-in 'digits', bit for bit."""
    path = 'experiments.image_classification.data.digits:load_digits'
    by_path = task.train_and_evaluate(short(dataset=path), str(tmp_path / 'path'))
    by_name = task.train_and_evaluate(short(), str(tmp_path / 'name'))
    assert by_path['dataset'] == path and by_path['completed']
    assert by_path['params_checksum'] == by_name['params_checksum']
