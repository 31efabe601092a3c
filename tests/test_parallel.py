"""In-process shard_map checks on a one-device mesh (the 8-device ones run in a subprocess).

A one-device mesh still tracks which values vary over the axis, so the replicated-params
trap, the idempotent cast and the per-device checks all run here, where coverage sees them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import vasso_jax

MESH = Mesh(np.array(jax.devices()[:1]), ('d',))


def loss(w, x):
    return jnp.mean((x @ w - 1.0) ** 2)


def run(link, cast):
    w = jax.device_put(jnp.array([0.5, -1.0, 2.0]), NamedSharding(MESH, P()))
    x = jax.device_put(jnp.arange(12.0).reshape(4, 3) / 10, NamedSharding(MESH, P('d')))

    def local(w, x):
        at = (lambda p: vasso_jax.device_varying(p, 'd')) if cast else (lambda p: p)
        gf = lambda p: jax.grad(loss)(at(p), x)
        g, _ = link.update(gf(w), link.init(w), w, grad_fn=gf)
        return g

    return jax.jit(jax.shard_map(local, mesh=MESH, in_specs=(P(), P('d')), out_specs=P()))(w, x)


def reference(rho):
    w, x = jnp.array([0.5, -1.0, 2.0]), jnp.arange(12.0).reshape(4, 3) / 10
    g = jax.grad(loss)(w, x)
    return jax.grad(loss)(w + rho * g / jnp.linalg.norm(g), x)


@pytest.mark.parametrize('cast', [True, False], ids=['device_varying', 'replicated_trap'])
def test_global_ascent_in_shard_map(cast):
    got = run(vasso_jax.sam(0.1, axis_name='d'), cast)
    np.testing.assert_allclose(got, reference(0.1), rtol=1e-5)


def test_per_device_ascent_needs_per_device_gradients():
    link = vasso_jax.sam(0.1, axis_name='d', ascent='per_device')
    np.testing.assert_allclose(run(link, cast=True), reference(0.1), rtol=1e-5)
    with pytest.raises(ValueError, match=r"vasso_jax.device_varying\(params, 'd'\)"):
        run(link, cast=False)


def test_device_varying_is_idempotent_and_a_no_op_under_vmap():
    out = jax.vmap(lambda w: vasso_jax.device_varying(w, 'd'), axis_name='d')(jnp.ones((2, 3)))
    np.testing.assert_array_equal(out, jnp.ones((2, 3)))

    def twice(w):
        return vasso_jax.device_varying(vasso_jax.device_varying(w, 'd'), 'd')

    w = jax.device_put(jnp.ones(3), NamedSharding(MESH, P()))
    out = jax.jit(jax.shard_map(twice, mesh=MESH, in_specs=P(), out_specs=P('d')))(w)
    np.testing.assert_array_equal(out, jnp.ones(3))
