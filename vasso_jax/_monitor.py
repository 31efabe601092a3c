"""Monitoring a sharpness-aware link: the stability of its adversarial perturbations.

In the style of ``optax.snapshot`` / ``optax.monitor``: the wrapper leaves the updates alone and
keeps its measurements in its state, where ``optax.tree.get(state, name)`` finds them, so a
trainer logs them like the link's own diagnostics and a checkpoint resumes them.
"""

from typing import Any, NamedTuple

import jax.numpy as jnp
import optax

from vasso_jax import _diagnostics


class StabilityMonitorState(NamedTuple):
    """State of :func:`track_stability`: the link's, the tracker's, the latest measurements.

    Attributes:
      inner: the wrapped link's state.
      tracker: a :class:`vasso_jax.PerturbationStabilityState`.
      eps_cosine: float32, :math:`\\cos(\\epsilon_t, \\epsilon_{t-1})` (0 at t = 1).
      eps_mean_cosine: float32, its mean over steps 2..t.
      eps_variance: float32, the variance of :math:`\\epsilon_1..\\epsilon_t` across steps,
        averaged over coordinates.
    """

    inner: Any
    tracker: _diagnostics.PerturbationStabilityState
    eps_cosine: jnp.ndarray
    eps_mean_cosine: jnp.ndarray
    eps_variance: jnp.ndarray


def track_stability(link: optax.GradientTransformation, *,
                    eps: float = 1e-12) -> optax.GradientTransformationExtraArgs:
    r"""Wraps a sharpness-aware link to measure how stable its adversary is over training.

    After every ``update`` the link's perturbation :math:`\epsilon_t` (kept in its state by
    ``keep_perturbation=True``) goes to :func:`vasso_jax.perturbation_stability`, and the
    state holds, as float32 scalars found by ``optax.tree.get``,

    .. math::

      \mathrm{eps\_cosine} = \cos(\epsilon_t, \epsilon_{t-1}), \quad
      \mathrm{eps\_mean\_cosine} = \tfrac{1}{t-1}\textstyle\sum_{s=2}^t
        \cos(\epsilon_s, \epsilon_{s-1}), \quad
      \mathrm{eps\_variance} = \tfrac{1}{t\,d}\textstyle\sum_{s=1}^t
        \|\epsilon_s - \bar\epsilon_t\|^2 .

    VaSSO's averaged direction gives a higher cosine and a lower variance than SAM's minibatch
    gradient at the same radius: the stabilised adversary of the paper. The updates are the
    link's, unchanged, and extra arguments (``grad_fn``) pass through. The state costs three
    params-sized float32 trees on top of the link's.

    Args:
      link: a link built with ``keep_perturbation=True``, e.g.
        ``vasso_jax.vasso(0.1, keep_perturbation=True)``.
      eps: floor on norms when normalising (a zero perturbation gives cosine 0).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      :class:`StabilityMonitorState`.

    Raises:
      ValueError: at ``init``, when the link does not keep its perturbation.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, vasso_jax
      >>> tx = vasso_jax.track_stability(vasso_jax.sam(0.1, keep_perturbation=True))
      >>> w = jnp.array([1.0, -1.0])
      >>> state = tx.init(w)
      >>> grad_fn = jax.grad(lambda p: jnp.sum(p ** 4))
      >>> for _ in range(2):
      ...     _, state = tx.update(grad_fn(w), state, w, grad_fn=grad_fn)
      >>> print(float(optax.tree.get(state, 'eps_cosine')))
      1.0

    References:
      Li & Giannakis, `Enhancing Sharpness-Aware Optimization Through Variance Suppression
      <https://arxiv.org/abs/2309.15639>`_, 2023.
    """
    tracker = _diagnostics.perturbation_stability(eps)
    link = optax.with_extra_args_support(link)

    def init_fn(params):
        inner = link.init(params)
        if optax.tree.get(inner, 'perturbation') is None:
            raise ValueError('track_stability: the link keeps no perturbation; build it with '
                             'keep_perturbation=True.')
        zero = jnp.zeros((), jnp.float32)
        return StabilityMonitorState(inner, tracker.init(params), zero, zero, zero)

    def update_fn(updates, state, params=None, **extra_args):
        updates, inner = link.update(updates, state.inner, params, **extra_args)
        metrics, tracker_state = tracker.update(optax.tree.get(inner, 'perturbation'),
                                                state.tracker)
        return updates, StabilityMonitorState(inner, tracker_state, metrics['cosine'],
                                              metrics['mean_cosine'], metrics['variance'])

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
