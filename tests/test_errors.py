"""Bad input: one-line ValueErrors that name the value and the valid range."""

import math

import jax
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
    (lambda: vasso_jax.sam(rho='0.1'), r"rho='0.1' has type str; pass a number"),
    (lambda: vasso_jax.sam(rho=[0.1]), r"rho=\[0.1\] has type list"),
    (lambda: vasso_jax.sam(rho={'a': 0.1}), r"has type dict"),
    (lambda: vasso_jax.sam(rho=True), r"rho=True has type bool"),
    (lambda: vasso_jax.sam(rho=np.array([0.1, 0.2])), r"has type ndarray"),
    (lambda: vasso_jax.vasso(theta='0.4'), r"theta='0.4' has type str"),
    (lambda: vasso_jax.asam(eta=b'1'), r"eta=b'1' has type bytes"),
    (lambda: vasso_jax.friendly_sam(lmbda=[0.9]), r"lmbda=\[0.9\] has type list"),
    (lambda: vasso_jax.sam(every_k='2'), r"every_k='2' has type str; pass an int"),
    (lambda: vasso_jax.sam(every_k=lambda step: 2), r"has type function; pass an int"),
    (lambda: vasso_jax.sam(adaptive='yes'), r"adaptive='yes' is invalid; pass True or False"),
    (lambda: vasso_jax.vasso(keep_perturbation=1), r"keep_perturbation=1 is invalid"),
    (lambda: vasso_jax.sam(ascent=['global']), r"ascent=\['global'\] is invalid"),
    (
        lambda: vasso_jax.sam(ascent='per_device'),
        r"ascent='per_device' needs axis_name=\.\.\.",
    ),
    (lambda: vasso_jax.sam(perturbed_dtype=jnp.int32), r"perturbed_dtype=.* is invalid"),
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


def test_grad_fn_with_wrong_leaf_shape_names_the_leaf():
    tx = vasso_jax.sam()
    w = {'a': jnp.ones(2), 'b': {'c': jnp.ones((3, 2))}}
    bad = lambda p: {'a': p['a'], 'b': {'c': p['b']['c'].T}}
    step = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=bad))
    with pytest.raises(ValueError, match=r"grad_fn returned shape \(2, 3\) at \['b'\]\['c'\]"):
        step(w, tx.init(w), w)


def test_grad_fn_with_wrong_leaf_dtype_names_the_leaf():
    tx = vasso_jax.vasso()
    w = {'a': jnp.ones(2), 'b': jnp.ones(3)}
    bad = lambda p: {'a': p['a'], 'b': p['b'].astype(jnp.int32)}
    with pytest.raises(ValueError, match=r"grad_fn returned dtype int32 at \['b'\], expected"):
        tx.update(w, tx.init(w), w, grad_fn=bad)


@pytest.mark.parametrize(
    'wrap',
    [
        lambda link: optax.masked(link, {'a': True, 'b': False}),
        lambda link: optax.multi_transform(
            {'sharp': link, 'frozen': optax.set_to_zero()}, {'a': 'sharp', 'b': 'frozen'}
        ),
    ],
    ids=['masked', 'multi_transform'],
)
def test_link_inside_a_mask_refuses_in_one_line(wrap):
    tx = wrap(vasso_jax.sam(0.1))
    w = {'a': jnp.ones(2), 'b': jnp.ones(3)}
    with pytest.raises(ValueError, match=r'params contain optax.MaskedNode.*set_to_zero') as err:
        tx.update(w, tx.init(w), w, grad_fn=lambda p: p)
    assert '\n' not in str(err.value)


def test_hyperparameter_errors_inside_inject_hyperparams_stay_lazy():
    # Traced values pass construction; inject_hyperparams still works.
    tx = optax.inject_hyperparams(vasso_jax.vasso)(rho=0.1, theta=0.4)
    w = jnp.ones(3)
    u, _ = jax.jit(lambda s: tx.update(w, s, w, grad_fn=lambda p: p))(tx.init(w))
    assert u.shape == (3,)
