"""Named methods: the engine plus one adversary each."""

from collections.abc import Hashable
from typing import Literal

import jax
import optax

from vasso_jax import _directions, _sharpness


def sam(
    rho: optax.ScalarOrSchedule = 0.05,
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
    r"""Sharpness-Aware Minimisation (SAM) as the first link of an optax chain.

    .. math::

      \epsilon_t = \rho\, \frac{g_t}{\lVert g_t \rVert}, \qquad
      \tilde g_t = \nabla L_{\mathcal B_t}(w_t + \epsilon_t).

    Args:
      rho: perturbation radius >= 0 (float, array or schedule; a schedule's negative
        values are clipped to 0).
      adaptive: use ASAM's scale-invariant perturbation (see :func:`asam`).
      eta: ASAM's offset, >= 0.
      eps: added to the norm, > 0.
      axis_name: data-parallel axis inside ``shard_map``/``pmap``.
      ascent: ``'global'`` or ``'per_device'`` (m-sharpness), with ``axis_name``.
      every_k: sharpness-aware gradient every k-th step, plain gradient otherwise.
      keep_perturbation: keep the last perturbation in the state (see
        :func:`vasso_jax.sharpness_aware`).
      perturbed_dtype: dtype of the point given to ``grad_fn``; ``None``: the params'
        precision, at least float32 (see :func:`vasso_jax.sharpness_aware`).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; call its ``update`` with
      ``grad_fn=`` (gradient at given params on the same batch). Its state keeps
      no params-sized buffer.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> import vasso_jax
      >>> loss = lambda w: jnp.sum((w - 1.0) ** 4)
      >>> tx = optax.chain(vasso_jax.sam(rho=0.05), optax.sgd(0.1))
      >>> w = jnp.zeros(3)
      >>> state = tx.init(w)
      >>> for _ in range(50):
      ...   u, state = tx.update(jax.grad(loss)(w), state, w, grad_fn=jax.grad(loss))
      ...   w = optax.apply_updates(w, u)
      >>> print(float(loss(w)) < 1e-2)
      True

    References:
      Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
      Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021.
    """
    return _sharpness.sharpness_aware(
        rho,
        _directions.gradient_direction(),
        adaptive=adaptive,
        eta=eta,
        eps=eps,
        axis_name=axis_name,
        ascent=ascent,
        every_k=every_k,
        keep_perturbation=keep_perturbation,
        perturbed_dtype=perturbed_dtype,
    )


def vasso(
    rho: optax.ScalarOrSchedule = 0.1,
    theta: optax.ScalarOrSchedule = 0.4,
    *,
    adaptive: bool = False,
    eta: jax.typing.ArrayLike = 0.01,
    eps: jax.typing.ArrayLike = 1e-12,
    axis_name: Hashable | None = None,
    ascent: Literal['global', 'per_device'] = 'global',
    every_k: int = 1,
    keep_perturbation: bool = False,
    perturbed_dtype: jax.typing.DTypeLike | None = None,
    direction_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Variance-Suppressed Sharpness-Aware Optimisation (VaSSO).

    SAM's adversary follows one noisy minibatch gradient; VaSSO follows a
    variance-suppressed average of them:

    .. math::

      d_1 = g_1,\quad d_t = (1-\theta)\, d_{t-1} + \theta\, g_t,\qquad
      \epsilon_t = \rho\, \frac{d_t}{\lVert d_t \rVert},\qquad
      \tilde g_t = \nabla L_{\mathcal B_t}(w_t + \epsilon_t).

    ``theta = 1`` is SAM exactly: the same arithmetic, bit for bit in a small
    jitted step. Inside a large compiled train step XLA may fuse the two programs
    differently, so long runs of the two agree only up to float rounding, like
    any rerun with other rounding. With ``every_k > 1`` the average still
    updates on every step.

    Args:
      rho: perturbation radius >= 0 (float, array or schedule; a schedule's negative
        values are clipped to 0).
      theta: weight of the newest gradient in ``(0, 1]`` (float, array or schedule; a
        schedule's values are clipped into ``[0, 1]``).
      adaptive: scale-invariant (ASAM-style) perturbation of ``d_t``.
      eta: offset of the adaptive scaling, >= 0.
      eps: added to the norm, > 0.
      axis_name: data-parallel axis inside ``shard_map``/``pmap``.
      ascent: ``'global'`` or ``'per_device'`` (m-sharpness), with ``axis_name``.
      every_k: sharpness-aware gradient every k-th step, plain gradient otherwise.
      keep_perturbation: keep the last perturbation in the state (see
        :func:`vasso_jax.sharpness_aware`).
      perturbed_dtype: dtype of the point given to ``grad_fn``; ``None``: the params'
        precision, at least float32 (see :func:`vasso_jax.sharpness_aware`).
      direction_dtype: dtype of the stored ``d``; ``None`` keeps the params' dtype.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state holds exactly one
      params-sized buffer (``d``) plus scalars. ``optax.tree.get(state, 'cosine')``
      reads :math:`\cos(g_t, d_t)`, the agreement of the adversary with the
      current minibatch.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> import vasso_jax
      >>> loss = lambda w: jnp.sum((w - 1.0) ** 4)
      >>> tx = optax.chain(vasso_jax.vasso(rho=0.05, theta=0.4), optax.sgd(0.1))
      >>> w = jnp.zeros(3)
      >>> state = tx.init(w)
      >>> for _ in range(50):
      ...   u, state = tx.update(jax.grad(loss)(w), state, w, grad_fn=jax.grad(loss))
      ...   w = optax.apply_updates(w, u)
      >>> print(float(loss(w)) < 1e-2, float(optax.tree.get(state, 'cosine')) > 0.99)
      True True

    References:
      Li & Giannakis, `Enhancing Sharpness-Aware Optimization Through Variance
      Suppression <https://arxiv.org/abs/2309.15639>`_, NeurIPS 2023.
    """
    return _sharpness.sharpness_aware(
        rho,
        _directions.vasso_direction(theta, dtype=direction_dtype),
        adaptive=adaptive,
        eta=eta,
        eps=eps,
        axis_name=axis_name,
        ascent=ascent,
        every_k=every_k,
        keep_perturbation=keep_perturbation,
        perturbed_dtype=perturbed_dtype,
    )


def asam(
    rho: optax.ScalarOrSchedule = 0.5,
    *,
    eta: jax.typing.ArrayLike = 0.01,
    eps: jax.typing.ArrayLike = 1e-12,
    axis_name: Hashable | None = None,
    ascent: Literal['global', 'per_device'] = 'global',
    every_k: int = 1,
    keep_perturbation: bool = False,
    perturbed_dtype: jax.typing.DTypeLike | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Adaptive SAM (ASAM): SAM with a scale-invariant neighbourhood.

    .. math::

      T_w = |w| + \eta,\qquad
      \epsilon_t = \rho\, \frac{T_w^2\, g_t}{\lVert T_w\, g_t \rVert}.

    Equal to ``sam(rho, adaptive=True, eta=eta)``. ``T_w`` applies to every
    parameter (biases and normalisation scales included).

    Args:
      rho: perturbation radius >= 0; ASAM needs larger radii than SAM (the paper
        uses 0.5 on CIFAR-10 and 1.0 on CIFAR-100).
      eta: offset keeping zero weights perturbable, >= 0.
      eps: added to the norm, > 0.
      axis_name: data-parallel axis inside ``shard_map``/``pmap``.
      ascent: ``'global'`` or ``'per_device'``, with ``axis_name``.
      every_k: sharpness-aware gradient every k-th step, plain gradient otherwise.
      keep_perturbation: keep the last perturbation in the state (see
        :func:`vasso_jax.sharpness_aware`).
      perturbed_dtype: dtype of the point given to ``grad_fn``; ``None``: the params'
        precision, at least float32 (see :func:`vasso_jax.sharpness_aware`).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with no params-sized state.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import vasso_jax
      >>> loss = lambda w: jnp.sum(w ** 2)
      >>> tx = vasso_jax.asam(rho=1.0, eta=0.0)
      >>> w = jnp.array([1.0, 0.0])
      >>> g, _ = tx.update(jax.grad(loss)(w), tx.init(w), w, grad_fn=jax.grad(loss))
      >>> print(g)  # zero weights are not perturbed when eta = 0
      [4. 0.]

    References:
      Kwon et al., `ASAM: Adaptive Sharpness-Aware Minimization for
      Scale-Invariant Learning of Deep Neural Networks
      <https://arxiv.org/abs/2102.11600>`_, ICML 2021.
    """
    return sam(
        rho,
        adaptive=True,
        eta=eta,
        eps=eps,
        axis_name=axis_name,
        ascent=ascent,
        every_k=every_k,
        keep_perturbation=keep_perturbation,
        perturbed_dtype=perturbed_dtype,
    )


def friendly_sam(
    rho: optax.ScalarOrSchedule = 0.05,
    sigma: jax.typing.ArrayLike = 1.0,
    lmbda: jax.typing.ArrayLike = 0.9,
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
    r"""Friendly-SAM (F-SAM): perturb along the batch-specific gradient component.

    .. math::

      d_t = g_t - \sigma\, m_{t-1},\quad m_t = \lambda\, m_{t-1} + (1-\lambda)\, g_t,
      \qquad \epsilon_t = \rho\, \frac{d_t}{\lVert d_t \rVert}

    with :math:`d_1 = m_1 = g_1`; see :func:`vasso_jax.friendly_direction`.

    Args:
      rho: perturbation radius >= 0 (float, array or schedule; a schedule's negative
        values are clipped to 0).
      sigma: fraction of the momentum removed, in ``[0, 1]``.
      lmbda: momentum coefficient in ``[0, 1)``.
      adaptive: scale-invariant (ASAM-style) perturbation.
      eta: offset of the adaptive scaling, >= 0.
      eps: added to the norm, > 0.
      axis_name: data-parallel axis inside ``shard_map``/``pmap``.
      ascent: ``'global'`` or ``'per_device'``, with ``axis_name``.
      every_k: sharpness-aware gradient every k-th step, plain gradient otherwise.
      keep_perturbation: keep the last perturbation in the state (see
        :func:`vasso_jax.sharpness_aware`).
      perturbed_dtype: dtype of the point given to ``grad_fn``; ``None``: the params'
        precision, at least float32 (see :func:`vasso_jax.sharpness_aware`).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` holding one params-sized buffer.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> import vasso_jax
      >>> tx = vasso_jax.friendly_sam(rho=0.05, sigma=1.0, lmbda=0.9)
      >>> w = jnp.ones(3)
      >>> g, state = tx.update(2 * w, tx.init(w), w, grad_fn=lambda p: 2 * p)
      >>> print(g.round(4))  # the first step is plain SAM
      [2.0577 2.0577 2.0577]

    References:
      Li et al., `Friendly Sharpness-Aware Minimization
      <https://arxiv.org/abs/2403.12350>`_, CVPR 2024.
    """
    return _sharpness.sharpness_aware(
        rho,
        _directions.friendly_direction(sigma, lmbda),
        adaptive=adaptive,
        eta=eta,
        eps=eps,
        axis_name=axis_name,
        ascent=ascent,
        every_k=every_k,
        keep_perturbation=keep_perturbation,
        perturbed_dtype=perturbed_dtype,
    )
