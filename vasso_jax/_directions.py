"""Adversaries: the direction in which a sharpness-aware method perturbs.

A direction is an ``optax.GradientTransformation`` whose ``update`` receives
the minibatch gradient ``g_t`` at the current weights and returns the raw
(unnormalised) ascent direction ``d_t``. The engine
(:func:`vasso_jax.sharpness_aware`) normalises it to the radius ``rho``. A new
adversary is therefore one small factory plus its test.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from vasso_jax import _checks


def _precision(*xs) -> jnp.dtype:
    """Arithmetic precision for mixing ``xs``: the widest of them, at least float32."""
    return jnp.result_type(jnp.float32, *(x.dtype for x in xs))


def gradient_direction() -> optax.GradientTransformation:
    r"""SAM's adversary: the minibatch gradient itself, :math:`d_t = g_t`.

    Returns:
      A stateless ``optax.GradientTransformation``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import vasso_jax
      >>> direction = vasso_jax.gradient_direction()
      >>> d, _ = direction.update({'w': jnp.array([3.0, 4.0])}, direction.init(None))
      >>> print(d['w'])
      [3. 4.]

    References:
      Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
      Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021.
    """
    return optax.identity()


class VassoDirectionState(NamedTuple):
    """State of :func:`vasso_direction`: ``d`` is the variance-suppressed direction."""

    count: jax.Array  # int32 scalar: number of gradients seen so far.
    d: optax.Updates


def vasso_direction(
    theta: optax.ScalarOrSchedule = 0.4, *, dtype: jax.typing.DTypeLike | None = None
) -> optax.GradientTransformation:
    r"""VaSSO's adversary: an exponential moving average of gradients.

    .. math::

      d_1 = g_1, \qquad d_t = (1 - \theta)\, d_{t-1} + \theta\, g_t .

    The average starts from the first gradient itself (not from zero), as in
    the official code, so ``theta = 1`` is exactly SAM's direction.

    Args:
      theta: weight of the newest gradient, in ``(0, 1]``; a float, an array or
        a schedule ``step -> theta`` evaluated on the number of gradients seen. What a
        schedule (or a traced value) gives is clipped into ``[0, 1]``; 0 keeps ``d``.
      dtype: dtype of the stored direction; ``None`` keeps the params' dtype. The
        average is computed in the wider of ``d``'s and the gradient's precision, at
        least float32, so float64 params keep a float64 ``d`` and ``d_1 = g_1`` exactly.

    Returns:
      An ``optax.GradientTransformation`` holding one params-sized buffer.

    Examples:
      >>> import jax.numpy as jnp
      >>> import vasso_jax
      >>> direction = vasso_jax.vasso_direction(theta=0.5)
      >>> state = direction.init({'w': jnp.zeros(2)})
      >>> d, state = direction.update({'w': jnp.array([2.0, 0.0])}, state)
      >>> d, state = direction.update({'w': jnp.array([0.0, 2.0])}, state)
      >>> print(d['w'])
      [1. 1.]

    References:
      Li & Giannakis, `Enhancing Sharpness-Aware Optimization Through Variance
      Suppression <https://arxiv.org/abs/2309.15639>`_, NeurIPS 2023.
    """
    _checks.check_range('vasso_direction', 'theta', theta, low=0.0, high=1.0, low_open=True)

    def init_fn(params):
        d = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=dtype), params)
        return VassoDirectionState(count=jnp.zeros([], jnp.int32), d=d)

    def update_fn(updates, state, params=None):
        del params
        th = theta
        if _checks.concrete_float(theta) is None:  # schedules, traced values: clip into [0, 1]
            th = jnp.clip(theta(state.count) if callable(theta) else theta, 0.0, 1.0)
        first = state.count == 0

        def ema(d, g):
            dt = _precision(d, g)
            new = (1.0 - th) * d.astype(dt) + th * g.astype(dt)
            return jnp.where(first, g.astype(dt), new).astype(d.dtype)

        d = jax.tree.map(ema, state.d, updates)
        count = optax.safe_increment(state.count)
        return d, VassoDirectionState(count=count, d=d)

    return optax.GradientTransformation(init_fn, update_fn)


class FriendlyDirectionState(NamedTuple):
    """State of :func:`friendly_direction`: ``m`` is the gradient momentum."""

    count: jax.Array  # int32 scalar
    m: optax.Updates


def friendly_direction(
    sigma: jax.typing.ArrayLike = 1.0, lmbda: jax.typing.ArrayLike = 0.9
) -> optax.GradientTransformation:
    r"""Friendly-SAM's adversary: the gradient minus its full-batch estimate.

    .. math::

      d_1 = g_1,\ m_1 = g_1; \qquad
      d_t = g_t - \sigma\, m_{t-1},\quad m_t = \lambda\, m_{t-1} + (1-\lambda)\, g_t .

    The momentum ``m`` estimates the full gradient; removing it keeps only the
    batch-specific component of ``g_t``, as in the official F-SAM code (which
    subtracts the momentum *before* updating it).

    Args:
      sigma: how much of the momentum to remove, in ``[0, 1]``.
      lmbda: momentum coefficient, in ``[0, 1)``.

    Returns:
      An ``optax.GradientTransformation`` holding one params-sized buffer.

    Examples:
      >>> import jax.numpy as jnp
      >>> import vasso_jax
      >>> direction = vasso_jax.friendly_direction(sigma=1.0, lmbda=0.5)
      >>> state = direction.init({'w': jnp.zeros(2)})
      >>> _, state = direction.update({'w': jnp.array([2.0, 0.0])}, state)
      >>> d, state = direction.update({'w': jnp.array([2.0, 2.0])}, state)
      >>> print(d['w'])
      [0. 2.]

    References:
      Li et al., `Friendly Sharpness-Aware Minimization
      <https://arxiv.org/abs/2403.12350>`_, CVPR 2024.
    """
    _checks.check_range('friendly_direction', 'sigma', sigma, low=0.0, high=1.0)
    _checks.check_range('friendly_direction', 'lmbda', lmbda, low=0.0, high=1.0, high_open=True)

    def init_fn(params):
        m = jax.tree.map(jnp.zeros_like, params)
        return FriendlyDirectionState(count=jnp.zeros([], jnp.int32), m=m)

    def update_fn(updates, state, params=None):
        del params
        first = state.count == 0

        def direction(m, g):
            dt = _precision(m, g)
            d = g.astype(dt) - sigma * m.astype(dt)
            return jnp.where(first, g, d.astype(g.dtype))

        def momentum(m, g):
            dt = _precision(m, g)
            new = lmbda * m.astype(dt) + (1.0 - lmbda) * g.astype(dt)
            return jnp.where(first, g.astype(m.dtype), new.astype(m.dtype))

        d = jax.tree.map(direction, state.m, updates)
        m = jax.tree.map(momentum, state.m, updates)
        return d, FriendlyDirectionState(count=optax.safe_increment(state.count), m=m)

    return optax.GradientTransformation(init_fn, update_fn)
