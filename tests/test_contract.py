"""The optax contract, run against every method."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import vasso_jax

METHODS = {
    'sam': lambda **kw: vasso_jax.sam(rho=0.1, **kw),
    'vasso': lambda **kw: vasso_jax.vasso(rho=0.1, theta=0.4, **kw),
    'asam': lambda **kw: vasso_jax.asam(rho=0.5, **kw),
    'fsam': lambda **kw: vasso_jax.friendly_sam(rho=0.1, **kw),
    'vasso_every2': lambda **kw: vasso_jax.vasso(rho=0.1, theta=0.4, every_k=2, **kw),
    'sam_keep_perturbation': lambda **kw: vasso_jax.sam(rho=0.1, keep_perturbation=True, **kw),
    'sam_adaptive_schedule': lambda **kw: vasso_jax.sam(
        rho=optax.linear_schedule(0.0, 0.2, 4), adaptive=True, **kw
    ),
}
PARAMS_SIZED_BUFFERS = {
    'sam': 0,
    'vasso': 1,
    'asam': 0,
    'fsam': 1,
    'vasso_every2': 1,
    'sam_adaptive_schedule': 0,
    'sam_keep_perturbation': 1,
}

methods = pytest.mark.parametrize('name', sorted(METHODS))


def loss(params, batch):
    x, y = batch
    h = jnp.tanh(x @ params['w'] + params['b'])
    return jnp.mean((h @ params['v'] - y) ** 2)


def make_params(dtype=jnp.float32):
    k1, k2 = jax.random.split(jax.random.key(0))
    return {
        'w': jax.random.normal(k1, (4, 3), dtype),
        'b': jnp.zeros((3,), dtype),
        'v': jax.random.normal(k2, (3, 2), dtype),
    }


def make_batch(i, dtype=jnp.float32):
    k1, k2 = jax.random.split(jax.random.key(100 + i))
    return jax.random.normal(k1, (8, 4), dtype), jax.random.normal(k2, (8, 2), dtype)


def make_step(tx, **extra):
    def step(params, state, batch):
        grad_fn = lambda p: jax.grad(loss)(p, batch)
        updates, state = tx.update(grad_fn(params), state, params, grad_fn=grad_fn, **extra)
        return optax.apply_updates(params, updates), state

    return step


def run(tx, num_steps=4, jit=True, dtype=jnp.float32, **extra):
    step = make_step(tx, **extra)
    step = jax.jit(step) if jit else step
    params = make_params(dtype)
    state = tx.init(params)
    for i in range(num_steps):
        params, state = step(params, state, make_batch(i, dtype))
    return params, state


def assert_trees_equal(a, b, rtol=0.0):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        if rtol:
            np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol)
        else:
            np.testing.assert_array_equal(x, y)


@methods
def test_extra_args_are_ignored(name):
    tx = optax.chain(METHODS[name](), optax.sgd(0.1))
    assert_trees_equal(run(tx, unrelated=3, another='x'), run(tx))


@methods
def test_jit_equals_no_jit(name):
    tx = optax.chain(METHODS[name](), optax.sgd(0.1, momentum=0.9))
    assert_trees_equal(run(tx, jit=True), run(tx, jit=False), rtol=1e-5)


@methods
def test_compiles_once(name):
    tx = optax.chain(METHODS[name](), optax.sgd(0.1))
    step = jax.jit(make_step(tx))
    params = make_params()
    state = tx.init(params)
    for i in range(4):
        params, state = step(params, state, make_batch(i))
    assert step._cache_size() == 1


@methods
def test_state_is_arrays_with_expected_buffers(name):
    params = make_params()
    state = METHODS[name]().init(params)
    leaves = jax.tree.leaves(state)
    assert all(isinstance(x, jax.Array) for x in leaves)
    scalars = [x for x in leaves if x.ndim == 0]
    allowed = {jnp.dtype('int32'), jnp.dtype('float32'), jnp.dtype('bool')}  # bool: last_finite
    assert {x.dtype for x in scalars} <= allowed
    params_sized = len(leaves) - len(scalars)
    assert params_sized == PARAMS_SIZED_BUFFERS[name] * len(jax.tree.leaves(params))


@methods
def test_map_params(name):
    tx = METHODS[name]()
    params = make_params()
    state = tx.init(params)
    mapped = optax.tree.map_params(tx, lambda p: p + 1.0, state)
    assert jax.tree.structure(mapped) == jax.tree.structure(state)
    for before, after in zip(jax.tree.leaves(state), jax.tree.leaves(mapped)):
        want = before + 1.0 if before.ndim else before  # only params-sized buffers map
        np.testing.assert_array_equal(after, want)


@pytest.mark.parametrize('name', ['sam', 'vasso', 'asam', 'fsam'])
def test_inject_hyperparams_gives_identical_updates(name):
    factory = {
        'sam': vasso_jax.sam,
        'vasso': vasso_jax.vasso,
        'asam': vasso_jax.asam,
        'fsam': vasso_jax.friendly_sam,
    }[name]
    plain = optax.chain(factory(rho=0.1), optax.sgd(0.1))
    injected = optax.chain(optax.inject_hyperparams(factory)(rho=0.1), optax.sgd(0.1))
    (p1, _), (p2, s2) = run(plain), run(injected)
    assert_trees_equal(p1, p2, rtol=1e-6)
    assert float(optax.tree.get(s2, 'hyperparams')['rho']) == pytest.approx(0.1)


@methods
def test_inside_multisteps(name):
    # Two micro-batches that are the same batch: the accumulated gradient is the
    # batch gradient, so MultiSteps(k=2) must equal one plain step per two calls.
    inner = optax.chain(METHODS[name](), optax.sgd(0.1))
    multi = optax.MultiSteps(inner, every_k_schedule=2)
    params = make_params()
    p_multi, s_multi = params, multi.init(params)
    p_plain, s_plain = params, inner.init(params)
    m_step, i_step = jax.jit(make_step(multi)), jax.jit(make_step(inner))
    for i in range(3):
        batch = make_batch(i)
        p_multi, s_multi = m_step(p_multi, s_multi, batch)
        p_multi, s_multi = m_step(p_multi, s_multi, batch)
        p_plain, s_plain = i_step(p_plain, s_plain, batch)
    assert_trees_equal(p_multi, p_plain, rtol=1e-6)


@methods
def test_bf16_dtypes_kept(name):
    tx = optax.chain(METHODS[name](), optax.sgd(0.1))
    params, state = run(tx, dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    updates, _ = tx.update(
        jax.tree.map(jnp.ones_like, params),
        state,
        params,
        grad_fn=lambda p: jax.tree.map(jnp.ones_like, p),
    )
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(updates))
    assert all(np.all(np.isfinite(np.asarray(x, np.float32))) for x in jax.tree.leaves(params))


@methods
def test_state_stable_under_cond(name):
    tx = optax.chain(METHODS[name](), optax.sgd(0.1))
    params = make_params()
    state = tx.init(params)
    grad_fn = lambda p: jax.grad(loss)(p, make_batch(0))

    @jax.jit
    def maybe_update(pred, state):
        return jax.lax.cond(
            pred,
            lambda s: tx.update(grad_fn(params), s, params, grad_fn=grad_fn)[1],
            lambda s: s,
            state,
        )

    for pred in (True, False, True):
        state = maybe_update(pred, state)
    assert int(state[0].count) == 2
