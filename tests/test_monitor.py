"""vasso_jax.track_stability against a hand computation (NumPy), and its optax behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import vasso_jax


def test_tracked_link_matches_a_hand_computed_sequence():
    """Linear losses (gradient g_t whatever the weights): SAM's eps_t = rho g_t / |g_t|."""
    gradients = [
        np.array([1.0, 0.0]),
        np.array([1.0, 1.0]),
        np.array([0.0, 2.0]),
        np.array([-1.0, 0.5]),
    ]
    rho = 0.5
    tx = vasso_jax.track_stability(vasso_jax.sam(rho, keep_perturbation=True))
    w = jnp.zeros(2)
    state = tx.init(w)
    step = jax.jit(lambda g, s: tx.update(g, s, w, grad_fn=lambda p: g))
    eps = [rho * g / np.linalg.norm(g) for g in gradients]
    for t, g in enumerate(gradients, start=1):
        updates, state = step(jnp.asarray(g), state)
        np.testing.assert_allclose(updates, g)  # a linear loss: the same gradient at w + eps
        cosines = [
            e1 @ e0 / (np.linalg.norm(e1) * np.linalg.norm(e0))
            for e0, e1 in zip(eps[: t - 1], eps[1:t])
        ]
        history = np.stack(eps[:t])
        np.testing.assert_allclose(state.eps_cosine, cosines[-1] if cosines else 0.0, atol=1e-6)
        np.testing.assert_allclose(
            state.eps_mean_cosine, np.mean(cosines) if cosines else 0.0, atol=1e-6
        )
        np.testing.assert_allclose(state.eps_variance, history.var(axis=0).mean(), atol=1e-7)
    assert optax.tree.get(state, 'eps_cosine') is state.eps_cosine  # the trainer's lookup


def test_track_needs_the_perturbation():
    with pytest.raises(ValueError, match='keep_perturbation=True'):
        vasso_jax.track_stability(vasso_jax.vasso(0.1, 0.4)).init(jnp.zeros(2))


def test_updates_and_extra_args_pass_through_unchanged():
    """The wrapped chain gives the link's updates bit for bit; unknown extra args are ignored."""
    params = {'w': jnp.array([1.0, -2.0, 0.5]), 'b': jnp.array(0.3)}
    grad_fn = jax.grad(lambda p: jnp.sum(jnp.sin(p['w']) * p['w'] ** 2) + p['b'] ** 2)
    plain = optax.chain(vasso_jax.vasso(0.2, 0.5, keep_perturbation=True), optax.sgd(0.1))
    tracked = optax.chain(vasso_jax.track_stability(
        vasso_jax.vasso(0.2, 0.5, keep_perturbation=True)), optax.sgd(0.1))
    s_plain, s_tracked = plain.init(params), tracked.init(params)
    for _ in range(3):
        g = grad_fn(params)
        u_plain, s_plain = plain.update(g, s_plain, params, grad_fn=grad_fn, unused=1)
        u_tracked, s_tracked = tracked.update(g, s_tracked, params, grad_fn=grad_fn, unused=1)
        jax.tree.map(np.testing.assert_array_equal, u_tracked, u_plain)
        params = optax.apply_updates(params, u_plain)
    for name in ('eps_cosine', 'eps_mean_cosine', 'eps_variance'):
        value = optax.tree.get(s_tracked, name)
        assert value.dtype == jnp.float32 and value.shape == ()
    assert 0.0 < float(optax.tree.get(s_tracked, 'eps_cosine')) <= 1.0 + 1e-6
