"""Eager validation of hyperparameters, shared by every factory.

Hyperparameters may be Python numbers, concrete arrays, traced arrays (inside
``optax.inject_hyperparams``) or schedules. Only values that are known at
construction time can be checked; traced values and schedules pass through.
"""

import math
from typing import Any

import jax


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
    _check_not_none(owner, name, value)
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
    _check_not_none(owner, name, value)
    x = concrete_float(value)
    if x is None:
        return
    if math.isnan(x) or x < 1 or x != int(x):
        raise ValueError(f'{owner}: {name}={x:g} is invalid; expected an integer >= 1.')
