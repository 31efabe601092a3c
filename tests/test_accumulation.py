"""microbatched: both passes averaged over micro-batches equal the full-batch step."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import vasso_jax
from tests import reference

LR, MOMENTUM, WD, K = 0.1, 0.9, 1e-3, 4


def jax_loss(params, batch):
    h = jnp.tanh(batch['x'] @ params['w1'] + params['b1'])
    r = h @ params['w2'] - batch['y']
    return 0.5 * jnp.mean(jnp.sum(r**2, axis=1))


@pytest.mark.parametrize(
    'method,link,kwargs',
    [
        ('sam', vasso_jax.sam(rho=0.2), dict(rho=0.2)),
        ('vasso', vasso_jax.vasso(rho=0.2, theta=0.4), dict(rho=0.2, theta=0.4)),
    ],
)
def test_micro_batched_steps_equal_full_batch_reference(method, link, kwargs):
    params, x, y = reference.make_problem()
    idx = reference.batches(3)
    want = reference.run(method, params, x, y, idx, lr=LR, momentum=MOMENTUM, wd=WD, **kwargs)

    tx = optax.chain(link, optax.add_decayed_weights(WD), optax.sgd(LR, momentum=MOMENTUM))
    grad = vasso_jax.microbatched(jax.grad(jax_loss), K)

    @jax.jit
    def step(p, state, batch):
        updates, state = tx.update(grad(p, batch), state, p, grad_fn=lambda q: grad(q, batch))
        return optax.apply_updates(p, updates), state

    p = jax.tree.map(jnp.float32, params)
    state = tx.init(p)
    for b in idx:
        p, state = step(p, state, {'x': jnp.float32(x[b]), 'y': jnp.float32(y[b])})
    for k in reference.LEAVES:
        np.testing.assert_allclose(np.asarray(p[k]), want[k], rtol=2e-5, atol=2e-6)


def test_value_aux_and_several_batch_arguments():
    params, x, y = reference.make_problem()
    params = jax.tree.map(jnp.float32, params)
    x, y = jnp.float32(x[:16]), jnp.float32(y[:16])

    def loss_and_aux(p, x, scale, y):
        value = scale * jax_loss(p, {'x': x, 'y': y})
        return value, {'first_y': y[0]}

    fun = jax.value_and_grad(loss_and_aux, has_aux=True)
    (loss, aux), grads = vasso_jax.microbatched(fun, K, argnums=(1, 3))(params, x, 2.0, y)
    (want_loss, _), want_grads = fun(params, x, 2.0, y)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    np.testing.assert_allclose(aux['first_y'], y[:K].mean(axis=0), rtol=1e-6)  # strided, averaged
    for k in reference.LEAVES:
        np.testing.assert_allclose(grads[k], want_grads[k], rtol=1e-5, atol=1e-7)


def test_one_micro_batch_is_the_function_itself():
    fun = lambda w, b: w * b.sum()
    assert vasso_jax.microbatched(fun, 1)(2.0, jnp.ones(3)) == 6.0


def test_bf16_output_keeps_its_dtype():
    fun = lambda w, b: (w * b).sum(axis=0)
    out = vasso_jax.microbatched(fun, 2)(jnp.bfloat16(1.0), jnp.ones((4, 3), jnp.bfloat16))
    assert out.dtype == jnp.bfloat16 and out.shape == (3,)


@pytest.mark.parametrize(
    'k,args,match',
    [
        (0, (1.0, jnp.ones(4)), r'^microbatched: num_micro_batches=0 is invalid'),
        (3, (1.0, jnp.ones(4)), r'^microbatched: a batch leaf of shape \(4,\) .* pick a divisor'),
        (2, (1.0, jnp.ones(())), r'^microbatched: a batch leaf of shape \(\) \(a scalar'),
        (2, (jnp.ones(4),), r'^microbatched: argnums=1 but the function got 1 positional'),
        (2, (jnp.int32(1), jnp.ones(4)), r'^microbatched: fun returned a leaf of dtype int32'),
    ],
)
def test_errors_are_one_line(k, args, match):
    with pytest.raises(ValueError, match=match) as info:
        vasso_jax.microbatched(lambda w, b=None: jnp.asarray(w), k)(*args)
    assert '\n' not in str(info.value)


def test_multisteps_around_the_link_is_not_the_full_batch_step():
    # Why microbatched exists: MultiSteps evaluates pass 2 on the last micro-batch only.
    params, x, y = reference.make_problem()
    params = jax.tree.map(jnp.float32, params)
    batch = {'x': jnp.float32(x[:16]), 'y': jnp.float32(y[:16])}
    micro = jax.tree.map(lambda a: a.reshape(K, 4, *a.shape[1:]), batch)
    tx = optax.chain(vasso_jax.sam(rho=0.5), optax.sgd(1.0))
    grad = jax.grad(jax_loss)
    full, _ = tx.update(
        grad(params, batch), tx.init(params), params, grad_fn=lambda q: grad(q, batch)
    )
    multi = optax.MultiSteps(tx, every_k_schedule=K)
    state = multi.init(params)
    for i in range(K):
        mb = jax.tree.map(lambda a: a[i], micro)
        out, state = multi.update(grad(params, mb), state, params, grad_fn=lambda q: grad(q, mb))
    gap = max(
        float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(full))
    )
    assert gap > 1e-2


SHARDED_CHECK = """
import jax, jax.numpy as jnp, numpy as np
import vasso_jax
mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
loss = lambda w, b: jnp.mean((b['x'] @ w - b['y']) ** 2)
b = {'x': jax.random.normal(jax.random.key(0), (64, 5)), 'y': jnp.ones(64)}
b, w = jax.device_put(b, batch_sharding), jnp.ones(5)
grad = jax.jit(vasso_jax.microbatched(jax.grad(loss), 4))
hlo = grad.lower(w, b).compile().as_text()
assert 'all-gather' not in hlo and 'all-to-all' not in hlo, 'the split moved the batch'
np.testing.assert_allclose(grad(w, b), jax.jit(jax.grad(loss))(w, b), rtol=1e-5)
print('sharded ok')
"""


@pytest.mark.slow
def test_a_batch_sharded_over_devices_splits_without_communication():
    env = dict(
        os.environ, JAX_NUM_CPU_DEVICES='8', JAX_PLATFORMS='cpu'
    )
    proc = subprocess.run(
        [sys.executable, '-c', SHARDED_CHECK],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and 'sharded ok' in proc.stdout, proc.stderr[-3000:]
