"""Eager validation of hyperparameters, shared by every factory.

Hyperparameters may be Python numbers, concrete arrays, traced arrays (inside
``optax.inject_hyperparams``) or schedules. Their *type* is always checked at
construction; their *value* only when it is known then (traced values and
schedules pass through, and the factories clip what a schedule returns).
"""

import math
import numbers
from typing import Any

import jax
import numpy as np
import optax


def concrete_float(value: Any) -> float | None:
    """Returns ``value`` as a Python float if it is known now, else ``None``."""
    if callable(value):
        return None
    try:
        return float(value)
    except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


def _check_not_none(owner: str, name: str, value: Any) -> None:
    if value is None:
        raise ValueError(f'{owner}: {name}=None is invalid; pass a number, an array or a schedule.')


def _is_number(value: Any) -> bool:
    """A real number or a scalar numeric array (concrete or traced), never a bool."""
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, numbers.Real):
        return True
    if isinstance(value, (np.ndarray, jax.Array)):
        return value.ndim == 0 and np.issubdtype(value.dtype, np.number)
    return False


def check_type(owner: str, name: str, value: Any, *, schedule: bool = True) -> None:
    """Raises a one-line ``ValueError`` unless ``value`` is a number (or a schedule)."""
    _check_not_none(owner, name, value)
    if _is_number(value) or (schedule and callable(value)):
        return
    allowed = 'a number, a scalar array or a schedule step -> value' if schedule else 'an int'
    raise ValueError(f'{owner}: {name}={value!r} has type {type(value).__name__}; pass {allowed}.')


def check_flag(owner: str, name: str, value: Any) -> None:
    """Raises a one-line ``ValueError`` unless ``value`` is a Python bool."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f'{owner}: {name}={value!r} is invalid; pass True or False.')


def check_range(
    owner: str,
    name: str,
    value: Any,
    *,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raises a one-line ``ValueError`` unless ``value`` lies in the interval."""
    check_type(owner, name, value)
    x = concrete_float(value)
    if x is None:
        return
    too_low = x <= low if low_open else x < low
    too_high = x >= high if high_open else x > high
    if math.isnan(x) or math.isinf(x) or too_low or too_high:
        left = '(' if low_open else '['
        right = ')' if high_open or math.isinf(high) else ']'
        high_text = 'inf' if math.isinf(high) else f'{high:g}'
        raise ValueError(
            f'{owner}: {name}={x!r} is invalid; expected a finite value in '
            f'{left}{low:g}, {high_text}{right}.'
        )


def check_positive_int(owner: str, name: str, value: Any) -> None:
    """Raises a one-line ``ValueError`` unless ``value`` is an integer >= 1."""
    check_type(owner, name, value, schedule=False)
    x = concrete_float(value)
    if x is None:
        return
    if math.isnan(x) or x < 1 or x != int(x):
        raise ValueError(f'{owner}: {name}={x:g} is invalid; expected an integer >= 1.')


def _is_masked(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def check_not_masked(owner: str, *trees: Any) -> None:
    """Refuses trees with ``optax.MaskedNode`` leaves: the link sits inside a mask.

    ``optax.masked`` and ``optax.multi_transform`` hand their inner transformation
    the params with the masked-out leaves replaced by ``MaskedNode``; a ``grad_fn``
    (the user's loss) cannot be evaluated on such a tree.
    """
    leaves = jax.tree.leaves(trees, is_leaf=_is_masked)
    if any(_is_masked(x) for x in leaves):
        raise ValueError(
            f'{owner}: params contain optax.MaskedNode, so the link sits inside optax.masked or '
            'optax.multi_transform; put it first, outside any mask, and freeze after it, e.g. '
            "optax.chain(link, optax.multi_transform({'train': base, 'frozen': "
            "optax.set_to_zero()}, labels)) (docs/recipes/freezing.md)."
        )


def check_gradient_tree(owner: str, out: Any, updates: Any, point: Any) -> None:
    """Checks at trace time that ``grad_fn(point)`` is shaped like the gradient.

    Each leaf must have the shape of the matching gradient leaf and the dtype of
    either the gradient or the point it was taken at.
    """
    if jax.tree.structure(out) != jax.tree.structure(updates):
        raise ValueError(
            f'{owner}: grad_fn returned a tree of structure {jax.tree.structure(out)}, '
            f'expected the structure of the gradient {jax.tree.structure(updates)}.'
        )
    paths = jax.tree_util.tree_flatten_with_path(updates)[0]
    for (path, u), o, p in zip(paths, jax.tree.leaves(out), jax.tree.leaves(point)):
        where = jax.tree_util.keystr(path) or '<root>'
        shape, dtype = np.shape(o), jax.numpy.result_type(o)
        if shape != np.shape(u):
            raise ValueError(
                f'{owner}: grad_fn returned shape {shape} at {where}, expected {np.shape(u)}; '
                'grad_fn(p) must return the gradient with respect to p, shaped like p.'
            )
        if dtype not in (jax.numpy.result_type(u), jax.numpy.result_type(p)):
            raise ValueError(
                f'{owner}: grad_fn returned dtype {dtype} at {where}, expected '
                f'{jax.numpy.result_type(p)} (the point it was called at) or '
                f'{jax.numpy.result_type(u)} (the gradient); return jax.grad of the loss at p.'
            )
