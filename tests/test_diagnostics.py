"""Tests for vasso_jax._diagnostics against independent NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import flatten_util

from vasso_jax import _diagnostics

METHODS = ('lanczos', 'power')


def _quadratic(spectrum, seed=0):
    """0.5 x^T A x on a two-leaf tree, A = Q diag(spectrum) Q^T; returns loss, params, A."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(len(spectrum), len(spectrum))))
    a = q @ np.diag(spectrum) @ q.T
    a = 0.5 * (a + a.T)
    a32 = jnp.asarray(a, jnp.float32)
    params = {'a': jnp.asarray(rng.normal(size=3), jnp.float32),
              'b': jnp.asarray(rng.normal(size=(len(spectrum) - 3,)), jnp.float32)}

    def loss_fn(p):
        x = flatten_util.ravel_pytree(p)[0]
        return 0.5 * x @ a32 @ x

    return loss_fn, params, a


def _mlp():
    """A tiny tanh MLP with a squared loss on a fixed batch."""
    rng = np.random.default_rng(1)
    f32 = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
    params = {'w1': f32(3, 4), 'b1': f32(4), 'w2': f32(4, 2), 'b2': f32(2)}
    x, y = f32(8, 3) + 2.0, f32(8, 2)  # Shifted inputs: a dominant eigenvalue.

    def loss_fn(p):
        h = jnp.tanh(x @ p['w1'] + p['b1'])
        return jnp.mean((h @ p['w2'] + p['b2'] - y) ** 2)

    return loss_fn, params


def _dense_spectrum(loss_fn, params):
    flat, unravel = flatten_util.ravel_pytree(params)
    h = np.asarray(jax.jit(jax.hessian(lambda f: loss_fn(unravel(f))))(flat), np.float64)
    return np.linalg.eigvalsh(0.5 * (h + h.T))


@pytest.mark.parametrize('method, num_iters', [('lanczos', 20), ('power', 80)])
def test_hessian_quadratic(method, num_iters):
    loss_fn, params, a = _quadratic([10.0, 5.0, 3.0, 2.0, 1.0, 0.5, -1.0])
    evals, evecs = np.linalg.eigh(a)
    value, vector = _diagnostics.hessian_top_eigenpair(
        loss_fn, params, num_iters=num_iters, method=method)
    assert value.dtype == jnp.float32 and value.shape == ()
    np.testing.assert_allclose(value, evals[-1], rtol=1e-4)
    v = np.asarray(flatten_util.ravel_pytree(vector)[0], np.float64)
    assert jax.tree.structure(vector) == jax.tree.structure(params)
    np.testing.assert_allclose(abs(v @ evecs[:, -1]), 1.0, atol=1e-4)


def test_lanczos_fewer_iterations_than_dimension():
    spectrum = np.concatenate([[3.0], np.linspace(-0.5, 1.0, 47)])
    loss_fn, params, a = _quadratic(spectrum, seed=2)
    value = _diagnostics.hessian_top_eigenvalue(loss_fn, params, num_iters=25)
    np.testing.assert_allclose(value, np.linalg.eigvalsh(a)[-1], rtol=1e-4)


@pytest.mark.parametrize('method', METHODS)
def test_hessian_mlp(method):
    loss_fn, params = _mlp()
    evals = _dense_spectrum(loss_fn, params)
    if method == 'lanczos':  # Largest algebraic eigenvalue.
        expected, num_iters = evals[-1], 40
    else:  # Dominant eigenvalue, given a well-separated spectrum.
        order = np.argsort(-np.abs(evals))
        assert abs(evals[order[1]] / evals[order[0]]) < 0.5
        expected, num_iters = evals[order[0]], 60
    value = _diagnostics.hessian_top_eigenvalue(
        loss_fn, params, num_iters=num_iters, method=method)
    np.testing.assert_allclose(value, expected, rtol=1e-4)


def test_methods_differ_as_documented_on_negative_dominant_spectrum():
    loss_fn, params, _ = _quadratic([2.0, 1.0, 0.5, -5.0, -0.1])
    lanczos = _diagnostics.hessian_top_eigenvalue(loss_fn, params, method='lanczos')
    power = _diagnostics.hessian_top_eigenvalue(loss_fn, params, method='power', num_iters=60)
    np.testing.assert_allclose([lanczos, power], [2.0, -5.0], rtol=1e-4)


@pytest.mark.parametrize('method', METHODS)
def test_hessian_jit_tol_and_key(method):
    loss_fn, params, _ = _quadratic([10.0, 5.0, 3.0, 2.0, 1.0, 0.5, -1.0])
    fn = jax.jit(lambda p, k: _diagnostics.hessian_top_eigenvalue(
        loss_fn, p, num_iters=100, method=method, key=k, tol=1e-7))
    np.testing.assert_allclose(fn(params, jax.random.key(3)), 10.0, rtol=1e-4)


@pytest.mark.parametrize('method', METHODS)
@pytest.mark.parametrize('spectrum, tol', [
    ([10.0, 5.0, 3.0, 2.0, 1.0, 0.5, -1.0], 0.0),
    ([10.0, 5.0, 3.0, 2.0, 1.0, 0.5, -1.0], 1e-3),  # stops early, at a step of its own
    ([-1.0, -1.0, -1.0, -2.0, -2.0], 0.0),  # Lanczos breaks down after 2 of its 5 steps
])
def test_unrolled_steps_give_the_loops_result_without_a_loop(method, spectrum, tol):
    loss_fn, params, a = _quadratic(spectrum)
    run = lambda unroll: jax.jit(lambda p: _diagnostics.hessian_top_eigenpair(
        loss_fn, p, num_iters=12, method=method, tol=tol, unroll=unroll))
    looped, unrolled = run(False)(params), run(True)(params)
    np.testing.assert_allclose(unrolled[0], looped[0], rtol=1e-6)
    for x, y in zip(jax.tree.leaves(unrolled[1]), jax.tree.leaves(looped[1])):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    if method == 'lanczos':  # the steps after a stop add no spurious (zero) Ritz value
        np.testing.assert_allclose(unrolled[0], np.linalg.eigvalsh(a)[-1], rtol=1e-4)
    assert 'while' in str(jax.make_jaxpr(run(False))(params))
    assert 'while' not in str(jax.make_jaxpr(run(True))(params))


@pytest.mark.parametrize('method', METHODS)
def test_hessian_zero_and_one_dimensional(method):
    linear = lambda p: jnp.sum(p['w']) + 2.0 * p['b']
    params = {'w': jnp.ones(3), 'b': jnp.array(1.0)}
    value, vector = _diagnostics.hessian_top_eigenpair(linear, params, method=method)
    assert float(value) == 0.0
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(vector))
    scalar = _diagnostics.hessian_top_eigenvalue(lambda w: 1.5 * w**2, jnp.array(2.0),
                                                 method=method)
    np.testing.assert_allclose(scalar, 3.0, rtol=1e-6)


def test_hessian_mixed_dtypes():
    params = {'a': jnp.ones(2, jnp.bfloat16), 'b': jnp.ones(1, jnp.float32)}
    loss_fn = lambda p: 0.5 * (jnp.sum(jnp.array([4.0, 2.0]) * p['a'].astype(jnp.float32) ** 2)
                               + jnp.sum(p['b'] ** 2))
    value, vector = _diagnostics.hessian_top_eigenpair(loss_fn, params)
    assert value.dtype == jnp.float32 and vector['a'].dtype == jnp.bfloat16
    np.testing.assert_allclose(value, 4.0, rtol=1e-2)  # HVPs run in bfloat16 for 'a'.


@pytest.mark.parametrize('kwargs, match', [
    ({'num_iters': 0}, 'num_iters'), ({'num_iters': 2.5}, 'num_iters'),
    ({'method': 'arnoldi'}, 'method'), ({'tol': -1.0}, 'tol'),
])
def test_hessian_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _diagnostics.hessian_top_eigenvalue(lambda w: jnp.sum(w**2), jnp.ones(2), **kwargs)
    with pytest.raises(ValueError, match='no array elements'):
        _diagnostics.hessian_top_eigenvalue(lambda p: 0.0, {})


def test_cosine_similarity():
    zero = {'u': jnp.zeros(2), 'v': jnp.zeros(())}
    one = {'u': jnp.array([1.0, 2.0]), 'v': jnp.array(2.0)}
    other = {'u': jnp.array([2.0, 0.0]), 'v': jnp.array(1.0, jnp.bfloat16)}
    assert float(_diagnostics.cosine_similarity(zero, zero)) == 0.0
    assert float(_diagnostics.cosine_similarity(zero, one)) == 0.0
    value = _diagnostics.cosine_similarity(one, other)
    assert value.dtype == jnp.float32
    np.testing.assert_allclose(value, 4.0 / (3.0 * np.sqrt(5.0)), rtol=1e-6)
    neg = jax.tree.map(lambda x: -3.0 * x, one)
    np.testing.assert_allclose(_diagnostics.cosine_similarity(one, neg), -1.0, rtol=1e-6)


def test_perturbation_stability_against_hand_computation():
    # Perturbations as trees {'u': (2,), 'v': ()}, flattened by hand as [u0, u1, v].
    seq = np.array([[1.0, 0.0, 2.0], [2.0, 1.0, 1.0], [-1.0, 3.0, 0.0], [0.0, 0.0, 0.0],
                    [0.5, -1.0, 2.0]])
    cos = [0.0]
    for prev, cur in zip(seq[:-1], seq[1:], strict=True):
        den = np.linalg.norm(prev) * np.linalg.norm(cur)
        cos.append(0.0 if den == 0 else prev @ cur / den)
    expected = [(cos[t], np.mean(cos[1:t + 1]) if t else 0.0, np.var(seq[:t + 1], axis=0).mean())
                for t in range(len(seq))]

    tracker = _diagnostics.perturbation_stability()
    state = tracker.init({'u': jnp.zeros(2), 'v': jnp.zeros(())})
    update = jax.jit(tracker.update)
    for row, (c, mc, var) in zip(seq, expected, strict=True):
        eps = {'u': jnp.asarray(row[:2]), 'v': jnp.asarray(row[2])}
        metrics, new_state = update(eps, state)
        assert jax.tree.structure(new_state) == jax.tree.structure(state)
        assert all(x.dtype == y.dtype for x, y in
                   zip(jax.tree.leaves(new_state), jax.tree.leaves(state), strict=True))
        state = new_state
        np.testing.assert_allclose(
            [metrics['cosine'], metrics['mean_cosine'], metrics['variance']], [c, mc, var],
            rtol=1e-5, atol=1e-7)
    assert state.count.dtype == jnp.int32 and int(state.count) == len(seq)


def _linear_regression(seed=0):
    rng = np.random.default_rng(seed)
    params = {'w': jnp.asarray(rng.normal(size=3), jnp.float32), 'b': jnp.array(0.3)}
    batch = {'x': jnp.asarray(rng.normal(size=(8, 3)), jnp.float32),
             'y': jnp.asarray(rng.normal(size=8), jnp.float32)}
    loss_fn = lambda p, b: jnp.mean((b['x'] @ p['w'] + p['b'] - b['y']) ** 2)
    return loss_fn, params, batch


def _numpy_m_sharpness(params, batch, rho, m):
    w, b = np.asarray(params['w'], np.float64), float(params['b'])
    x, y = np.asarray(batch['x'], np.float64), np.asarray(batch['y'], np.float64)
    gaps = []
    for start in range(0, len(y), m):
        xg, yg = x[start:start + m], y[start:start + m]
        r = xg @ w + b - yg
        gw, gb = 2.0 / m * xg.T @ r, 2.0 / m * r.sum()
        scale = rho / (np.sqrt(gw @ gw + gb**2) + 1e-12)
        perturbed = np.mean((xg @ (w + scale * gw) + b + scale * gb - yg) ** 2)
        gaps.append(perturbed - np.mean(r**2))
    return np.mean(gaps)


@pytest.mark.parametrize('m', [1, 2, 4, 8])
def test_m_sharpness_against_numpy_loop(m):
    loss_fn, params, batch = _linear_regression()
    value = _diagnostics.m_sharpness(loss_fn, params, batch, rho=0.05, m=m)
    assert value.dtype == jnp.float32
    np.testing.assert_allclose(value, _numpy_m_sharpness(params, batch, 0.05, m),
                               rtol=1e-4, atol=1e-6)
    if m == 2:  # lax.map in chunks of groups matches vmap over all groups.
        chunked = _diagnostics.m_sharpness(loss_fn, params, batch, rho=0.05, m=m,
                                           groups_per_step=3)
        np.testing.assert_allclose(chunked, value, rtol=1e-5, atol=1e-7)


def test_m_equal_batch_is_plain_sam_sharpness():
    loss_fn, params, batch = _linear_regression(seed=1)
    grads = jax.grad(loss_fn)(params, batch)
    norm = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads)))
    perturbed = jax.tree.map(lambda p, g: p + 0.1 * g / (norm + 1e-12), params, grads)
    expected = loss_fn(perturbed, batch) - loss_fn(params, batch)
    fn = jax.jit(lambda p, b, rho: _diagnostics.m_sharpness(loss_fn, p, b, rho=rho, m=8))
    np.testing.assert_allclose(fn(params, batch, 0.1), expected, rtol=1e-5)


def test_m_sharpness_zero_gradient_and_errors():
    loss_fn, params, batch = _linear_regression()
    exact = dict(batch, y=batch['x'] @ params['w'] + params['b'])
    assert float(_diagnostics.m_sharpness(loss_fn, params, exact, rho=0.1, m=2)) == 0.0
    for m in (3, 0, 16):
        with pytest.raises(ValueError, match='divisor'):
            _diagnostics.m_sharpness(loss_fn, params, batch, rho=0.1, m=m)
    with pytest.raises(ValueError, match='leading example axis'):
        _diagnostics.m_sharpness(loss_fn, params, dict(batch, y=batch['y'][:4]), rho=0.1, m=2)
    with pytest.raises(ValueError, match='rho'):
        _diagnostics.m_sharpness(loss_fn, params, batch, rho=-0.1, m=2)
