"""Where the link goes in a chain: freezing, clipping, non-finite guards, clipped schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import vasso_jax
from tests import reference

FROZEN = ('b1',)
LABELS = {k: 'frozen' if k in FROZEN else 'train' for k in reference.LEAVES}
LR, MOMENTUM, WD = 0.1, 0.9, 1e-3


def loss_with_frozen(params, x, y):
    params = {k: jax.lax.stop_gradient(v) if k in FROZEN else v for k, v in params.items()}
    h = jnp.tanh(x @ params['w1'] + params['b1'])
    return 0.5 * jnp.mean(jnp.sum((h @ params['w2'] - y) ** 2, axis=1))


def freezing_chain(link):
    base = optax.chain(optax.add_decayed_weights(WD), optax.sgd(LR, momentum=MOMENTUM))
    return optax.chain(
        link, optax.multi_transform({'train': base, 'frozen': optax.set_to_zero()}, LABELS)
    )


@pytest.mark.parametrize(
    'method,make,kwargs',
    [
        ('sam', lambda: vasso_jax.sam(0.2, keep_perturbation=True), dict(rho=0.2)),
        (
            'vasso',
            lambda: vasso_jax.vasso(0.2, 0.4, keep_perturbation=True),
            dict(rho=0.2, theta=0.4),
        ),
    ],
)
def test_freezing_recipe_matches_reference(method, make, kwargs):
    params, x, y = reference.make_problem()
    idx = reference.batches(10)
    tx = freezing_chain(make())
    p = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), params)
    start = jax.tree.map(np.asarray, p)
    state = tx.init(p)

    @jax.jit
    def step(p, state, xb, yb):
        grad_fn = lambda q: jax.grad(loss_with_frozen)(q, xb, yb)
        u, state = tx.update(grad_fn(p), state, p, grad_fn=grad_fn)
        return optax.apply_updates(p, u), state

    for b in idx:
        p, state = step(p, state, jnp.asarray(x[b], jnp.float32), jnp.asarray(y[b], jnp.float32))
    want = reference.run(
        method, params, x, y, idx, lr=LR, momentum=MOMENTUM, wd=WD, frozen=FROZEN, **kwargs
    )
    for k in FROZEN:  # bitwise unchanged, weight decay and momentum included
        np.testing.assert_array_equal(np.asarray(p[k]), start[k])
        assert not np.any(np.asarray(optax.tree.get(state, 'perturbation')[k]))  # not perturbed
    for k in reference.LEAVES:
        np.testing.assert_allclose(np.asarray(p[k], np.float64), want[k], rtol=2e-5, atol=2e-6)


def sqrt_loss(w):
    return -jnp.sum(jnp.sqrt(1.0 - w))  # its gradient is NaN beyond w = 1


def test_apply_if_finite_after_the_link_skips_a_non_finite_second_pass():
    w = jnp.array([0.95, 0.0])  # finite at w, NaN at w + epsilon (epsilon_0 ~ 0.1)
    guarded = optax.chain(vasso_jax.sam(0.1), optax.apply_if_finite(optax.sgd(0.1), 5))
    step = jax.jit(
        lambda s, w: guarded.update(jax.grad(sqrt_loss)(w), s, w, grad_fn=jax.grad(sqrt_loss))
    )
    u, state = step(guarded.init(w), w)
    np.testing.assert_array_equal(np.asarray(u), 0.0)  # the skipped step
    np.testing.assert_array_equal(np.asarray(optax.apply_updates(w, u)), np.asarray(w))
    link_state, guard_state = state
    assert not bool(link_state.last_finite) and int(link_state.total_notfinite) == 1
    assert int(guard_state.notfinite_count) == 1
    # Around the whole chain the guard sees only the finite first pass: the step goes through.
    outer = optax.apply_if_finite(optax.chain(vasso_jax.sam(0.1), optax.sgd(0.1)), 5)
    u, state = outer.update(jax.grad(sqrt_loss)(w), outer.init(w), w, grad_fn=jax.grad(sqrt_loss))
    assert np.isnan(np.asarray(u)).any() and int(state.notfinite_count) == 0


def test_non_finite_gradient_leaves_vasso_state_unchanged():
    tx = vasso_jax.vasso(0.1, 0.4)
    w = jnp.ones(3)
    grad_fn = lambda p: 2 * p
    step = jax.jit(lambda g, s: tx.update(g, s, w, grad_fn=grad_fn))
    _, s1 = step(jnp.array([1.0, 2.0, 3.0]), tx.init(w))
    u, s2 = step(jnp.array([1.0, jnp.nan, 3.0]), s1)
    assert np.isnan(np.asarray(u)).any() and not bool(s2.last_finite)
    np.testing.assert_array_equal(
        np.asarray(s2.direction_state.d), np.asarray(s1.direction_state.d)
    )
    u, s3 = step(jnp.array([1.0, 2.0, 3.0]), s2)
    assert np.all(np.isfinite(np.asarray(u))) and bool(s3.last_finite)
    assert int(s3.total_notfinite) == 1 and int(s3.count) == 3


def quartic_grad(w):
    return 4 * w**3


def sam_gradient(w, g, rho):
    return quartic_grad(w + rho * g / np.linalg.norm(g))


def test_clipping_after_the_link_clips_the_sharpness_aware_gradient():
    w = np.array([1.0, -2.0, 0.5], np.float32)
    g = quartic_grad(w)
    sharp = sam_gradient(w.astype(np.float64), g.astype(np.float64), 0.1)
    tx = optax.chain(vasso_jax.sam(0.1), optax.clip_by_global_norm(1.0))
    u, _ = tx.update(jnp.asarray(g), tx.init(w), jnp.asarray(w), grad_fn=quartic_grad)
    np.testing.assert_allclose(np.asarray(u), sharp / np.linalg.norm(sharp), rtol=1e-5)
    # Before the link, clipping only rescales the direction, which the link normalises away.
    before = optax.chain(optax.clip_by_global_norm(1.0), vasso_jax.sam(0.1))
    u, _ = before.update(jnp.asarray(g), before.init(w), jnp.asarray(w), grad_fn=quartic_grad)
    np.testing.assert_allclose(np.asarray(u), sharp, rtol=1e-5)


def test_negative_rho_from_a_schedule_is_clipped_to_zero():
    w, g = jnp.array([1.0, -2.0, 0.5]), jnp.array([4.0, -32.0, 0.5])
    tx = vasso_jax.sam(lambda step: -0.1)
    u, _ = tx.update(g, tx.init(w), w, grad_fn=quartic_grad)
    np.testing.assert_array_equal(np.asarray(u), np.asarray(g))  # the plain gradient, exactly


def test_theta_from_a_schedule_is_clipped_into_0_1():
    gs = [jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0])]

    def final_d(theta):
        direction = vasso_jax.vasso_direction(theta)
        state = direction.init(gs[0])
        for g in gs:
            d, state = direction.update(g, state)
        return np.asarray(d)

    np.testing.assert_array_equal(final_d(lambda step: 1.7), final_d(1.0))  # SAM's direction
    np.testing.assert_array_equal(final_d(lambda step: -0.5), np.asarray(gs[0]))  # d stays d_1
