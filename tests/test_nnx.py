"""vasso_jax.nnx: both passes of a sharpness-aware step on an NNX model with BatchNorm + Dropout.

The reference is written without vasso_jax: nnx.split/merge + jax.grad for the two passes and
the VaSSO step in NumPy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

nnx = pytest.importorskip('flax.nnx')

import vasso_jax  # noqa: E402
import vasso_jax.nnx  # noqa: E402

RHO, THETA, LR = 0.2, 0.4, 0.1


class Net(nnx.Module):
    """Linear -> BatchNorm -> Dropout -> Linear; ``record`` sees every dropout mask drawn."""

    def __init__(self, rngs, record=None):
        self.lin1 = nnx.Linear(3, 6, rngs=rngs)
        self.bn = nnx.BatchNorm(6, momentum=0.5, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.lin2 = nnx.Linear(6, 2, rngs=rngs)
        self.record = record

    def __call__(self, x):
        h = self.bn(self.lin1(x))
        mask = self.drop(jnp.ones_like(h))
        if self.record is not None:
            jax.debug.callback(lambda m: self.record.append(np.asarray(m)), mask)
        return self.lin2(jnp.tanh(h) * mask)


def loss_fn(model, x, y):
    return jnp.mean((model(x) - y) ** 2)


def data(i=0):
    k1, k2 = jax.random.split(jax.random.key(i))
    return jax.random.normal(k1, (8, 3)), jax.random.normal(k2, (8, 2))


def make(record=None):
    model = Net(nnx.Rngs(0, dropout=1), record)
    tx = optax.chain(vasso_jax.vasso(rho=RHO, theta=THETA), optax.sgd(LR))
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


def step(model, optimizer, x, y):
    loss, grads, grad_fn = vasso_jax.nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads, grad_fn=grad_fn)
    return loss


def reference(model, batches):
    """Two passes by hand: pass 1 keeps its state updates, pass 2 starts from the old state."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.as_pure(params), nnx.as_pure(rest)

    def pure_loss(p, state, x, y):
        copy = nnx.merge(graphdef, p, state)
        value = loss_fn(copy, x, y)
        return value, nnx.as_pure(nnx.state(copy, nnx.Not(nnx.Param)))

    grad = jax.jit(jax.grad(pure_loss, has_aux=True))
    w = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    d = None
    for x, y in batches:
        g1, new_rest = grad(jax.tree.map(jnp.float32, w), rest, x, y)
        g1 = jax.tree.map(np.asarray, g1)
        d = g1 if d is None else jax.tree.map(lambda a, b: (1 - THETA) * a + THETA * b, d, g1)
        norm = np.sqrt(sum(np.sum(v**2) for v in jax.tree.leaves(d)))
        point = jax.tree.map(lambda a, v: jnp.float32(a + RHO * v / norm), w, d)
        g2, _ = grad(point, rest, x, y)  # the old state: same dropout key and BatchNorm input
        w = jax.tree.map(lambda a, b: a - LR * np.asarray(b), w, g2)
        rest = new_rest
    return w, rest


def numpy(x):
    is_key = jnp.issubdtype(getattr(x, 'dtype', None), jax.dtypes.prng_key)
    return np.asarray(jax.random.key_data(x) if is_key else x)


def assert_close(a, b, rtol=2e-5, atol=1e-6):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(numpy(x), numpy(y), rtol=rtol, atol=atol)


def test_update_equals_two_pass_reference():
    model, optimizer = make()
    batches = [data(0), data(1)]
    want_params, want_rest = reference(nnx.clone(model), batches)
    train_step = nnx.jit(step)
    for x, y in batches:
        train_step(model, optimizer, x, y)
    assert_close(nnx.as_pure(nnx.state(model, nnx.Param)), want_params)
    assert_close(nnx.as_pure(nnx.state(model, nnx.Not(nnx.Param))), want_rest, rtol=1e-6)


def test_batch_stats_move_once_and_pass_two_reuses_the_dropout_mask():
    masks = []
    model, optimizer = make(record=masks)
    once, _ = make()
    x, y = data()
    once(x)  # one forward pass in train mode
    train_step = nnx.jit(step)
    train_step(model, optimizer, x, y)
    np.testing.assert_allclose(model.bn.mean[...], once.bn.mean[...], rtol=1e-6)
    np.testing.assert_allclose(model.bn.var[...], once.bn.var[...], rtol=1e-6)
    assert not np.allclose(once.bn.mean[...], 0.0)
    assert len(masks) == 2  # pass 1 and pass 2
    np.testing.assert_array_equal(masks[0], masks[1])
    assert 0 < np.count_nonzero(masks[0]) < masks[0].size
    train_step(model, optimizer, x, y)
    assert len(masks) == 4
    np.testing.assert_array_equal(masks[2], masks[3])
    assert not np.array_equal(masks[0], masks[2])  # the stream advanced once per step


def test_grad_fn_accepts_states_dicts_and_subsets():
    model, _ = make()
    x, y = data()
    _, grads, grad_fn = vasso_jax.nnx.value_and_grad(loss_fn)(model, x, y)
    params = nnx.state(model, nnx.Param)
    pure = grad_fn(nnx.as_pure(params))
    assert jax.tree.structure(pure) == jax.tree.structure(nnx.as_pure(params))
    assert_close(grad_fn(params), pure)
    assert_close(grad_fn(nnx.to_pure_dict(params)), nnx.to_pure_dict(pure))
    head = grad_fn({'lin2': nnx.to_pure_dict(params)['lin2']})
    assert_close(head, {'lin2': nnx.to_pure_dict(pure)['lin2']})
    # at w itself and with the pre-step state, pass 2 reproduces pass 1's gradient
    assert_close(pure, nnx.as_pure(grads), rtol=1e-6)


def test_has_aux_and_a_narrower_wrt():
    model, _ = make()
    head = nnx.All(nnx.Param, nnx.PathContains('lin2'))
    tx = optax.chain(vasso_jax.sam(rho=RHO), optax.sgd(LR))
    optimizer = nnx.Optimizer(model, tx, wrt=head)
    before = nnx.as_pure(nnx.state(model, nnx.Param))
    x, y = data()

    def loss_with_aux(model, x, y):
        out = model(x)
        return jnp.mean((out - y) ** 2), {'out': out}

    vg = vasso_jax.nnx.value_and_grad(loss_with_aux, has_aux=True, wrt=head)
    (loss, aux), grads, grad_fn = vg(model, x, y)
    assert aux['out'].shape == (8, 2) and loss.shape == ()
    assert set(nnx.to_pure_dict(grads)) == {'lin2'}
    optimizer.update(model, grads, grad_fn=grad_fn)
    after = nnx.as_pure(nnx.state(model, nnx.Param))
    assert_close(after['lin1'], before['lin1'], rtol=0, atol=0)
    assert not np.allclose(after['lin2']['kernel'], before['lin2']['kernel'])


def test_unknown_param_path_is_one_line_error():
    model, _ = make()
    _, _, grad_fn = vasso_jax.nnx.value_and_grad(loss_fn)(model, *data())
    with pytest.raises(ValueError, match=r"^vasso_jax.nnx: grad_fn got a leaf at \['nope'\]"):
        grad_fn({'nope': jnp.zeros(3)})
