"""The engine: one optax link that turns the gradient at w into the gradient at w + eps."""

from collections.abc import Callable, Hashable
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from vasso_jax import _checks, _parallel

ASCENT_MODES = ('global', 'per_device')


class SharpnessAwareState(NamedTuple):
    """State of :func:`sharpness_aware`.

    Attributes:
      count: int32 number of ``update`` calls so far (drives schedules, ``every_k``).
      direction_state: state of the adversary (empty for SAM, ``d`` for VaSSO). A step whose
        incoming gradient is not finite leaves it unchanged.
      grad_norm: float32 ``||g_t||`` of the last minibatch gradient at ``w``.
      direction_norm: float32 ``||d_t||`` of the last ascent direction.
      cosine: float32 ``cos(g_t, d_t)``; 1 for SAM, below 1 when VaSSO smooths.
      last_finite: bool, whether the last returned gradient (second pass included) was finite.
      total_notfinite: int32 number of steps whose returned gradient was not finite.
      perturbation: the last ``epsilon_t`` (params-shaped, in the ascent's precision) when the
        link was built with ``keep_perturbation=True``, else ``None``: for adversary-stability
        studies.
    """

    count: jax.Array
    direction_state: optax.OptState
    grad_norm: jax.Array
    direction_norm: jax.Array
    cosine: jax.Array
    last_finite: jax.Array
    total_notfinite: jax.Array
    perturbation: optax.Updates | None = None


def _ascent_dtype(x) -> jnp.dtype:
    """The precision of the ascent on one leaf: the leaf's own, at least float32."""
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.promote_types(x.dtype, jnp.float32)
    return x.dtype


def _widest(tree) -> jnp.dtype:
    return jnp.result_type(jnp.float32, *(_ascent_dtype(x) for x in jax.tree.leaves(tree)))


def _sum_squares(tree, dtype) -> jax.Array:
    leaves = jax.tree.leaves(tree)
    return sum((jnp.sum(jnp.square(x.astype(dtype))) for x in leaves), jnp.zeros([], dtype))


def _dot(a, b, dtype) -> jax.Array:
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b))
    return sum((jnp.vdot(x.astype(dtype), y.astype(dtype)) for x, y in pairs), jnp.zeros([], dtype))


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _mean_if_float(mean):
    return lambda x: mean(x) if jnp.issubdtype(x.dtype, jnp.floating) else x


def _point_dtype(w, perturbed_dtype) -> jnp.dtype:
    if perturbed_dtype is None or not jnp.issubdtype(w.dtype, jnp.inexact):
        return _ascent_dtype(w)
    return jnp.dtype(perturbed_dtype)


def _check_per_device_gradient(updates, axis_name) -> None:
    if not _parallel.is_per_device(updates, axis_name):
        raise ValueError(
            "sharpness_aware(ascent='per_device'): the incoming gradient does not vary "
            f'over axis {axis_name!r} (shard_map sums gradients of replicated params); take '
            f'it at vasso_jax.device_varying(params, {axis_name!r}).'
        )


def sharpness_aware(
    rho: optax.ScalarOrSchedule,
    direction: optax.GradientTransformation,
    *,
    adaptive: bool = False,
    eta: jax.typing.ArrayLike = 0.01,
    eps: jax.typing.ArrayLike = 1e-12,
    axis_name: Hashable | None = None,
    ascent: Literal['global', 'per_device'] = 'global',
    every_k: int = 1,
    keep_perturbation: bool = False,
    perturbed_dtype: jax.typing.DTypeLike | None = None,
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

    Composition: the link *replaces* its input by ``grad_fn(w + epsilon)``, so a
    transformation placed before it (clipping, masking, ``apply_if_finite``) only shapes the
    ascent direction and is otherwise bypassed; the link cannot detect that, so put it
    first. Clip, decay and guard *after* it: ``optax.chain(link, optax.clip_by_global_norm(c),
    optax.apply_if_finite(base, n))`` clips and checks the sharpness-aware gradient. Inside
    ``optax.masked``/``optax.multi_transform`` the link raises (``grad_fn`` cannot take a
    partial tree); freeze with ``optax.set_to_zero()`` after it (docs/recipes/freezing.md).
    A non-finite result (first or second pass) is returned as is, so a guard after the link
    skips the step, and recorded in ``last_finite``/``total_notfinite``; a non-finite
    incoming gradient leaves the adversary's state unchanged.

    Precision: the direction, its norm, the scaling and ``epsilon`` are computed in each
    leaf's own precision, at least float32 (float64 params: float64 throughout). The point
    ``w + epsilon`` is formed in that precision too, so for bfloat16/float16 params
    ``grad_fn`` receives a float32 point (one float32 copy of the params, live during the
    second pass; the loss must accept float32 params): in bfloat16, ``w + epsilon`` would
    round most of ``epsilon`` away (docs/recipes/mixed_precision.md). The returned gradient
    is cast back to the incoming gradient's dtype.

    Args:
      rho: perturbation radius >= 0: float, array, or schedule ``step -> rho``
        evaluated on the link's own step count. Where ``rho`` is 0 the second
        pass is skipped and the result is the gradient at ``w``, exactly. A negative
        value from a schedule (or a traced value) is clipped to 0.
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
        may also be a ``jax.vmap`` axis over groups of examples. ``'per_device'``
        requires ``axis_name``.
      every_k: take the sharpness-aware gradient on every k-th step (steps 0, k,
        2k, ...) and the plain gradient otherwise; off-steps skip the second
        pass (``lax.cond``) but the adversary's state still updates. On XLA:CPU,
        convolutions inside a ``lax.cond`` branch miss the fast layout and the two-pass
        steps run far slower (BENCHMARKS.md); there, compile two steps instead (this link
        with ``every_k=1`` and with ``rho=0``, same state) and pick one per step on the host.
      keep_perturbation: also keep the last perturbation ``epsilon_t`` in the state (one
        params-sized buffer in the ascent's precision; its mean over devices with
        ``'per_device'``), e.g. to feed
        :func:`vasso_jax.perturbation_stability`. On ``every_k`` off-steps it is the
        perturbation the adversary points at, though no second pass used it.
      perturbed_dtype: dtype of the floating leaves of the point ``w + epsilon`` given to
        ``grad_fn``. ``None`` (default): each leaf's own precision, at least float32.
        ``jnp.bfloat16`` (say) saves the float32 copy but rounds the perturbation.

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
    _checks.check_flag(owner, 'adaptive', adaptive)
    _checks.check_flag(owner, 'keep_perturbation', keep_perturbation)
    if not isinstance(ascent, str) or ascent not in ASCENT_MODES:
        raise ValueError(f'{owner}: ascent={ascent!r} is invalid; expected one of {ASCENT_MODES}.')
    if ascent == 'per_device' and axis_name is None:
        raise ValueError(
            f"{owner}: ascent='per_device' needs axis_name=..., the data-parallel axis of "
            'shard_map/pmap/vmap whose devices perturb separately.'
        )
    if not isinstance(direction, optax.GradientTransformation):
        raise ValueError(
            f'{owner}: direction must be an optax.GradientTransformation, got {type(direction)}.'
        )
    if perturbed_dtype is not None and not jnp.issubdtype(perturbed_dtype, jnp.inexact):
        raise ValueError(
            f'{owner}: perturbed_dtype={perturbed_dtype!r} is invalid; pass a floating dtype '
            'such as jnp.float32, or None for the params\' precision (at least float32).'
        )
    static_rho = _checks.concrete_float(rho)
    static_k = _checks.concrete_float(every_k)
    always_sharp = static_rho is not None and static_rho > 0 and static_k == 1
    never_sharp = static_rho == 0.0

    def init_fn(params):
        _checks.check_not_masked(owner, params)
        zero = jnp.zeros([], jnp.float32)
        kept = jax.tree.map(lambda x: jnp.zeros(x.shape, _ascent_dtype(x)), params)
        return SharpnessAwareState(
            count=jnp.zeros([], jnp.int32),
            direction_state=direction.init(params),
            grad_norm=zero,
            direction_norm=zero,
            cosine=zero,
            last_finite=jnp.array(True),
            total_notfinite=jnp.zeros([], jnp.int32),
            perturbation=kept if keep_perturbation else None,
        )

    def perturbation(d, params, radius):
        dtype = _widest(params)
        up = jax.tree.map(lambda v, w: v.astype(_ascent_dtype(w)), d, params)
        if adaptive:
            scale = jax.tree.map(lambda w: jnp.abs(w.astype(_ascent_dtype(w))) + eta, params)
            up = jax.tree.map(jnp.multiply, scale, up)  # T d
            step = radius / (jnp.sqrt(_sum_squares(up, dtype)) + eps)
            return jax.tree.map(lambda t, v: (step * t * v).astype(v.dtype), scale, up)
        step = radius / (jnp.sqrt(_sum_squares(up, dtype)) + eps)
        return jax.tree.map(lambda v: (step * v).astype(v.dtype), up)

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
        _checks.check_not_masked(owner, updates, params)
        per_device = axis_name is not None and ascent == 'per_device'
        if per_device:
            _check_per_device_gradient(updates, axis_name)
        mean = (lambda t: _parallel.axis_mean(t, axis_name)) if axis_name else (lambda t: t)
        g = updates if per_device else mean(updates)
        d, direction_state = direction.update(g, state.direction_state, params)
        g_finite = _all_finite(g)
        if per_device:
            direction_state = jax.tree.map(_mean_if_float(mean), direction_state)
            g_finite = mean(g_finite.astype(jnp.float32)) == 1.0
        # A non-finite gradient must not poison the adversary's memory (VaSSO's d).
        direction_state = jax.tree.map(
            lambda new, old: jnp.where(g_finite, new, old), direction_state, state.direction_state
        )

        radius = rho(state.count) if callable(rho) else rho
        if static_rho is None:  # schedules, traced values: a negative radius means no ascent
            radius = jnp.maximum(radius, 0.0)

        def sharp_gradient():
            e = perturbation(d, params, radius)
            point = jax.tree.map(
                lambda w, v: (
                    w.astype(_point_dtype(w, perturbed_dtype))
                    + v.astype(_point_dtype(w, perturbed_dtype))
                ),
                params,
                e,
            )
            out = grad_fn(point)
            _checks.check_gradient_tree(owner, out, updates, point)
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

        dtype = _widest(params)
        g_sq, d_sq = _sum_squares(g, dtype), _sum_squares(d, dtype)
        grad_norm, direction_norm = jnp.sqrt(g_sq), jnp.sqrt(d_sq)
        denom = grad_norm * direction_norm
        cosine = jnp.where(denom > 0, _dot(g, d, dtype) / jnp.where(denom > 0, denom, 1.0), 0.0)
        grad_norm, direction_norm, cosine = (
            x.astype(jnp.float32) for x in (grad_norm, direction_norm, cosine)
        )
        kept = perturbation(d, params, radius) if keep_perturbation else None
        if per_device:
            grad_norm, direction_norm, cosine, kept = mean(
                (grad_norm, direction_norm, cosine, kept)
            )
        finite = _all_finite(new_updates)
        return new_updates, SharpnessAwareState(
            count=optax.safe_increment(state.count),
            direction_state=direction_state,
            grad_norm=grad_norm,
            direction_norm=direction_norm,
            cosine=cosine,
            last_finite=finite,
            total_notfinite=state.total_notfinite + (~finite).astype(jnp.int32),
            perturbation=kept,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
