"""One-pass links: the NumPy reference, unperturbed_params, and the optax contract."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import vasso_jax
from tests import reference, reference_one_pass
from tests.test_contract import assert_trees_equal, loss, make_batch, make_params

NUM_STEPS = 30
LR, MOMENTUM, WD = 0.1, 0.9, 1e-3
RHO, THETA = 0.2, 0.4


def base():
    return optax.chain(optax.add_decayed_weights(WD), optax.sgd(LR, momentum=MOMENTUM))


METHODS = {
    'vasso': lambda **kw: vasso_jax.one_pass_vasso(base(), rho=RHO, theta=THETA, **kw),
    'msam': lambda **kw: vasso_jax.one_pass_momentum_sam(base(), rho=RHO, **kw),
}
methods = pytest.mark.parametrize('name', sorted(METHODS))


def reference_loss(params, x, y):
    h = jnp.tanh(x @ params['w1'] + params['b1'])
    return 0.5 * jnp.mean(jnp.sum((h @ params['w2'] - y) ** 2, axis=1))


def make_step(tx, loss_fn=loss, **extra):
    def step(params, state, *batch):
        updates, state = tx.update(jax.grad(loss_fn)(params, *batch), state, params, **extra)
        return optax.apply_updates(params, updates), state

    return step


def run(tx, num_steps=4, jit=True, dtype=jnp.float32, **extra):
    step = jax.jit(make_step(tx, **extra)) if jit else make_step(tx, **extra)
    params = make_params(dtype)
    state = tx.init(params)
    for i in range(num_steps):
        params, state = step(params, state, make_batch(i, dtype))
    return params, state


@pytest.fixture(scope='module')
def problem():
    params, x, y = reference.make_problem()
    return params, x, y, reference.batches(NUM_STEPS)


def assert_close(got, want, rtol=2e-5):
    for k in reference.LEAVES:
        np.testing.assert_allclose(
            np.asarray(got[k], np.float64), want[k], rtol=rtol, atol=rtol * np.abs(want[k]).max()
        )


def train_and_compare(tx, problem, expected, set_rho=None):
    params, x, y, idx = problem
    p = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), params)
    state = tx.init(p)
    step = jax.jit(make_step(tx, reference_loss))
    for t, b in enumerate(idx):
        if set_rho is not None:
            rho = jnp.asarray(set_rho[t], jnp.float32)
            state = state._replace(hyperparams={**state.hyperparams, 'rho': rho})
        p, state = step(p, state, jnp.asarray(x[b], jnp.float32), jnp.asarray(y[b], jnp.float32))
        want = expected[t]
        np.testing.assert_allclose(
            float(optax.tree.get(state, 'grad_norm')), want['grad_norm'], rtol=2e-5
        )
        np.testing.assert_allclose(
            float(optax.tree.get(state, 'cosine')), want['cosine'], rtol=2e-5, atol=1e-6
        )
        if t % 5 == 4:
            assert_close(p, want['held'])
            assert_close(jax.jit(vasso_jax.unperturbed_params)(p, state), want['w'])
    assert_close(vasso_jax.unperturbed_params(p, state), expected[-1]['w'])


@methods
def test_matches_numpy_reference(problem, name):
    params, x, y, idx = problem
    expected = reference_one_pass.run(name, params, x, y, idx, rhos=[RHO] * NUM_STEPS, theta=THETA)
    train_and_compare(METHODS[name](), problem, expected)


def test_rho_schedule_uses_the_next_step(problem):
    params, x, y, idx = problem
    schedule = optax.linear_schedule(0.0, 0.3, 10)
    rhos = [float(schedule(t + 1)) for t in range(NUM_STEPS)]
    expected = reference_one_pass.run('vasso', params, x, y, idx, rhos=rhos, theta=THETA)
    train_and_compare(
        vasso_jax.one_pass_vasso(base(), rho=schedule, theta=THETA), problem, expected
    )


def test_injected_rho_changed_between_steps_keeps_w_exact(problem):
    # The held perturbation keeps the rho it was made with, so changing rho mid-run
    # never shifts the recovered w_t (a recomputation from the new rho would).
    params, x, y, idx = problem
    rhos = [0.05 * (1 + t % 4) for t in range(NUM_STEPS)]
    expected = reference_one_pass.run('vasso', params, x, y, idx, rhos=rhos, theta=THETA)
    tx = optax.inject_hyperparams(vasso_jax.one_pass_vasso)(base(), rho=0.1, theta=THETA)
    train_and_compare(tx, problem, expected, set_rho=rhos)


@methods
def test_rho_zero_is_the_base_optimiser_exactly(name):
    one_pass = {'vasso': vasso_jax.one_pass_vasso, 'msam': vasso_jax.one_pass_momentum_sam}[name]
    assert_trees_equal(run(one_pass(base(), rho=0.0))[0], run(base())[0])


@methods
def test_zero_gradients_give_no_nan(name):
    tx = METHODS[name]()
    params = make_params()
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    for g in (zeros, jax.tree.map(jnp.ones_like, params), zeros, zeros):
        updates, state = jax.jit(tx.update)(g, state, params)
        params = optax.apply_updates(params, updates)
        for x in jax.tree.leaves((params, state, vasso_jax.unperturbed_params(params, state))):
            assert np.all(np.isfinite(np.asarray(x)))


def test_first_step_is_unperturbed_and_the_second_perturbed():
    tx = vasso_jax.one_pass_vasso(optax.sgd(0.1), rho=0.5, theta=0.4)
    params = {'w': jnp.zeros(2)}
    state = tx.init(params)
    g = {'w': jnp.array([3.0, 4.0])}
    updates, state = tx.update(g, state, params)
    # u_1 = -0.1 g; epsilon_2 = 0.5 g / ||g||; the held params are w_2 + epsilon_2.
    np.testing.assert_allclose(updates['w'], [-0.3 + 0.3, -0.4 + 0.4], atol=1e-7)
    np.testing.assert_allclose(vasso_jax.unperturbed_params(params, state)['w'], [-0.3, -0.4])


@pytest.mark.parametrize(
    'wrap',
    [
        lambda tx: tx,
        lambda tx: optax.chain(optax.clip_by_global_norm(10.0), tx),
        lambda tx: optax.MultiSteps(tx, every_k_schedule=2),
    ],
    ids=['plain', 'chain', 'multisteps'],
)
def test_unperturbed_params_found_in_nested_states(wrap):
    tx = wrap(vasso_jax.one_pass_vasso(optax.sgd(0.1), rho=0.1))
    params, state = run(tx, num_steps=4)
    w = vasso_jax.unperturbed_params(params, state)
    [inner] = [
        s
        for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, vasso_jax.OnePassState))
        if isinstance(s, vasso_jax.OnePassState)
    ]
    assert float(inner.scale) > 0
    for p, v, d in zip(*map(jax.tree.leaves, (params, w, inner.direction))):
        np.testing.assert_allclose(p - v, inner.scale * d, rtol=1e-5, atol=1e-6)


def test_unperturbed_params_without_a_one_pass_state_fails():
    params = make_params()
    with pytest.raises(ValueError, match='holds 0 one-pass states, expected exactly one'):
        vasso_jax.unperturbed_params(params, optax.sgd(0.1).init(params))


def test_resume_from_host_copies_is_bitwise():
    tx = METHODS['vasso']()
    step = jax.jit(make_step(tx))
    params = make_params()
    state = tx.init(params)
    for i in range(3):
        params, state = step(params, state, make_batch(i))
    saved = jax.device_get((params, state))
    p1, s1 = params, state
    p2, s2 = jax.tree.map(jnp.asarray, saved)
    for i in range(3, 6):
        p1, s1 = step(p1, s1, make_batch(i))
        p2, s2 = step(p2, s2, make_batch(i))
    assert_trees_equal((p1, s1), (p2, s2))


# The optax contract (tests/test_contract.py), adapted: one gradient, no grad_fn.


@methods
def test_extra_args_are_ignored(name):
    tx = METHODS[name]()
    assert_trees_equal(run(tx, grad_fn=lambda p: p, unrelated=3), run(tx))


@methods
def test_jit_equals_no_jit(name):
    tx = METHODS[name]()
    assert_trees_equal(run(tx, jit=True), run(tx, jit=False), rtol=1e-5)


@methods
def test_compiles_once(name):
    step = jax.jit(make_step(METHODS[name]()))
    params = make_params()
    state = METHODS[name]().init(params)
    for i in range(4):
        params, state = step(params, state, make_batch(i))
    assert step._cache_size() == 1


@methods
def test_state_holds_one_buffer_more_than_the_base(name):
    params = make_params()

    def count(state):
        leaves = jax.tree.leaves(state)
        assert all(isinstance(x, jax.Array) for x in leaves)
        scalars = [x for x in leaves if x.ndim == 0]
        assert {x.dtype for x in scalars} <= {jnp.dtype('int32'), jnp.dtype('float32')}
        return (len(leaves) - len(scalars)) // len(jax.tree.leaves(params))

    assert count(METHODS[name]().init(params)) == count(base().init(params)) + 1


@methods
def test_map_params(name):
    tx = METHODS[name]()
    state = run(tx, num_steps=2)[1]
    mapped = optax.tree.map_params(tx, lambda p: p + 1.0, state)
    assert jax.tree.structure(mapped) == jax.tree.structure(state)


@pytest.mark.parametrize('hyperparam', ['rho', 'theta'])
def test_inject_hyperparams_gives_identical_updates(hyperparam):
    plain = vasso_jax.one_pass_vasso(base(), rho=RHO, theta=THETA)
    injected = optax.inject_hyperparams(vasso_jax.one_pass_vasso)(base(), rho=RHO, theta=THETA)
    (p1, s1), (p2, s2) = run(plain), run(injected)
    assert_trees_equal(p1, p2, rtol=1e-6)
    assert_trees_equal(
        vasso_jax.unperturbed_params(p1, s1),
        vasso_jax.unperturbed_params(p2, s2),
        rtol=1e-6,
    )
    changed = s2._replace(hyperparams={**s2.hyperparams, hyperparam: jnp.asarray(0.9)})
    step = jax.jit(make_step(injected))
    assert not np.allclose(
        step(p2, changed, make_batch(9))[0]['w'], step(p2, s2, make_batch(9))[0]['w']
    )


@methods
def test_inside_multisteps(name):
    # Two identical micro-batches accumulate to the batch gradient: one inner step per two calls.
    inner = METHODS[name]()
    multi = optax.MultiSteps(inner, every_k_schedule=2)
    p_multi, s_multi = make_params(), multi.init(make_params())
    p_plain, s_plain = make_params(), inner.init(make_params())
    m_step, i_step = jax.jit(make_step(multi)), jax.jit(make_step(inner))
    for i in range(3):
        batch = make_batch(i)
        p_multi, s_multi = m_step(p_multi, s_multi, batch)
        p_multi, s_multi = m_step(p_multi, s_multi, batch)
        p_plain, s_plain = i_step(p_plain, s_plain, batch)
    assert_trees_equal(p_multi, p_plain, rtol=1e-6)


@methods
def test_bf16_dtypes_kept(name):
    tx = METHODS[name]()
    params, state = run(tx, dtype=jnp.bfloat16)
    updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    w = vasso_jax.unperturbed_params(params, state)
    for tree in (params, updates, w, state.direction):
        assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(tree))
    assert all(np.all(np.isfinite(np.asarray(x, np.float32))) for x in jax.tree.leaves(params))


@methods
def test_state_stable_under_cond(name):
    tx = METHODS[name]()
    params = make_params()
    grads = jax.grad(loss)(params, make_batch(0))

    @jax.jit
    def maybe_update(pred, state):
        return jax.lax.cond(pred, lambda s: tx.update(grads, s, params)[1], lambda s: s, state)

    state = tx.init(params)
    for pred in (True, False, True):
        state = maybe_update(pred, state)
    assert int(state.count) == 2


BAD = [
    (lambda: vasso_jax.one_pass_vasso(base(), rho=-0.1), r'one_pass_vasso: rho=-0.1 is invalid'),
    (lambda: vasso_jax.one_pass_vasso(base(), theta=0.0), r'theta=0.0 is invalid; expected'),
    (lambda: vasso_jax.one_pass_vasso(base(), theta=1.5), r'theta=1.5 is invalid'),
    (lambda: vasso_jax.one_pass_vasso(base(), eps=0.0), r'eps=0.0 is invalid'),
    (lambda: vasso_jax.one_pass_momentum_sam(base(), rho=float('nan')), r'rho=nan is invalid'),
    (lambda: vasso_jax.one_pass_vasso(optax.sgd), r'base must be an optax.GradientTransformation'),
    (lambda: vasso_jax.one_pass(base(), 'vasso', 0.1), r'direction must be a function'),
]


@pytest.mark.parametrize('make,message', BAD)
def test_bad_hyperparameters_fail_at_construction(make, message):
    with pytest.raises(ValueError, match=message) as err:
        make()
    assert '\n' not in str(err.value)


def test_update_without_params_fails():
    tx = METHODS['vasso']()
    params = make_params()
    with pytest.raises(ValueError, match=r'update\(\) needs params='):
        tx.update(params, tx.init(params))


@pytest.mark.parametrize('jit', [False, True], ids=['eager', 'jit'])
def test_unperturbed_params_is_bitwise_the_w_the_base_steps(jit):
    # With base u = g + 1.0 * w and g = 0, Momentum-SAM's direction is u = w_t exactly:
    # the w_t that update() recovered and handed to the base optimiser.
    tx = vasso_jax.one_pass_momentum_sam(optax.add_decayed_weights(1.0), rho=0.3)
    step = jax.jit(make_step(tx))
    params = make_params()
    state = tx.init(params)
    for i in range(3):
        params, state = step(params, state, make_batch(i))
    recover = jax.jit(vasso_jax.unperturbed_params) if jit else vasso_jax.unperturbed_params
    w = recover(params, state)
    _, after = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), state, params)
    assert float(state.scale) > 0
    assert_trees_equal(w, after.direction)


def test_a_skipped_non_finite_step_changes_nothing():
    # apply_if_finite keeps the inner state and returns zero updates: held params and
    # state stay consistent, so the run continues as if the bad batch never came.
    tx = optax.apply_if_finite(METHODS['vasso'](), max_consecutive_errors=3)
    step = jax.jit(make_step(tx))
    params = make_params()
    state = tx.init(params)
    for i in range(3):
        params, state = step(params, state, make_batch(i))
    bad = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), params)
    updates, skipped = jax.jit(tx.update)(bad, state, params)
    assert_trees_equal(optax.apply_updates(params, updates), params)
    assert_trees_equal(skipped.inner_state, state.inner_state)
    assert_trees_equal(
        vasso_jax.unperturbed_params(params, skipped), vasso_jax.unperturbed_params(params, state)
    )
