"""The engine: one optax link that turns the gradient at w into the gradient at w + eps."""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from vasso_jax import _checks, _parallel

ASCENT_MODES = ('global', 'per_device')


class SharpnessAwareState(NamedTuple):
    """State of :func:`sharpness_aware`.

    Attributes:
      count: int32 number of ``update`` calls so far (drives schedules, ``every_k``).
      direction_state: state of the adversary (empty for SAM, ``d`` for VaSSO).
      grad_norm: float32 ``||g_t||`` of the last minibatch gradient at ``w``.
      direction_norm: float32 ``||d_t||`` of the last ascent direction.
      cosine: float32 ``cos(g_t, d_t)``; 1 for SAM, below 1 when VaSSO smooths.
      perturbation: the last ``epsilon_t`` (float32, params-shaped) when the link was built
        with ``keep_perturbation=True``, else ``None``: for adversary-stability studies.
    """

    count: jax.Array
    direction_state: optax.OptState
    grad_norm: jax.Array
    direction_norm: jax.Array
    cosine: jax.Array
    perturbation: optax.Updates | None = None


def _sum_squares(tree) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    return sum((jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves), jnp.float32(0.0))


def _mean_if_float(mean):
    return lambda x: mean(x) if jnp.issubdtype(x.dtype, jnp.floating) else x


def _zeros_f32(tree):
    return jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), tree)


def _dot(a, b) -> jax.Array:
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b))
    return sum(
        (jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32)) for x, y in pairs),
        jnp.float32(0.0),
    )


def _check_per_device_gradient(updates, axis_name) -> None:
    if not _parallel.is_per_device(updates, axis_name):
        raise ValueError(
            "sharpness_aware(ascent='per_device'): the incoming gradient does not vary "
            f'over axis {axis_name!r} (shard_map sums gradients of replicated params); take '
            f'it at vasso_jax.device_varying(params, {axis_name!r}).'
        )


def sharpness_aware(
    rho: Any,
    direction: optax.GradientTransformation,
    *,
    adaptive: bool = False,
    eta: Any = 0.01,
    eps: Any = 1e-12,
    axis_name: Any | None = None,
    ascent: str = 'global',
    every_k: Any = 1,
    keep_perturbation: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Sharpness-aware gradient: the gradient at the adversarially perturbed weights.

    With ``g_t`` the minibatch gradient at ``w_t`` and ``d_t`` the adversary's
    direction (``direction.update(g_t)``), the link returns

    .. math::

      \epsilon_t = \rho\, \frac{T_t^2\, d_t}{\lVert T_t\, d_t \rVert + \text{eps}},
      \qquad \tilde g_t = \nabla L_{\mathcal B_t}(w_t + \epsilon_t),

    where :math:`T_t = 1` (SAM, VaSSO) or :math:`T_t = |w_t| + \eta` when
    ``adaptive`` (ASAM). It is the *first* link of an optax chain; weight decay
    and the base optimiser follow, so they act on :math:`\tilde g_t`.

    ``update(updates, state, params, *, grad_fn)`` takes the raw gradient at
    ``params`` as ``updates`` and ``grad_fn(p)``, which must return the gradient at
    ``p`` on the **same** minibatch. Other keyword arguments are ignored.

    Args:
      rho: perturbation radius >= 0: float, array, or schedule ``step -> rho``
        evaluated on the link's own step count. Where ``rho`` is 0 the second
        pass is skipped and the result is the gradient at ``w``, exactly.
      direction: the adversary, e.g. :func:`vasso_jax.vasso_direction`.
      adaptive: scale the perturbation by ``|w| + eta`` (ASAM).
      eta: offset of the adaptive scaling, >= 0.
      eps: added to the norm in the denominator, > 0; a zero direction gives
        ``epsilon = 0``, never NaN.
      axis_name: inside ``shard_map``/``pmap``, the data-parallel mesh axis (the
        batch is split over it). Pass per-device gradients and let ``grad_fn``
        return per-device gradients; the link averages them over the axis. Inside
        ``shard_map``, gradients of replicated params arrive already summed by
        autodiff; the link detects that and still returns the mean. Not needed
        under ``jax.jit`` with sharded arrays, where everything is global.
      ascent: with ``axis_name``: ``'global'`` perturbs all devices by the
        averaged gradient (identical to one device on the whole batch);
        ``'per_device'`` perturbs each device by its own direction (m-sharpness
        with m = per-device batch, as in the SAM authors' code). The adversary's
        state is then averaged over the axis after each step, so it stays
        replicated: VaSSO's ``d_t = (1-theta) d_{t-1} + theta mean(g)`` while
        device ``j`` perturbs along ``(1-theta) d_{t-1} + theta g_j``. The axis
        may also be a ``jax.vmap`` axis over groups of examples.
      every_k: take the sharpness-aware gradient on every k-th step (steps 0, k,
        2k, ...) and the plain gradient otherwise; off-steps skip the second
        pass (``lax.cond``) but the adversary's state still updates. On XLA:CPU,
        convolutions inside a ``lax.cond`` branch miss the fast layout and the two-pass
        steps run far slower (BENCHMARKS.md); there, compile two steps instead (this link
        with ``every_k=1`` and with ``rho=0``, same state) and pick one per step on the host.
      keep_perturbation: also keep the last perturbation ``epsilon_t`` in the state (one
        float32 params-sized buffer; its mean over devices with ``'per_device'``), e.g. to feed
        :func:`vasso_jax.perturbation_stability`. On ``every_k`` off-steps it is the
        perturbation the adversary points at, though no second pass used it.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> import vasso_jax
      >>> loss = lambda w: jnp.sum(w ** 4)
      >>> tx = vasso_jax.sharpness_aware(0.1, vasso_jax.gradient_direction())
      >>> w = jnp.array([1.0, 0.0])
      >>> g, state = tx.update(jax.grad(loss)(w), tx.init(w), w, grad_fn=jax.grad(loss))
      >>> print(g)  # 4 (w + 0.1 e1)^3
      [5.324 0.   ]

    References:
      Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
      Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021.

      Kwon et al., `ASAM: Adaptive Sharpness-Aware Minimization
      <https://arxiv.org/abs/2102.11600>`_, ICML 2021.

      Li & Giannakis, `Enhancing Sharpness-Aware Optimization Through Variance
      Suppression <https://arxiv.org/abs/2309.15639>`_, NeurIPS 2023.
    """
    owner = 'sharpness_aware'
    _checks.check_range(owner, 'rho', rho, low=0.0)
    _checks.check_range(owner, 'eta', eta, low=0.0)
    _checks.check_range(owner, 'eps', eps, low=0.0, low_open=True)
    _checks.check_positive_int(owner, 'every_k', every_k)
    if ascent not in ASCENT_MODES:
        raise ValueError(f'{owner}: ascent={ascent!r} is invalid; expected one of {ASCENT_MODES}.')
    if not isinstance(direction, optax.GradientTransformation):
        raise ValueError(
            f'{owner}: direction must be an optax.GradientTransformation, got {type(direction)}.'
        )
    static_rho = _checks.concrete_float(rho)
    static_k = _checks.concrete_float(every_k)
    always_sharp = static_rho is not None and static_rho > 0 and static_k == 1
    never_sharp = static_rho == 0.0

    def init_fn(params):
        zero = jnp.zeros([], jnp.float32)
        return SharpnessAwareState(
            count=jnp.zeros([], jnp.int32),
            direction_state=direction.init(params),
            grad_norm=zero,
            direction_norm=zero,
            cosine=zero,
            perturbation=_zeros_f32(params) if keep_perturbation else None,
        )

    def perturbation(d, params, radius):
        d32 = jax.tree.map(lambda x: x.astype(jnp.float32), d)
        if adaptive:
            scale = jax.tree.map(lambda w: jnp.abs(w.astype(jnp.float32)) + eta, params)
            d32 = jax.tree.map(jnp.multiply, scale, d32)  # T d
            step = radius / (jnp.sqrt(_sum_squares(d32)) + eps)
            return jax.tree.map(lambda t, v: step * t * v, scale, d32)
        step = radius / (jnp.sqrt(_sum_squares(d32)) + eps)
        return jax.tree.map(lambda v: step * v, d32)

    def update_fn(updates, state, params=None, *, grad_fn: Callable | None = None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError(
                f'{owner}: update() needs params=..., the weights the gradient was taken at.'
            )
        if grad_fn is None:
            raise ValueError(
                f'{owner}: update() needs grad_fn=..., a function p -> gradient at p '
                'on the same batch.'
            )
        per_device = axis_name is not None and ascent == 'per_device'
        if per_device:
            _check_per_device_gradient(updates, axis_name)
        mean = (lambda t: _parallel.axis_mean(t, axis_name)) if axis_name else (lambda t: t)
        g = updates if per_device else mean(updates)
        d, direction_state = direction.update(g, state.direction_state, params)
        if per_device:
            direction_state = jax.tree.map(_mean_if_float(mean), direction_state)

        radius = rho(state.count) if callable(rho) else rho

        def sharp_gradient():
            e = perturbation(d, params, radius)
            point = jax.tree.map(
                lambda w, v: (w.astype(jnp.float32) + v).astype(w.dtype), params, e
            )
            out = grad_fn(point)
            if jax.tree.structure(out) != jax.tree.structure(updates):
                raise ValueError(
                    f'{owner}: grad_fn returned a tree of structure {jax.tree.structure(out)}, '
                    f'expected the structure of the gradient {jax.tree.structure(updates)}.'
                )
            return optax.tree.cast_like(mean(out), updates)

        def plain_gradient():
            return optax.tree.cast_like(g if not per_device else mean(updates), updates)

        if always_sharp:
            new_updates = sharp_gradient()
        elif never_sharp:
            new_updates = plain_gradient()
        else:
            take = jnp.logical_and(jnp.asarray(radius) > 0, state.count % every_k == 0)
            new_updates = jax.lax.cond(take, sharp_gradient, plain_gradient)

        g_sq, d_sq = _sum_squares(g), _sum_squares(d)
        grad_norm, direction_norm = jnp.sqrt(g_sq), jnp.sqrt(d_sq)
        denom = grad_norm * direction_norm
        cosine = jnp.where(denom > 0, _dot(g, d) / jnp.where(denom > 0, denom, 1.0), 0.0)
        kept = perturbation(d, params, radius) if keep_perturbation else None
        if per_device:
            grad_norm, direction_norm, cosine, kept = mean(
                (grad_norm, direction_norm, cosine, kept)
            )
        return new_updates, SharpnessAwareState(
            count=optax.safe_increment(state.count),
            direction_state=direction_state,
            grad_norm=grad_norm,
            direction_norm=direction_norm,
            cosine=cosine,
            perturbation=kept,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
