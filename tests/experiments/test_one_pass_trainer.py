"""The trainer's every_k by host dispatch and its one-pass links (issue 14, trainer half)."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import vasso_jax
from experiments.image_classification import steps, task
from experiments.runtime import checkpointing, errors, loop, metrics, optimizers
from tests.experiments import tiny_model
from tests.experiments.test_train import digits_config

COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'


def mlp_config(optimizer, **overrides):
    settings = dict(num_train_steps=5, log_every_steps=1, eval_every_steps=5,
                    checkpoint_every_steps=5)
    return digits_config(optimizer, 'mlp', **{**settings, **overrides})


# ------------------------------------------------------------------ the optax chains

def test_one_pass_links_are_choices_that_wrap_the_base():
    assert {'one_pass_vasso', 'one_pass_momentum_sam'} <= set(optimizers.link_factories())
    assert 'one_pass' not in optimizers.link_factories()  # needs a direction function
    config = mlp_config('one_pass_vasso', rho=0.2, theta=0.3, optimizer_kwargs={'eps': 1e-6})
    tx = optimizers.make_optimizer(config, 0.1)
    base = optax.chain(optax.add_decayed_weights(config.weight_decay),
                       optax.sgd(0.1, momentum=0.9))
    by_hand = vasso_jax.one_pass_vasso(base, rho=0.2, theta=0.3, eps=1e-6)
    params = {'w': jnp.array([1.0, -2.0, 0.5])}
    got_state, want_state = tx.init(params), by_hand.init(params)
    for _ in range(3):
        grads = {'w': jnp.cos(params['w']) + params['w']}
        got, got_state = tx.update(grads, got_state, params)  # no grad_fn
        want, want_state = by_hand.update(grads, want_state, params)
        np.testing.assert_array_equal(got['w'], want['w'])
        params = optax.apply_updates(params, got)
    assert optimizers.holds_one_pass(got_state)
    assert not optimizers.holds_one_pass(optimizers.make_optimizer(mlp_config('vasso'), 0.1)
                                         .init(params))


@pytest.mark.parametrize('overrides, flag', [
    (dict(every_k=2), 'every_k'), (dict(ascent_group_size=4), 'ascent_group_size'),
    (dict(log_stability=True), 'log_stability'),
    (dict(optimizer_kwargs={'base': 1}), 'base_optimizer'),
    (dict(rho=-1.0), 'rho'),
])
def test_one_pass_rejects_what_does_not_apply_in_one_line(overrides, flag):
    with pytest.raises(errors.ConfigError, match=flag) as raised:
        optimizers.make_optimizer(mlp_config('one_pass_momentum_sam', **overrides), 0.1)
    assert '\n' not in str(raised.value)


@pytest.mark.parametrize('optimizer', ['sam', 'vasso', 'asam', 'friendly_sam'])
def test_host_dispatch_chains_share_one_state_layout(optimizer):
    tx, plain = optimizers.make_optimizers(mlp_config(optimizer, every_k=5), 0.1)
    params = {'w': jnp.ones((3, 2)), 'b': jnp.zeros(2)}
    optimizers.check_same_state(tx, plain, params)  # raises if not
    assert optimizers.make_optimizers(mlp_config(optimizer), 0.1)[1] is None
    assert optimizers.make_optimizers(mlp_config('one_pass_vasso'), 0.1)[1] is None
    with pytest.raises(RuntimeError, match='state layout'):
        optimizers.check_same_state(tx, optimizers.make_optimizer(mlp_config('sgd'), 0.1),
                                    params)


def test_host_dispatch_refuses_stability_logging_in_one_line():
    with pytest.raises(errors.ConfigError, match='log_stability.*every_k=3'):
        task.validate_config(mlp_config('vasso', every_k=3, log_stability=True))


def test_which_steps_take_two_passes():
    two = lambda optimizer, **kw: [loop.takes_two_passes(mlp_config(optimizer, **kw), s)
                                   for s in range(7)]
    assert two('vasso', every_k=3) == [True, False, False, True, False, False, True]
    assert two('sam') == [True] * 7
    assert two('sgd', every_k=3) == two('one_pass_vasso') == two('vasso', rho=0.0) == [False] * 7


# ------------------------------------------------------------------ the train steps

def _tiny_run(optimizer, num_steps, *, host, **overrides):
    """``num_steps`` of the trainer's own train step on an MLP and random 4x4 images: with
    ``host``, the two executables of host dispatch; else the library's every_k (one)."""
    config = mlp_config(optimizer, batch_size=8, **overrides)
    model = tiny_model.MLP(num_classes=3)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (32, 4, 4, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, 32).astype(np.int32)
    data = jax.device_put(steps.shard_split(images, labels, labels, num_shards=1))
    schedule = optimizers.make_schedule(config, num_steps, 4)
    if host:
        tx, plain = optimizers.make_optimizers(config, schedule)
    else:
        tx, plain = optimizers.make_optimizer(config, schedule), None
    init_key, data_key, augment_key = steps.split_keys(0)
    state = steps.create_train_state(model, tx, image_shape=(4, 4, 3), init_key=init_key,
                                     augment_key=augment_key)
    augment_fn = lambda key, x: x.astype(jnp.float32) / 255.0
    diagnostics = optimizers.link_diagnostics(state.opt_state)
    make = lambda t: jax.jit(steps.make_train_step(
        model, t, augment_fn, num_classes=3, batch_size=8, epoch_steps=4,
        diagnostics=diagnostics, one_pass=optimizers.is_one_pass(config)))
    sharp = make(tx)
    off = sharp if plain is None else make(plain)
    perm = steps.epoch_permutation(data_key, 0, 1, 32)
    sums = steps.zero_metrics(diagnostics)
    for step in range(num_steps):
        fn = sharp if (not host or loop.takes_two_passes(config, step)) else off
        state, sums = fn(state, sums, data, perm)
    return state, (sharp, off), model


def test_host_dispatch_equals_the_lax_cond_every_k_and_compiles_once_each():
    host, (sharp, off), _ = _tiny_run('vasso', 4, host=True, every_k=3)
    cond, _, _ = _tiny_run('vasso', 4, host=False, every_k=3)
    # Bitwise on XLA:CPU (params, BatchNorm statistics, optimiser state, counters).
    for a, b in zip(jax.tree.leaves(host), jax.tree.leaves(cond)):
        np.testing.assert_array_equal(a, b)
    assert sharp._cache_size() == 1 and off._cache_size() == 1
    every_step, _, _ = _tiny_run('vasso', 4, host=True, every_k=1)
    assert not np.allclose(every_step.params['Dense_0']['kernel'],
                           host.params['Dense_0']['kernel'], rtol=1e-5, atol=1e-6)


def test_evaluation_uses_the_unperturbed_weights():
    state, _, model = _tiny_run('one_pass_vasso', 3, host=True, rho=0.5)
    unperturbed = jax.jit(vasso_jax.unperturbed_params)(state.params, state.opt_state)
    evaluated = loop.eval_state(state)
    eager = vasso_jax.unperturbed_params(state.params, state.opt_state)
    for a, b, c in zip(*map(jax.tree.leaves, (evaluated.params, unperturbed, eager))):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-7)  # fused vs op by op
    eval_step = steps.make_eval_step(model, lambda x: x.astype(jnp.float32) / 255.0, 3)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (1, 12, 4, 4, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, (1, 12)).astype(np.int32)
    split = steps.EvalSplit(images, labels, labels, np.ones((1, 12), np.float32))
    loss = lambda params: float(steps.evaluate(eval_step, params, state.batch_stats, split,
                                               12)['loss'])
    assert loss(evaluated.params) == loss(unperturbed)
    assert loss(evaluated.params) != loss(state.params)  # the held params are perturbed
    assert loop.params_checksum(evaluated.params) != loop.params_checksum(state.params)
    sam_state, _, _ = _tiny_run('sam', 2, host=True)
    assert loop.eval_state(sam_state) is sam_state


# ------------------------------------------------------------------ whole runs

class CompileCount:
    """XLA compilations of the guarded train steps while in the block (jax.monitoring)."""

    def __enter__(self):
        self.count = 0
        self._listener = lambda event, duration, **kw: setattr(
            self, 'count', self.count + (event == COMPILE_EVENT
                                         and 'guarded' in str(kw.get('fun_name', ''))))
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def __exit__(self, *exc_info):
        jax.monitoring.unregister_event_duration_listener(self._listener)


def test_the_train_step_compiles_once_when_metrics_accumulate_between_logs(tmp_path):
    """The metric sums carried from step to step start on the mesh, like the step's outputs;
    as host zeros they made the second step trace and compile the step again."""
    with CompileCount() as compiled:
        task.train_and_evaluate(mlp_config('sam', log_every_steps=5), str(tmp_path))
    assert compiled.count == 1


def _history(workdir):
    return [{k: v for k, v in r.items() if k not in ('elapsed_s', 'images_per_sec')}
            for r in metrics.read_history(workdir)]


@pytest.mark.slow
@pytest.mark.parametrize('optimizer, overrides, two_pass, compilations', [
    ('vasso', dict(every_k=3), 2, 2),  # steps 0 and 3 of 5; two executables
    ('one_pass_vasso', dict(rho=0.5), 0, 1),
])
@pytest.mark.slow
def test_a_run_stopped_off_the_cycle_resumes_bitwise(tmp_path, optimizer, overrides,
                                                     two_pass, compilations):
    config = mlp_config(optimizer, **overrides)
    straight_dir, resumed_dir = str(tmp_path / 'straight'), str(tmp_path / 'resumed')
    with CompileCount() as compiled:
        straight = task.train_and_evaluate(config, straight_dir)
    assert compiled.count == compilations
    half = task.train_and_evaluate(config, resumed_dir, stop_at_step=2)  # 2 % 3 != 0
    assert half['two_pass_steps'] == (1 if two_pass else 0)
    resumed = task.train_and_evaluate(config, resumed_dir)
    assert resumed['params_checksum'] == straight['params_checksum']
    assert resumed['two_pass_steps'] == straight['two_pass_steps'] == two_pass
    assert _history(resumed_dir) == _history(straight_dir)
    assert [r['two_pass_steps'] for r in _history(straight_dir) if 'two_pass_steps' in r] == (
        [1, 0, 0, 1, 0] if two_pass else [0] * 5)
    # The summary's checksum is of the weights evaluated: unperturbed under a one-pass link.
    manager = checkpointing.make_manager(straight_dir, keep=2)
    final = manager.restore(5, args=ocp.args.StandardRestore())
    manager.close()
    held = loop.params_checksum(final['params'])
    assert (held != straight['params_checksum']) == (optimizer == 'one_pass_vasso')
