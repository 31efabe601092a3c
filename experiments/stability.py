"""Adversary stability over training: a wrapper that tracks the link's perturbations.

:func:`track` wraps a ``vasso_jax`` link built with ``keep_perturbation=True``. After every
``update`` it feeds the link's ``epsilon_t`` to ``vasso_jax.perturbation_stability()`` and keeps
the results in its state as float32 scalars, so the trainer logs them like the link's own
diagnostics (``optax.tree.get(opt_state, name)``) and a checkpoint resumes them:

- ``eps_cosine``: cos(eps_t, eps_{t-1}), how much the adversary turns in one step (0 at t = 1);
- ``eps_mean_cosine``: its mean over steps 2..t;
- ``eps_variance``: the variance of eps_1..eps_t across steps, averaged over coordinates.

VaSSO's averaged direction should give a higher cosine and a lower variance than SAM's
minibatch gradient at the same radius: the stabilised adversary of the paper.
"""

from typing import Any, NamedTuple

import jax.numpy as jnp
import optax

import vasso_jax

# Names in the optimiser state, logged by the trainer when present.
STABILITY_DIAGNOSTICS = ('eps_cosine', 'eps_mean_cosine', 'eps_variance')


class StabilityState(NamedTuple):
    """The wrapped link's state, the tracker's, and the latest metrics."""

    inner: Any
    tracker: vasso_jax.PerturbationStabilityState
    eps_cosine: jnp.ndarray
    eps_mean_cosine: jnp.ndarray
    eps_variance: jnp.ndarray


def track(link: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """Wraps ``link`` (built with ``keep_perturbation=True``) to track its perturbations.

    The updates are the link's, unchanged; extra arguments (``grad_fn``) pass through. The
    state costs three params-sized float32 trees on top of the link's.

    Args:
      link: a sharpness-aware link, e.g. ``vasso_jax.sam(0.05, keep_perturbation=True)``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a :class:`StabilityState`.

    Examples:
      >>> import jax, jax.numpy as jnp, vasso_jax
      >>> from experiments import stability
      >>> tx = stability.track(vasso_jax.sam(0.1, keep_perturbation=True))
      >>> w = jnp.array([1.0, -1.0])
      >>> state = tx.init(w)
      >>> grad_fn = jax.grad(lambda p: jnp.sum(p ** 4))
      >>> for _ in range(2):
      ...     _, state = tx.update(grad_fn(w), state, w, grad_fn=grad_fn)
      >>> print(float(state.eps_cosine))
      1.0
    """
    tracker = vasso_jax.perturbation_stability()
    link = optax.with_extra_args_support(link)

    def init_fn(params):
        inner = link.init(params)
        if optax.tree.get(inner, 'perturbation') is None:
            raise ValueError('stability.track needs a link built with keep_perturbation=True.')
        zero = jnp.zeros((), jnp.float32)
        return StabilityState(inner, tracker.init(params), zero, zero, zero)

    def update_fn(updates, state, params=None, **extra_args):
        updates, inner = link.update(updates, state.inner, params, **extra_args)
        metrics, tracker_state = tracker.update(
            optax.tree.get(inner, 'perturbation'), state.tracker
        )
        return updates, StabilityState(
            inner, tracker_state, metrics['cosine'], metrics['mean_cosine'], metrics['variance']
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def summarize(history) -> dict[str, float]:
    """Run-level stability from a metrics history (``metrics.jsonl`` records).

    ``eps_cosine``: mean of the logged interval means (every step weighs the same when the
    log intervals are equal); ``eps_variance``: the last logged value (it already covers the
    whole run). Empty when the run did not log stability.
    """
    cosines = [r['eps_cosine'] for r in history if r.get('eps_cosine') is not None]
    variances = [r['eps_variance'] for r in history if r.get('eps_variance') is not None]
    out = {}
    if cosines:
        out['eps_cosine'] = float(sum(cosines) / len(cosines))
    if variances:
        out['eps_variance'] = float(variances[-1])
    return out
