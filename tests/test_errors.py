"""Bad input: one-line ValueErrors that name the value and the valid range."""

import math

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import vasso_jax

BAD_HYPERPARAMETERS = [
    (
        lambda: vasso_jax.sam(rho=-0.1),
        r"rho=-0.1 is invalid; expected a finite value in \[0, inf\)",
    ),
    (lambda: vasso_jax.sam(rho=math.inf), r"rho=inf is invalid"),
    (lambda: vasso_jax.vasso(rho=math.nan), r"rho=nan is invalid"),
    (
        lambda: vasso_jax.vasso(theta=0.0),
        r"theta=0.0 is invalid; expected a finite value in \(0, 1\]",
    ),
    (lambda: vasso_jax.vasso(theta=1.5), r"theta=1.5 is invalid"),
    (lambda: vasso_jax.vasso(theta=math.nan), r"theta=nan is invalid"),
    (lambda: vasso_jax.vasso(theta=np.float32(-1)), r"theta=-1.0 is invalid"),
    (
        lambda: vasso_jax.asam(eta=-0.01),
        r"eta=-0.01 is invalid; expected a finite value in \[0, inf\)",
    ),
    (lambda: vasso_jax.sam(eps=0.0), r"eps=0.0 is invalid; expected a finite value in \(0, inf\)"),
    (lambda: vasso_jax.sam(every_k=0), r"every_k=0 is invalid; expected an integer >= 1"),
    (lambda: vasso_jax.sam(every_k=1.5), r"every_k=1.5 is invalid"),
    (lambda: vasso_jax.sam(ascent='local'), r"ascent='local' is invalid; expected one of"),
    (lambda: vasso_jax.friendly_sam(sigma=2.0), r"sigma=2.0 is invalid"),
    (
        lambda: vasso_jax.friendly_sam(lmbda=1.0),
        r"lmbda=1.0 is invalid; expected a finite value in \[0, 1\)",
    ),
    (lambda: vasso_jax.sharpness_aware(0.1, direction='sam'), r"direction must be an optax"),
    (lambda: vasso_jax.sam(rho=None), r"rho=None is invalid; pass a number"),
    (lambda: vasso_jax.vasso(every_k=None), r"every_k=None is invalid"),
]


@pytest.mark.parametrize('make,message', BAD_HYPERPARAMETERS)
def test_bad_hyperparameters_fail_at_construction(make, message):
    with pytest.raises(ValueError, match=message) as err:
        make()
    assert '\n' not in str(err.value)


def test_array_hyperparameters_are_checked_too():
    with pytest.raises(ValueError, match='rho'):
        vasso_jax.sam(rho=jnp.asarray(-1.0))


def test_missing_grad_fn():
    tx = vasso_jax.vasso()
    w = jnp.ones(2)
    with pytest.raises(ValueError, match=r'update\(\) needs grad_fn='):
        tx.update(w, tx.init(w), w)


def test_missing_params():
    tx = vasso_jax.sam()
    w = jnp.ones(2)
    with pytest.raises(ValueError, match=r'update\(\) needs params='):
        tx.update(w, tx.init(w), grad_fn=lambda p: p)


def test_missing_grad_fn_in_a_chain():
    tx = optax.chain(vasso_jax.sam(), optax.sgd(0.1))
    w = jnp.ones(2)
    with pytest.raises(ValueError, match='grad_fn'):
        tx.update(w, tx.init(w), w)


def test_grad_fn_with_wrong_structure():
    tx = vasso_jax.sam()
    w = {'a': jnp.ones(2), 'b': jnp.ones(3)}
    with pytest.raises(ValueError, match='grad_fn returned a tree of structure'):
        tx.update(w, tx.init(w), w, grad_fn=lambda p: p['a'])
