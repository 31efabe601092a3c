r"""One-pass sharpness-aware optimisers: one gradient per step, no ``grad_fn``.

A two-pass method (:func:`vasso_jax.vasso`) spends two gradients per step: one at
``w_t`` to find the perturbation, one at ``w_t + eps_t``. When the adversary
barely moves between steps (VaSSO's average, an optimiser's momentum), the
perturbation of step ``t`` can be built *before* the step from the adversary's
state, so the only gradient of the step is the one at the perturbed point.

The wrapper here makes that a standard optax step. The params the user holds
*are* the perturbed point :math:`p_t = w_t + \epsilon_t`; the minibatch gradient
taken there, :math:`g_t = \nabla L_{\mathcal B_t}(p_t)`, drives both the base
optimiser (run at the unperturbed :math:`w_t`) and the adversary:

.. math::

  u_t = \mathrm{base}(g_t, w_t),\quad w_{t+1} = w_t + u_t,\quad
  d_t = \mathrm{direction}(d_{t-1}, g_t, u_t),\quad
  \epsilon_{t+1} = \rho\, \frac{d_t}{\lVert d_t \rVert + \text{eps}},

and the update handed to ``optax.apply_updates`` is
:math:`u_t + \epsilon_{t+1} - \epsilon_t`, so the held params move from
:math:`w_t + \epsilon_t` to :math:`w_{t+1} + \epsilon_{t+1}`. The first step is
unperturbed (:math:`\epsilon_1 = 0`). :func:`unperturbed_params` gives back
:math:`w_t` for evaluation and export.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from vasso_jax import _checks, _sharpness

# direction(previous d, gradient at the held params, base update, step count) -> new d
Direction = Callable[[optax.Updates, optax.Updates, optax.Updates, jax.Array], optax.Updates]


class OnePassState(NamedTuple):
    """State of :func:`one_pass`.

    The held perturbation is ``epsilon_t = scale * direction``; both are kept so that
    :func:`unperturbed_params` recovers ``w_t`` from the state alone, whatever ``rho``
    (schedule, ``inject_hyperparams``) did since.

    Attributes:
      count: int32 number of ``update`` calls so far.
      scale: float32 ``rho / (||d|| + eps)`` of the held perturbation (0 before step 1).
      direction: the adversary's direction ``d`` (params-shaped; one buffer).
      base_state: the base optimiser's state.
      grad_norm: float32 ``||g_t||`` of the last gradient (taken at the held params).
      direction_norm: float32 ``||d_t||``, the norm of the next perturbation's direction.
      cosine: float32 ``cos(g_t, d_{t-1})``: how well the direction that perturbed step
        ``t`` agrees with the gradient taken there (0 on the unperturbed first step).
    """

    count: jax.Array
    scale: jax.Array
    direction: optax.Updates
    base_state: optax.OptState
    grad_norm: jax.Array
    direction_norm: jax.Array
    cosine: jax.Array


def _compute_dtype(x) -> jnp.dtype:
    return jnp.promote_types(x.dtype, jnp.float32)


def _perturbation(state: OnePassState) -> optax.Updates:
    return jax.tree.map(lambda d: state.scale * d.astype(_compute_dtype(d)), state.direction)


def _shift(params, perturbation, sign: float):
    def one(p, e):
        dtype = jnp.promote_types(_compute_dtype(p), e.dtype)
        return (p.astype(dtype) + sign * e.astype(dtype)).astype(p.dtype)

    return jax.tree.map(one, params, perturbation)


def one_pass(
    base: optax.GradientTransformation,
    direction: Direction,
    rho: Any,
    *,
    eps: Any = 1e-12,
    direction_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""One-pass sharpness-aware wrapper around a base optimiser: one gradient per step.

    The held params are the perturbed point :math:`p_t = w_t + \epsilon_t`; pass the
    plain minibatch gradient at them, as for any optax optimiser. ``update`` recovers
    :math:`w_t = p_t - \epsilon_t`, runs ``base`` on :math:`(g_t, w_t)` (so weight
    decay acts on :math:`w_t`), updates the adversary and returns

    .. math::

      u_t + \epsilon_{t+1} - \epsilon_t,\qquad
      d_t = \mathrm{direction}(d_{t-1}, g_t, u_t, t-1),\qquad
      \epsilon_{t+1} = \rho_{t}\, \frac{d_t}{\lVert d_t \rVert + \text{eps}},

    with :math:`\epsilon_1 = 0` and :math:`d_0 = 0`. Nothing may change its updates
    after it (they carry the perturbation bookkeeping): wrap it (``inject_hyperparams``,
    ``MultiSteps``, ``apply_if_finite``) rather than chain links after it; links
    before it (clipping) change the gradient both the base and the adversary see.
    Gradients must arrive already averaged over devices, as for ``base`` alone.

    The state keeps one params-sized buffer beyond ``base``'s (``d``) and float32
    scalars; ``optax.tree.get(state, 'cosine')`` reads :math:`\cos(g_t, d_{t-1})`.
    :math:`\epsilon_t` is not stored: it is ``scale * d`` with the scalar ``scale``
    saved when :math:`\epsilon_t` was made, so :math:`w_t` is recovered with the same
    elementwise arithmetic in ``update`` and in :func:`unperturbed_params`, and a
    resumed run (held params + state) continues bitwise.

    Args:
      base: the base optimiser, e.g. ``optax.chain(optax.add_decayed_weights(5e-4),
        optax.sgd(0.1, momentum=0.9))``. Extra ``update`` arguments are passed to it.
      direction: the adversary, ``(d_prev, g, u, count) -> d`` on trees: ``d_prev`` the
        last direction (zeros at first), ``g`` the gradient at the held params, ``u``
        the base update, ``count`` the int32 step (0 first).
      rho: perturbation radius >= 0: float, array, or schedule ``step -> rho``; the
        perturbation made during step ``k`` (0-based) is used at step ``k + 1`` and
        takes ``rho(k + 1)``. ``rho = 0`` is ``base`` exactly.
      eps: added to the norm, > 0; a zero direction gives ``epsilon = 0``, never NaN.
      direction_dtype: dtype of the stored ``d``; ``None`` keeps the params' dtype.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update(grads, state,
      params)`` needs ``params`` (the held, perturbed params).

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> import vasso_jax
      >>> last_update = lambda d, g, u, count: u  # Momentum-SAM's adversary
      >>> tx = vasso_jax.one_pass(optax.sgd(0.1, momentum=0.9), last_update, rho=0.01)
      >>> loss = lambda w: jnp.sum((w - 1.0) ** 2)
      >>> params = jnp.zeros(2)
      >>> state = tx.init(params)
      >>> for _ in range(100):
      ...   updates, state = tx.update(jax.grad(loss)(params), state, params)
      ...   params = optax.apply_updates(params, updates)
      >>> print(jnp.round(vasso_jax.unperturbed_params(params, state), 3))
      [1. 1.]

    References:
      Becker, Altrock & Risse, `Momentum-SAM: Sharpness Aware Minimization without
      Computational Overhead <https://arxiv.org/abs/2401.12033>`_, 2024.

      Xie, Pethick & Cevher, `SAMPa: Sharpness-aware Minimization Parallelized
      <https://arxiv.org/abs/2410.10683>`_, NeurIPS 2024 (a related use of an
      earlier gradient for the perturbation, to parallelise SAM's two passes).
    """
    owner = 'one_pass'
    _checks.check_range(owner, 'rho', rho, low=0.0)
    _checks.check_range(owner, 'eps', eps, low=0.0, low_open=True)
    if not isinstance(base, optax.GradientTransformation):
        raise ValueError(
            f'{owner}: base must be an optax.GradientTransformation (e.g. optax.sgd(0.1)), '
            f'got {type(base).__name__}.'
        )
    if not callable(direction):
        raise ValueError(
            f'{owner}: direction must be a function (d_prev, g, u, count) -> d, '
            f'got {type(direction).__name__}.'
        )
    base = optax.with_extra_args_support(base)
    never_perturbed = _checks.concrete_float(rho) == 0.0  # then skip the bookkeeping: exact base

    def init_fn(params):
        return OnePassState(
            count=jnp.zeros([], jnp.int32),
            scale=jnp.zeros([], jnp.float32),
            direction=jax.tree.map(lambda p: jnp.zeros_like(p, dtype=direction_dtype), params),
            base_state=base.init(params),
            grad_norm=jnp.zeros([], jnp.float32),
            direction_norm=jnp.zeros([], jnp.float32),
            cosine=jnp.zeros([], jnp.float32),
        )

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError(
                f'{owner}: update() needs params=..., the held (perturbed) params the '
                'gradient was taken at.'
            )
        old = _perturbation(state)
        w = params if never_perturbed else _shift(params, old, -1.0)
        base_updates, base_state = base.update(updates, state.base_state, w, **extra_args)
        d = direction(state.direction, updates, base_updates, state.count)
        d = jax.tree.map(lambda new, prev: new.astype(prev.dtype), d, state.direction)
        count = optax.safe_increment(state.count)
        radius = rho(count) if callable(rho) else rho
        norm = jnp.sqrt(_sharpness._sum_squares(d, jnp.float32))
        scale = (jnp.asarray(radius, jnp.float32) / (norm + eps)).astype(jnp.float32)
        grad_norm = jnp.sqrt(_sharpness._sum_squares(updates, jnp.float32))
        denom = grad_norm * state.direction_norm
        dot = _sharpness._dot(updates, state.direction, jnp.float32)
        cosine = jnp.where(denom > 0, dot / jnp.where(denom > 0, denom, 1.0), 0.0)
        new_state = OnePassState(count, scale, d, base_state, grad_norm, norm, cosine)

        def combine(u, e_new, e_old):
            dtype = jnp.promote_types(_compute_dtype(u), e_new.dtype)
            return (u.astype(dtype) + e_new.astype(dtype) - e_old.astype(dtype)).astype(u.dtype)

        if never_perturbed:
            return base_updates, new_state
        new_updates = jax.tree.map(combine, base_updates, _perturbation(new_state), old)
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _vasso_average(theta: Any) -> Direction:
    def direction(d_prev, g, u, count):
        del u
        th = theta(count) if callable(theta) else theta
        first = count == 0

        def ema(d, x):
            new = (1.0 - th) * d.astype(jnp.float32) + th * x.astype(jnp.float32)
            return jnp.where(first, x.astype(jnp.float32), new)

        return jax.tree.map(ema, d_prev, g)

    return direction


def _last_update(d_prev, g, u, count):
    del d_prev, g, count
    return u


def one_pass_vasso(
    base: optax.GradientTransformation,
    rho: Any = 0.1,
    theta: Any = 0.4,
    *,
    eps: Any = 1e-12,
    direction_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""One-pass VaSSO: the perturbation comes from the previous gradient average.

    .. math::

      \epsilon_t = \rho\, \frac{d_{t-1}}{\lVert d_{t-1} \rVert},\quad
      g_t = \nabla L_{\mathcal B_t}(w_t + \epsilon_t),\quad
      d_1 = g_1,\ d_t = (1-\theta)\, d_{t-1} + \theta\, g_t,

    with :math:`\epsilon_1 = 0` (step 1 is a plain step) and ``base`` stepping
    :math:`w_t` with :math:`g_t`. Two-pass :func:`vasso_jax.vasso` perturbs along
    :math:`d_t`, which already contains a gradient at :math:`w_t`, and so needs two
    gradients per step; here :math:`d_{t-1}` suffices because the average barely
    moves in one step, and the average is fed with gradients at the perturbed
    points. The held params are :math:`w_t + \epsilon_t` (see :func:`one_pass`);
    evaluate :func:`vasso_jax.unperturbed_params`.

    Args:
      base: the base optimiser (weight decay, momentum, schedules included).
      rho: perturbation radius >= 0 (float, array or schedule).
      theta: weight of the newest gradient in ``(0, 1]`` (float, array or schedule).
      eps: added to the norm, > 0.
      direction_dtype: dtype of the stored ``d``; ``None`` keeps the params' dtype.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state holds exactly one
      params-sized buffer (``d``) more than ``base``'s, plus scalars.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> import vasso_jax
      >>> loss = lambda w: jnp.sum((w - 1.0) ** 4)
      >>> tx = vasso_jax.one_pass_vasso(optax.sgd(0.1, momentum=0.5), rho=0.05)
      >>> params = jnp.zeros(3)
      >>> state = tx.init(params)
      >>> for _ in range(100):  # one gradient per step, no grad_fn
      ...   updates, state = tx.update(jax.grad(loss)(params), state, params)
      ...   params = optax.apply_updates(params, updates)
      >>> w = vasso_jax.unperturbed_params(params, state)
      >>> print(float(loss(w)) < 1e-3)
      True

    References:
      Li & Giannakis, `Enhancing Sharpness-Aware Optimization Through Variance
      Suppression <https://arxiv.org/abs/2309.15639>`_, NeurIPS 2023.

      Becker, Altrock & Risse, `Momentum-SAM: Sharpness Aware Minimization without
      Computational Overhead <https://arxiv.org/abs/2401.12033>`_, 2024.
    """
    _checks.check_range('one_pass_vasso', 'theta', theta, low=0.0, high=1.0, low_open=True)
    _checks.check_range('one_pass_vasso', 'rho', rho, low=0.0)
    return one_pass(base, _vasso_average(theta), rho, eps=eps, direction_dtype=direction_dtype)


def one_pass_momentum_sam(
    base: optax.GradientTransformation,
    rho: Any,
    *,
    eps: Any = 1e-12,
    direction_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Momentum-SAM (MSAM): perturb along the base optimiser's last update.

    .. math::

      \epsilon_t = \rho\, \frac{u_{t-1}}{\lVert u_{t-1} \rVert},\quad
      g_t = \nabla L_{\mathcal B_t}(w_t + \epsilon_t),\quad
      u_t = \mathrm{base}(g_t, w_t),\quad w_{t+1} = w_t + u_t .

    With ``base = optax.sgd(lr, momentum=mu)`` the update is :math:`u = -lr\, v` for
    the momentum :math:`v`, so :math:`\epsilon_t = -\rho\, v_t / \lVert v_t \rVert`:
    the paper's perturbation along the negative momentum (a Nesterov-like look-ahead
    of radius ``rho``), with weight decay inside ``v`` when it is in ``base`` before
    ``sgd``. The paper reuses SGD's momentum buffer and needs no extra memory; here
    the last update is kept (one params-sized buffer), which works with any ``base``
    (Adam, schedules, clipping) and lets :func:`vasso_jax.unperturbed_params` read
    :math:`w_t` from this wrapper's state alone.

    Args:
      base: the base optimiser; its update direction is the adversary.
      rho: perturbation radius >= 0 (float, array or schedule). No default: the
        paper tunes MSAM's radius separately from SAM's, and it is typically larger.
      eps: added to the norm, > 0.
      direction_dtype: dtype of the stored update; ``None`` keeps the params' dtype.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` holding one params-sized buffer
      more than ``base``'s, plus scalars.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> import vasso_jax
      >>> loss = lambda w: jnp.sum((w - 1.0) ** 2)
      >>> tx = vasso_jax.one_pass_momentum_sam(optax.sgd(0.05, momentum=0.9), rho=0.05)
      >>> params = jnp.zeros(2)
      >>> state = tx.init(params)
      >>> for _ in range(200):
      ...   updates, state = tx.update(jax.grad(loss)(params), state, params)
      ...   params = optax.apply_updates(params, updates)
      >>> print(float(loss(vasso_jax.unperturbed_params(params, state))) < 1e-4)
      True

    References:
      Becker, Altrock & Risse, `Momentum-SAM: Sharpness Aware Minimization without
      Computational Overhead <https://arxiv.org/abs/2401.12033>`_, 2024.
    """
    _checks.check_range('one_pass_momentum_sam', 'rho', rho, low=0.0)
    return one_pass(base, _last_update, rho, eps=eps, direction_dtype=direction_dtype)


def unperturbed_params(params: optax.Params, state: optax.OptState) -> optax.Params:
    r"""The unperturbed weights :math:`w_t = p_t - \epsilon_t` of a one-pass run.

    ``params`` are the held (perturbed) params :math:`p_t` and ``state`` the
    optimiser state; the :class:`OnePassState` is found anywhere inside it
    (``optax.chain``, ``optax.inject_hyperparams``, ``optax.MultiSteps``). Evaluate
    and export these weights; checkpoint the held params with the state to resume.
    Works inside and outside ``jax.jit``.

    Args:
      params: the params the one-pass optimiser updates.
      state: its state, or any state tree containing exactly one ``OnePassState``.

    Returns:
      A tree like ``params`` (same dtypes).

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> import vasso_jax
      >>> tx = optax.inject_hyperparams(vasso_jax.one_pass_vasso)(optax.sgd(0.1), rho=0.5)
      >>> params = {'w': jnp.zeros(2)}
      >>> state = tx.init(params)
      >>> updates, state = tx.update({'w': jnp.array([3.0, 4.0])}, state, params)
      >>> params = optax.apply_updates(params, updates)  # w_2 + 0.5 * (0.6, 0.8)
      >>> print(params['w'], vasso_jax.unperturbed_params(params, state)['w'])
      [0. 0.] [-0.3 -0.4]
    """
    found = [
        s
        for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, OnePassState))
        if isinstance(s, OnePassState)
    ]
    if len(found) != 1:
        raise ValueError(
            f'unperturbed_params: state holds {len(found)} one-pass states, expected exactly '
            'one; pass the state of a vasso_jax.one_pass_* optimiser.'
        )
    return _shift(params, _perturbation(found[0]), -1.0)
