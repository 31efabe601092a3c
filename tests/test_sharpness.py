"""The maths: every method against the independent NumPy reference and optax."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest

import vasso_jax
from tests import reference

NUM_STEPS = 25
LR, MOMENTUM, WD = 0.1, 0.9, 1e-3


def jax_loss(params, x, y):
    h = jnp.tanh(x @ params['w1'] + params['b1'])
    r = h @ params['w2'] - y
    return 0.5 * jnp.mean(jnp.sum(r**2, axis=1))


def train(link, params, x, y, idx, *, base=None, chain_link=True):
    """Runs the chain link -> decayed weights -> SGD momentum, jitted, like a user."""
    base = base or optax.chain(optax.add_decayed_weights(WD), optax.sgd(LR, momentum=MOMENTUM))
    tx = optax.chain(link, base) if chain_link else link
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


def assert_close(jax_params, np_params, rtol=2e-5):
    for k in reference.LEAVES:
        np.testing.assert_allclose(
            np.asarray(jax_params[k], np.float64),
            np_params[k],
            rtol=rtol,
            atol=rtol * np.abs(np_params[k]).max(),
        )


@pytest.fixture(scope='module')
def problem():
    params, x, y = reference.make_problem()
    idx = reference.batches(NUM_STEPS)
    return params, jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), idx, x, y


CASES = [
    ('sam', lambda: vasso_jax.sam(rho=0.2), dict(rho=0.2)),
    ('vasso', lambda: vasso_jax.vasso(rho=0.2, theta=0.4), dict(rho=0.2, theta=0.4)),
    ('asam', lambda: vasso_jax.asam(rho=0.5, eta=0.01), dict(rho=0.5, eta=0.01)),
    (
        'fsam',
        lambda: vasso_jax.friendly_sam(rho=0.2, sigma=1.0, lmbda=0.6),
        dict(rho=0.2, sigma=1.0, lmbda=0.6),
    ),
    (
        'vasso',
        lambda: vasso_jax.vasso(rho=0.2, theta=0.4, every_k=3),
        dict(rho=0.2, theta=0.4, every_k=3),
    ),
]


@pytest.mark.parametrize(
    'method,make,kwargs', CASES, ids=['sam', 'vasso', 'asam', 'fsam', 'vasso_every3']
)
def test_matches_numpy_reference(problem, method, make, kwargs):
    params, x, y, idx, x64, y64 = problem
    got, _ = train(make(), params, x, y, idx)
    want = reference.run(method, params, x64, y64, idx, lr=LR, momentum=MOMENTUM, wd=WD, **kwargs)
    # Sanity: the methods really differ from plain SGD on this problem.
    sgd = reference.run('sgd', params, x64, y64, idx, rho=0.0, lr=LR, momentum=MOMENTUM, wd=WD)
    assert reference.norm({k: want[k] - sgd[k] for k in reference.LEAVES}) > 1e-3
    assert_close(got, want)


def test_sam_equals_optax_contrib_sam(problem):
    params, x, y, idx, *_ = problem
    rho = 0.2
    base = optax.chain(optax.add_decayed_weights(WD), optax.sgd(LR, momentum=MOMENTUM))
    ours = optax.chain(vasso_jax.sam(rho=rho), base)
    theirs = optax.contrib.sam(
        base, optax.chain(optax.contrib.normalize(), optax.sgd(rho)), opaque_mode=True
    )
    p_ours = p_theirs = jax.tree.map(jnp.asarray, params)
    s_ours, s_theirs = ours.init(p_ours), theirs.init(p_theirs)
    for b in idx:
        xb, yb = x[b], y[b]
        gf = lambda q: jax.grad(jax_loss)(q, xb, yb)
        u, s_ours = ours.update(gf(p_ours), s_ours, p_ours, grad_fn=gf)
        p_ours = optax.apply_updates(p_ours, u)
        u, s_theirs = theirs.update(
            gf(p_theirs), s_theirs, p_theirs, grad_fn=lambda q, _, gf=gf: gf(q)
        )
        p_theirs = optax.apply_updates(p_theirs, u)
    for k in reference.LEAVES:
        np.testing.assert_allclose(p_ours[k], p_theirs[k], rtol=1e-5, atol=1e-6)


def test_vasso_theta_one_is_sam(problem):
    params, x, y, idx, *_ = problem
    a, _ = train(vasso_jax.vasso(rho=0.2, theta=1.0), params, x, y, idx)
    b, _ = train(vasso_jax.sam(rho=0.2), params, x, y, idx)
    for k in reference.LEAVES:
        np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize(
    'make',
    [
        lambda: vasso_jax.sam(rho=0.0),
        lambda: vasso_jax.vasso(rho=0.0, theta=0.4),
        lambda: optax.inject_hyperparams(vasso_jax.vasso)(rho=0.0, theta=0.4),
        lambda: vasso_jax.sam(rho=optax.constant_schedule(0.0)),
    ],
    ids=['sam', 'vasso', 'vasso_injected', 'sam_schedule'],
)
def test_rho_zero_is_base_optimizer_exactly(problem, make):
    params, x, y, idx, *_ = problem
    got, _ = train(make(), params, x, y, idx)
    base = optax.chain(optax.add_decayed_weights(WD), optax.sgd(LR, momentum=MOMENTUM))
    want, _ = train(base, params, x, y, idx, chain_link=False)
    for k in reference.LEAVES:
        np.testing.assert_array_equal(got[k], want[k])


@pytest.mark.parametrize(
    'make', [vasso_jax.sam, vasso_jax.vasso, vasso_jax.asam, vasso_jax.friendly_sam]
)
def test_zero_gradient_gives_zero_perturbation(make):
    params = {'a': jnp.zeros((3,)), 'b': jnp.ones((2, 2))}
    tx = make()
    seen = []

    def grad_fn(p):
        seen.append(p)
        return jax.tree.map(jnp.zeros_like, p)

    zeros = jax.tree.map(jnp.zeros_like, params)
    out, state = tx.update(zeros, tx.init(params), params, grad_fn=grad_fn)
    for leaf in jax.tree.leaves((out, state)):
        assert np.all(np.isfinite(leaf))
    np.testing.assert_array_equal(seen[0]['b'], params['b'])  # eps = 0


def test_schedule_rho_uses_the_link_step_count():
    w = jnp.array([1.0, 2.0])
    grad_fn = lambda p: 2.0 * p
    tx = vasso_jax.sam(rho=lambda count: 0.1 * count)
    state = tx.init(w)
    outs = []
    for _ in range(3):
        g, state = tx.update(grad_fn(w), state, w, grad_fn=grad_fn)
        outs.append(g)
    unit = w / jnp.linalg.norm(w)
    for t, g in enumerate(outs):
        np.testing.assert_allclose(g, 2.0 * (w + 0.1 * t * unit), rtol=1e-6)


def test_every_k_direction_updates_every_step():
    w = jnp.array([1.0, -1.0])
    grads = [jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0]), jnp.array([1.0, 1.0])]
    tx = vasso_jax.vasso(rho=0.1, theta=0.5, every_k=2)
    state = tx.init(w)
    calls = []
    for g in grads:
        out, state = tx.update(g, state, w, grad_fn=lambda p: calls.append(p) or 3.0 * p)
    d = optax.tree.get(state, 'd')
    np.testing.assert_allclose(d, 0.5 * (0.5 * grads[0] + 0.5 * grads[1]) + 0.5 * grads[2])
    np.testing.assert_array_equal(out, 3.0 * (w + 0.1 * d / jnp.linalg.norm(d)))


def test_every_k_off_steps_equal_plain_gradient():
    w = jnp.array([1.0, -1.0])
    tx = vasso_jax.sam(rho=0.1, every_k=3)
    state = tx.init(w)
    for t in range(6):
        g = jnp.array([1.0, float(t)])
        out, state = tx.update(g, state, w, grad_fn=lambda p: 3.0 * p)
        if t % 3:
            np.testing.assert_array_equal(out, g)
        else:
            np.testing.assert_allclose(out, 3.0 * (w + 0.1 * g / jnp.linalg.norm(g)), rtol=1e-6)


def test_diagnostics():
    w = {'a': jnp.array([1.0, 0.0]), 'b': jnp.array([0.0])}
    tx = vasso_jax.vasso(rho=0.1, theta=0.5)
    state = tx.init(w)
    grad_fn = lambda p: jax.tree.map(jnp.zeros_like, p)
    _, state = tx.update(
        {'a': jnp.array([3.0, 0.0]), 'b': jnp.array([4.0])}, state, w, grad_fn=grad_fn
    )
    _, state = tx.update(
        {'a': jnp.array([0.0, 2.0]), 'b': jnp.array([0.0])}, state, w, grad_fn=grad_fn
    )
    d = np.array([1.5, 1.0, 2.0])  # 0.5 * (3, 0, 4) + 0.5 * (0, 2, 0)
    g = np.array([0.0, 2.0, 0.0])
    np.testing.assert_allclose(optax.tree.get(state, 'grad_norm'), 2.0)
    np.testing.assert_allclose(optax.tree.get(state, 'direction_norm'), np.linalg.norm(d))
    np.testing.assert_allclose(
        optax.tree.get(state, 'cosine'), d @ g / np.linalg.norm(d) / 2.0, rtol=1e-6
    )


def test_keep_perturbation_records_epsilon():
    w = {'a': jnp.array([1.0, 2.0]), 'b': jnp.array([-1.0])}
    g = {'a': jnp.array([3.0, 0.0]), 'b': jnp.array([4.0])}
    tx = vasso_jax.sam(rho=0.5, keep_perturbation=True)
    state = tx.init(w)
    assert all(np.all(x == 0) for x in jax.tree.leaves(state.perturbation))
    _, state = tx.update(g, state, w, grad_fn=lambda p: p)
    np.testing.assert_allclose(state.perturbation['a'], [0.3, 0.0], rtol=1e-6)
    np.testing.assert_allclose(state.perturbation['b'], [0.4], rtol=1e-6)
    assert vasso_jax.sam(rho=0.5).init(w).perturbation is None


def test_per_group_ascent_under_vmap_matches_reference(problem):
    # m-sharpness with groups as a vmap axis: each group perturbs along its own VaSSO
    # direction; the direction state is the average, so it stays shared.
    params, x, y, idx, x64, y64 = problem
    rho, theta, groups = 0.2, 0.4, 4
    link = vasso_jax.vasso(rho, theta, axis_name='g', ascent='per_device')
    p = jax.tree.map(jnp.asarray, params)

    def per_group(xg, yg, state):
        gf = lambda q: jax.grad(jax_loss)(q, xg, yg)
        return link.update(gf(p), state, p, grad_fn=gf)

    step = jax.jit(jax.vmap(per_group, axis_name='g', in_axes=(0, 0, None), out_axes=None))
    state, d = link.init(p), None
    for b in idx[:3]:
        xs, ys = x[b].reshape(groups, -1, 5), y[b].reshape(groups, -1, 3)
        got, state = step(xs, ys, state)
        outs, directions = [], []
        for xg, yg in zip(np.split(x64[b], groups), np.split(y64[b], groups)):
            g = reference.grad(params, xg, yg)
            dj = g if d is None else {k: (1 - theta) * d[k] + theta * g[k] for k in g}
            n = reference.norm(dj)
            point = {k: params[k] + rho * dj[k] / (n + 1e-12) for k in dj}
            outs.append(reference.grad(point, xg, yg))
            directions.append(dj)
        d = {k: np.mean([dj[k] for dj in directions], axis=0) for k in reference.LEAVES}
        want = {k: np.mean([o[k] for o in outs], axis=0) for k in reference.LEAVES}
        assert_close(got, want)
        assert_close(optax.tree.get(state, 'd'), d)
