"""Multi-device checks, run by tests/test_multidevice.py in a process with 8 CPU devices.

Each check compares a data-parallel run against an independent single-device or
hand-written per-shard computation and raises AssertionError on a mismatch.
"""

import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import vasso_jax

N_DEV = 8
RHO = 0.3


def loss(params, x, y):
    h = jnp.tanh(x @ params['w'] + params['b'])
    return jnp.mean((h @ params['v'] - y) ** 2)


def data(seed=0, n=64):
    k = jax.random.split(jax.random.key(seed), 5)
    params = {
        'w': jax.random.normal(k[0], (6, 5)),
        'b': 0.1 * jax.random.normal(k[1], (5,)),
        'v': jax.random.normal(k[2], (5, 3)),
    }
    return params, jax.random.normal(k[3], (n, 6)), jax.random.normal(k[4], (n, 3))


def chain(link):
    return optax.chain(link, optax.add_decayed_weights(1e-3), optax.sgd(0.1, momentum=0.9))


def single_device(link, steps=3):
    params, x, y = data()
    tx = chain(link)
    state = tx.init(params)
    for _ in range(steps):
        gf = lambda p: jax.grad(loss)(p, x, y)
        u, state = tx.update(gf(params), state, params, grad_fn=gf)
        params = optax.apply_updates(params, u)
    return params


def close(a, b, tol=1e-5):
    for k in a:
        np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), rtol=tol, atol=tol)


def check_jit_named_sharding(mesh):
    for link in (vasso_jax.sam(RHO), vasso_jax.vasso(RHO, 0.4)):
        params, x, y = data()
        x = jax.device_put(x, NamedSharding(mesh, P('d')))
        y = jax.device_put(y, NamedSharding(mesh, P('d')))
        params = jax.device_put(params, NamedSharding(mesh, P()))
        tx = chain(link)
        state = tx.init(params)

        @jax.jit
        def step(params, state, x, y):
            gf = lambda p: jax.grad(loss)(p, x, y)
            u, state = tx.update(gf(params), state, params, grad_fn=gf)
            return optax.apply_updates(params, u), state

        for _ in range(3):
            params, state = step(params, state, x, y)
        assert x.sharding.spec == P('d')
        close(params, single_device(link))


def shard_map_run(mesh, link, user_casts):
    params, x, y = data()
    x = jax.device_put(x, NamedSharding(mesh, P('d')))
    y = jax.device_put(y, NamedSharding(mesh, P('d')))
    params = jax.device_put(params, NamedSharding(mesh, P()))
    tx = chain(link)
    state = jax.device_put(tx.init(params), NamedSharding(mesh, P()))

    def local_step(params, state, x, y):
        at = (lambda p: vasso_jax.device_varying(p, 'd')) if user_casts else (lambda p: p)
        gf = lambda p: jax.grad(loss)(at(p), x, y)
        u, state = tx.update(gf(params), state, params, grad_fn=gf)
        return optax.apply_updates(params, u), state

    step = jax.jit(
        jax.shard_map(
            local_step, mesh=mesh, in_specs=(P(), P(), P('d'), P('d')), out_specs=(P(), P())
        )
    )
    for _ in range(3):
        params, state = step(params, state, x, y)
    return params


def check_shard_map_global(mesh):
    for make in (
        lambda **kw: vasso_jax.sam(RHO, **kw),
        lambda **kw: vasso_jax.vasso(RHO, 0.4, **kw),
    ):
        want, link = single_device(make()), make(axis_name='d')
        # Both with the user's cast and without it (the replicated-params trap).
        close(shard_map_run(mesh, link, user_casts=True), want)
        close(shard_map_run(mesh, link, user_casts=False), want)


def check_pmap_global():
    params, x, y = data()
    tx = chain(vasso_jax.vasso(RHO, 0.4, axis_name='d'))
    state = tx.init(params)

    def local_step(params, state, x, y):
        gf = lambda p: jax.grad(loss)(p, x, y)
        u, state = tx.update(gf(params), state, params, grad_fn=gf)
        return optax.apply_updates(params, u), state

    step = jax.pmap(local_step, axis_name='d')
    rep = lambda t: jax.tree.map(lambda a: jnp.stack([a] * N_DEV), t)
    p, s = rep(params), rep(state)
    xs, ys = x.reshape(N_DEV, -1, 6), y.reshape(N_DEV, -1, 3)
    for _ in range(3):
        p, s = step(p, s, xs, ys)
    close(jax.tree.map(lambda a: a[0], p), single_device(vasso_jax.vasso(RHO, 0.4)))


def per_shard_reference(params, x, y):
    """Hand-written m-sharpness: each shard perturbs by its own gradient."""
    outs = []
    for xs, ys in zip(np.split(np.asarray(x), N_DEV), np.split(np.asarray(y), N_DEV)):
        g = jax.grad(loss)(params, xs, ys)
        n = np.sqrt(sum(float(jnp.sum(v**2)) for v in jax.tree.leaves(g)))
        point = jax.tree.map(lambda w, v: w + RHO * v / (n + 1e-12), params, g)
        outs.append(jax.grad(loss)(point, xs, ys))
    return jax.tree.map(lambda *v: np.mean(np.stack(v), axis=0), *outs)


def check_per_device_ascent(mesh):
    params, x, y = data()
    link = vasso_jax.sam(RHO, axis_name='d', ascent='per_device')
    xs = jax.device_put(x, NamedSharding(mesh, P('d')))
    ys = jax.device_put(y, NamedSharding(mesh, P('d')))
    ps = jax.device_put(params, NamedSharding(mesh, P()))

    def local(params, x, y, cast):
        at = (lambda p: vasso_jax.device_varying(p, 'd')) if cast else (lambda p: p)
        gf = lambda p: jax.grad(loss)(at(p), x, y)
        g, _ = link.update(gf(params), link.init(params), params, grad_fn=gf)
        return g

    run = lambda cast: jax.jit(
        jax.shard_map(
            lambda p, a, b: local(p, a, b, cast),
            mesh=mesh,
            in_specs=(P(), P('d'), P('d')),
            out_specs=P(),
        )
    )(ps, xs, ys)
    close(run(True), per_shard_reference(params, x, y))
    # Differs from the global ascent on the same batch: the option does something.
    global_g, _ = vasso_jax.sam(RHO).update(
        jax.grad(loss)(params, x, y),
        vasso_jax.sam(RHO).init(params),
        params,
        grad_fn=lambda p: jax.grad(loss)(p, x, y),
    )
    assert (
        max(
            float(jnp.max(jnp.abs(a - b)))
            for a, b in zip(jax.tree.leaves(run(True)), jax.tree.leaves(global_g))
        )
        > 1e-4
    )
    try:
        run(False)
    except ValueError as err:
        assert "vasso_jax.device_varying(params, 'd')" in str(err), err
    else:
        raise AssertionError('per-device ascent without per-device gradients must raise')


def check_per_device_vasso_state_is_replicated(mesh):
    # The adversary's state is averaged over devices: d_1 = mean of per-device gradients.
    params, x, y = data()
    link = vasso_jax.vasso(RHO, 0.4, axis_name='d', ascent='per_device')
    xs = jax.device_put(x, NamedSharding(mesh, P('d')))
    ys = jax.device_put(y, NamedSharding(mesh, P('d')))
    ps = jax.device_put(params, NamedSharding(mesh, P()))

    def local(params, x, y):
        gf = lambda p: jax.grad(loss)(vasso_jax.device_varying(p, 'd'), x, y)
        return link.update(gf(params), link.init(params), params, grad_fn=gf)

    step = jax.jit(
        jax.shard_map(local, mesh=mesh, in_specs=(P(), P('d'), P('d')), out_specs=(P(), P()))
    )
    g, state = step(ps, xs, ys)
    close(g, per_shard_reference(params, x, y))  # step 1: VaSSO's d_1 = g_1, as SAM
    close(optax.tree.get(state, 'd'), jax.grad(loss)(params, x, y))


def fsdp_data(seed=0, n=64):
    """Params whose every leaf has a leading dim divisible by the device count."""
    k = jax.random.split(jax.random.key(seed), 5)
    params = {
        'w': jax.random.normal(k[0], (16, 32)) / 4,
        'b': 0.1 * jax.random.normal(k[1], (32,)),
        'v': jax.random.normal(k[2], (32, 8)) / 6,
    }
    return params, jax.random.normal(k[3], (n, 16)), jax.random.normal(k[4], (n, 8))


def run_sharded(link, params, x, y, param_spec, steps=3):
    """Three jitted steps with params and optimiser state placed by ``param_spec``."""
    mesh = Mesh(np.array(jax.devices()), ('d',))
    placed = NamedSharding(mesh, param_spec)
    params = jax.device_put(params, placed)
    x, y = (jax.device_put(a, NamedSharding(mesh, P('d'))) for a in (x, y))
    tx = chain(link)
    state = tx.init(params)

    @jax.jit
    def step(params, state, x, y):
        gf = lambda p: jax.grad(loss)(p, x, y)
        u, state = tx.update(gf(params), state, params, grad_fn=gf)
        return optax.apply_updates(params, u), state

    for _ in range(steps):
        params, state = step(params, state, x, y)
    return params, state, placed


def check_fsdp_params_match_replicated():
    for make in (
        lambda: vasso_jax.sam(RHO),
        lambda: vasso_jax.vasso(RHO, 0.4, keep_perturbation=True),
    ):
        params, x, y = fsdp_data()
        sharded, state, placed = run_sharded(make(), params, x, y, P('d'))
        replicated, _, _ = run_sharded(make(), params, x, y, P())
        close(sharded, replicated)
        # The link's params-sized state (and the params) keep the params' sharding.
        kept = [optax.tree.get(state, 'd', None), optax.tree.get(state, 'perturbation')]
        for tree in (sharded, *[t for t in kept if t is not None]):
            for leaf in jax.tree.leaves(tree):
                assert leaf.sharding.is_equivalent_to(placed, leaf.ndim), leaf.sharding


def check_fsdp_ascent_gathers_no_params():
    # An elementwise gradient needs no communication of its own, so every collective in the
    # compiled step belongs to the link: scalar all-reduces (the norms), no all-gather.
    params, _, _ = fsdp_data()
    mesh = Mesh(np.array(jax.devices()), ('d',))
    params = jax.device_put(params, NamedSharding(mesh, P('d')))
    elementwise = lambda p: jax.tree.map(lambda w: 4 * w**3, p)
    for link in (vasso_jax.sam(RHO), vasso_jax.vasso(RHO, 0.4), vasso_jax.asam(0.5)):
        step = jax.jit(lambda g, s, p, link=link: link.update(g, s, p, grad_fn=elementwise))
        hlo = step.lower(elementwise(params), link.init(params), params).compile().as_text()
        assert 'all-gather' not in hlo, 'the ascent gathers sharded params'
        reduced = re.findall(r'= (.*?) all-reduce(?:-start)?\(', hlo)
        assert reduced, 'expected the global norm as an all-reduce'
        for shapes in reduced:
            assert re.fullmatch(r'\(?(\w+\[\](, (/\*index=\d+\*/)?)?)+\)?', shapes), shapes


def main():
    assert len(jax.devices()) == N_DEV, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ('d',))
    checks = [
        lambda: check_jit_named_sharding(mesh),
        lambda: check_shard_map_global(mesh),
        check_pmap_global,
        lambda: check_per_device_ascent(mesh),
        check_fsdp_params_match_replicated,
        check_fsdp_ascent_gathers_no_params,
    ]
    for check in checks:
        check()
    print('multidevice checks passed')


if __name__ == '__main__':
    sys.exit(main())
