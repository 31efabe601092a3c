"""Float64 checks, run by tests/test_precision.py in a process with ``JAX_ENABLE_X64=1``.

Every method trained for 25 steps in float64 must match the independent float64 NumPy
reference (tests/reference.py) to ~1e-12: the ascent (VaSSO's d, the norm, the scaling, the
perturbed point) runs in float64, not float32.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import vasso_jax
from tests import reference

NUM_STEPS = 25
LR, MOMENTUM, WD = 0.1, 0.9, 1e-3
TOL = 1e-12

CASES = (
    ('sgd', lambda: vasso_jax.sam(rho=0.0), dict(rho=0.0)),
    ('sam', lambda: vasso_jax.sam(rho=0.2), dict(rho=0.2)),
    ('vasso', lambda: vasso_jax.vasso(rho=0.2, theta=0.4), dict(rho=0.2, theta=0.4)),
    ('asam', lambda: vasso_jax.asam(rho=0.5, eta=0.01), dict(rho=0.5, eta=0.01)),
    ('fsam', lambda: vasso_jax.friendly_sam(rho=0.2, lmbda=0.6), dict(rho=0.2, lmbda=0.6)),
)


def jax_loss(params, x, y):
    h = jnp.tanh(x @ params['w1'] + params['b1'])
    r = h @ params['w2'] - y
    return 0.5 * jnp.mean(jnp.sum(r**2, axis=1))


def train(link, params, x, y, idx):
    tx = optax.chain(link, optax.add_decayed_weights(WD), optax.sgd(LR, momentum=MOMENTUM))
    p = jax.tree.map(jnp.asarray, params)
    state = tx.init(p)

    @jax.jit
    def step(p, state, xb, yb):
        grad_fn = lambda q: jax.grad(jax_loss)(q, xb, yb)
        updates, state = tx.update(grad_fn(p), state, p, grad_fn=grad_fn)
        return optax.apply_updates(p, updates), state

    for b in idx:
        p, state = step(p, state, x[b], y[b])
    return p, state


def check_methods_match_reference():
    params, x, y = reference.make_problem()
    idx = reference.batches(NUM_STEPS)
    worst = {}
    for name, make, kwargs in CASES:
        got, state = train(make(), params, jnp.asarray(x), jnp.asarray(y), idx)
        want = reference.run(
            'sgd' if name == 'sgd' else name,
            params,
            x,
            y,
            idx,
            lr=LR,
            momentum=MOMENTUM,
            wd=WD,
            **kwargs,
        )
        assert all(v.dtype == jnp.float64 for v in jax.tree.leaves(got)), name
        err = max(
            float(np.max(np.abs(np.asarray(got[k]) - want[k])) / np.max(np.abs(want[k])))
            for k in reference.LEAVES
        )
        worst[name] = err
        assert err < TOL, (name, err)
    print('float64 relative error after', NUM_STEPS, 'steps:', worst)


def check_first_direction_is_the_gradient():
    params, x, y = reference.make_problem()
    p = jax.tree.map(jnp.asarray, params)
    g = jax.tree.map(jnp.asarray, reference.grad(params, x, y))
    link = vasso_jax.vasso(rho=0.1, theta=0.4, keep_perturbation=True)
    grad_fn = lambda q: jax.grad(jax_loss)(q, jnp.asarray(x), jnp.asarray(y))
    _, state = jax.jit(lambda g, s, p: link.update(g, s, p, grad_fn=grad_fn))(g, link.init(p), p)
    d = optax.tree.get(state, 'd')
    g_norm = reference.norm({k: np.asarray(v) for k, v in g.items()})
    for k in reference.LEAVES:
        assert d[k].dtype == jnp.float64
        np.testing.assert_array_equal(np.asarray(d[k]), np.asarray(g[k]))  # d_1 = g_1 exactly
        eps = 0.1 * np.asarray(g[k]) / (g_norm + 1e-12)
        assert state.perturbation[k].dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(state.perturbation[k]), eps, rtol=1e-14, atol=0)


def main():
    assert jax.config.jax_enable_x64, 'run with JAX_ENABLE_X64=1'
    check_methods_match_reference()
    check_first_direction_is_the_gradient()
    print('float64 checks passed')


if __name__ == '__main__':
    sys.exit(main())
