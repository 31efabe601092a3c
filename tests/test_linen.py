"""vasso_jax.linen: TrainState forwards grad_fn; pass 2 keeps the dropout key and old stats."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

nn = pytest.importorskip('flax.linen')

import vasso_jax  # noqa: E402
import vasso_jax.linen  # noqa: E402

RHO, LR = 0.3, 0.1


class Net(nn.Module):
    record: Any = None

    @nn.compact
    def __call__(self, x, train):
        h = nn.BatchNorm(use_running_average=not train, momentum=0.5)(nn.Dense(6)(x))
        mask = nn.Dropout(0.5, deterministic=not train)(jnp.ones_like(h))
        if self.record is not None:
            jax.debug.callback(lambda m: self.record(np.asarray(m)), mask)
        return nn.Dense(2)(jnp.tanh(h) * mask)


class State(vasso_jax.linen.TrainState):
    batch_stats: Any = None


def make(tx=None, record=None):
    model = Net(record)
    x, y = data()
    variables = model.init(jax.random.key(0), x, train=False)
    tx = tx or optax.chain(vasso_jax.sam(rho=RHO), optax.sgd(LR, momentum=0.9))
    return State.create(
        apply_fn=model.apply,
        params=variables['params'],
        batch_stats=variables['batch_stats'],
        tx=tx,
    )


def data():
    k1, k2 = jax.random.split(jax.random.key(7))
    return jax.random.normal(k1, (8, 3)), jax.random.normal(k2, (8, 2))


def make_loss(state):
    def loss_fn(params, batch_stats, x, y, rng):
        out, updates = state.apply_fn(
            {'params': params, 'batch_stats': batch_stats},
            x,
            train=True,
            rngs={'dropout': rng},
            mutable=['batch_stats'],
        )
        return jnp.mean((out - y) ** 2), updates

    return loss_fn


def passes(state, x, y, rng):
    vg = vasso_jax.linen.value_and_grad(make_loss(state), has_aux=True)
    return vg(state.params, state.batch_stats, x, y, rng)


@jax.jit
def train_step(state, x, y, rng):
    (loss, updates), grads, grad_fn = passes(state, x, y, rng)
    return state.apply_gradients(
        grads=grads, grad_fn=grad_fn, batch_stats=updates['batch_stats']
    ), loss


def assert_trees(a, b, rtol):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=rtol * 1e-2)


def test_apply_gradients_equals_manual_tx_update_exactly():
    state, (x, y), rng = make(), data(), jax.random.key(1)

    @jax.jit
    def manual(state):
        (_, updates), grads, grad_fn = passes(state, x, y, rng)
        new, opt_state = state.tx.update(grads, state.opt_state, state.params, grad_fn=grad_fn)
        params = optax.apply_updates(state.params, new)
        return params, opt_state, updates['batch_stats']

    got, _ = train_step(state, x, y, rng)
    params, opt_state, batch_stats = manual(state)
    assert_trees(got.params, params, rtol=0)
    assert_trees(got.opt_state, opt_state, rtol=0)
    assert_trees(got.batch_stats, batch_stats, rtol=0)
    assert int(got.step) == 1 and got.tx is state.tx


def test_update_equals_explicit_two_pass_sam():
    state, (x, y), rng = make(tx=optax.chain(vasso_jax.sam(rho=RHO), optax.sgd(LR))), data(), 1
    rng = jax.random.key(rng)
    loss_fn = make_loss(state)
    grad = jax.jit(jax.grad(loss_fn, has_aux=True))
    g1, updates = grad(state.params, state.batch_stats, x, y, rng)
    norm = np.sqrt(sum(np.sum(np.square(v, dtype=np.float64)) for v in jax.tree.leaves(g1)))
    point = jax.tree.map(lambda w, g: w + RHO * g / norm, state.params, g1)
    g2, _ = grad(point, state.batch_stats, x, y, rng)  # pre-step stats, same dropout key
    want = jax.tree.map(lambda w, g: w - LR * g, state.params, g2)
    got, _ = train_step(state, x, y, rng)
    assert_trees(got.params, want, rtol=1e-5)
    assert_trees(got.batch_stats, updates['batch_stats'], rtol=0)


def test_batch_stats_move_once_and_dropout_key_is_reused():
    masks = []
    state, (x, y) = make(record=masks.append), data()
    _, once = state.apply_fn(
        {'params': state.params, 'batch_stats': state.batch_stats},
        x,
        train=True,
        rngs={'dropout': jax.random.key(1)},
        mutable=['batch_stats'],
    )
    masks.clear()
    new, _ = train_step(state, x, y, jax.random.key(1))
    assert_trees(new.batch_stats, once['batch_stats'], rtol=1e-6)
    assert len(masks) == 2
    np.testing.assert_array_equal(masks[0], masks[1])
    assert 0 < np.count_nonzero(masks[0]) < masks[0].size


def test_missing_grad_fn_raises_the_links_error():
    state, (x, y) = make(), data()
    (_, updates), grads, _ = passes(state, x, y, jax.random.key(1))
    with pytest.raises(ValueError, match=r'^sharpness_aware: update\(\) needs grad_fn=') as info:
        state.apply_gradients(grads=grads, batch_stats=updates['batch_stats'])
    assert '\n' not in str(info.value)


@pytest.mark.parametrize('as_transformation', [False, True])
def test_multisteps_with_grad_fn_is_refused(as_transformation):
    multi = optax.MultiSteps(optax.chain(vasso_jax.sam(rho=RHO), optax.sgd(LR)), 2)
    state, (x, y) = make(tx=multi.gradient_transformation() if as_transformation else multi), data()
    _, grads, grad_fn = passes(state, x, y, jax.random.key(1))
    with pytest.raises(ValueError, match=r'MultiSteps .* vasso_jax.microbatched\.$'):
        state.apply_gradients(grads=grads, grad_fn=grad_fn)


def test_plain_optimizer_and_flax_fields_still_work():
    state, (x, y) = make(tx=optax.sgd(LR)), data()
    (_, updates), grads, grad_fn = passes(state, x, y, jax.random.key(1))
    new = state.apply_gradients(grads=grads, grad_fn=grad_fn, batch_stats=updates['batch_stats'])
    want = jax.tree.map(lambda w, g: w - LR * g, state.params, grads)
    assert_trees(new.params, want, rtol=1e-6)
    assert new.batch_stats is updates['batch_stats']
