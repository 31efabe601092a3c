"""Model-agnostic, jit-friendly diagnostics: Hessian top eigenvalue, adversary stability,
m-sharpness. Losses close over their batch (m-sharpness takes `(params, batch)`); all
reductions are float32.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import flatten_util

_HIGHEST = jax.lax.Precision.HIGHEST
_METHODS = ('lanczos', 'power')


def _flat_hvp(loss_fn, params):
    """Hessian-vector product (forward-over-reverse) on the float32 raveled params."""
    flat, unravel = flatten_util.ravel_pytree(params)
    grad_fn = jax.grad(loss_fn)
    to_tree = lambda v: unravel(v.astype(flat.dtype))

    def matvec(v):
        _, hv = jax.jvp(grad_fn, (params,), (to_tree(v),))
        return flatten_util.ravel_pytree(hv)[0].astype(jnp.float32)

    return flat.size, matvec, to_tree


def _top_ritz(alphas, betas, last):
    """Top eigenpair of the Lanczos tridiagonal T restricted to rows 0..last."""
    k = alphas.shape[0]
    active = jnp.arange(k) <= last
    off = jnp.where(jnp.arange(k - 1) < last, betas[:-1], 0.0)
    # Inactive rows decouple; push them below the Gershgorin bound of the active block.
    floor = -(jnp.max(jnp.abs(alphas)) + 2.0 * jnp.max(jnp.abs(betas)) + 1.0)
    t = jnp.diag(jnp.where(active, alphas, floor)) + jnp.diag(off, 1) + jnp.diag(off, -1)
    evals, evecs = jnp.linalg.eigh(t)
    return evals[-1], evecs[:, -1]


def _iterate(body, carry, k, unroll):
    """``while not stopped and count < k: carry = body(carry)``; the stop flag is
    ``carry[-1]`` and the count ``carry[0]``.

    Unrolled, the ``k`` bodies are straight-line code and a stopped carry passes through
    unchanged (its later bodies are computed and discarded): the same result without a loop,
    whose body XLA:CPU runs convolutions in many times slower than outside one (jax#12868).
    """
    if not unroll:
        return jax.lax.while_loop(lambda c: (c[0] < k) & ~c[-1], body, carry)
    for _ in range(k):
        stopped = carry[-1]
        carry = jax.tree.map(lambda old, new: jnp.where(stopped, old, new), carry, body(carry))
    return carry


def _lanczos(matvec, v0, k, tol, unroll):
    eps = jnp.finfo(jnp.float32).eps

    def body(carry):
        j, basis, alphas, betas, scale, theta, _ = carry
        w = matvec(basis[j])
        alpha = jnp.vdot(basis[j], w, precision=_HIGHEST)
        for _ in range(2):  # Full reorthogonalisation, twice is enough; unused rows are 0.
            w = w - jnp.matmul(jnp.matmul(basis, w, precision=_HIGHEST), basis, precision=_HIGHEST)
        beta = jnp.linalg.norm(w)
        scale = jnp.maximum(scale, jnp.abs(alpha) + beta)
        breakdown = beta <= eps * scale  # Krylov space invariant (or H = 0): stop, no NaN.
        v_next = jnp.where(breakdown, 0.0, w / jnp.where(breakdown, 1.0, beta))
        basis = basis.at[j + 1].set(v_next, mode='drop')
        alphas, betas = alphas.at[j].set(alpha), betas.at[j].set(jnp.where(breakdown, 0.0, beta))
        stop = breakdown
        if tol > 0.0:
            new_theta = _top_ritz(alphas, betas, j)[0]
            stop = stop | ((j > 0) & (jnp.abs(new_theta - theta) < tol * jnp.abs(new_theta)))
            theta = new_theta
        return j + 1, basis, alphas, betas, scale, theta, stop

    basis = jnp.zeros((k, v0.size), jnp.float32).at[0].set(v0)
    zeros, zero = jnp.zeros((k,), jnp.float32), jnp.zeros((), jnp.float32)
    carry = (jnp.zeros((), jnp.int32), basis, zeros, zeros, zero, zero, jnp.array(False))
    j, basis, alphas, betas, *_ = _iterate(body, carry, k, unroll)
    theta, s = _top_ritz(alphas, betas, j - 1)
    v = jnp.matmul(s, basis, precision=_HIGHEST)
    return theta, v / jnp.maximum(jnp.linalg.norm(v), 1e-30)


def _power(matvec, v0, k, tol, unroll):
    def body(carry):
        i, v, lam, _ = carry
        w = matvec(v)
        new_lam = jnp.vdot(v, w, precision=_HIGHEST)  # Rayleigh quotient, v is unit.
        norm = jnp.linalg.norm(w)
        v = jnp.where(norm > 0, w / jnp.where(norm > 0, norm, 1.0), v)
        stop = (i > 0) & (jnp.abs(new_lam - lam) < tol * jnp.abs(new_lam))
        return i + 1, v, new_lam, stop

    carry = (jnp.zeros((), jnp.int32), v0, jnp.zeros((), jnp.float32), jnp.array(False))
    _, v, lam, _ = _iterate(body, carry, k, unroll)
    return lam, v


def hessian_top_eigenpair(
    loss_fn: Callable[[Any], jax.Array],
    params: Any,
    *,
    num_iters: int = 20,
    method: str = 'lanczos',
    key: jax.Array | None = None,
    tol: float = 0.0,
    unroll: bool = False,
) -> tuple[jax.Array, Any]:
    r"""Top Hessian eigenvalue and its unit eigenvector, from Hessian-vector products.

    With :math:`H = \nabla^2 L(w)` applied matrix-free as
    ``jax.jvp(jax.grad(loss_fn), (w,), (v,))`` on the float32 raveled parameters:

    - ``'lanczos'`` (default): ``k = min(num_iters, dim)`` Lanczos steps from a random unit
      vector with full reorthogonalisation, :math:`H V_k = V_k T_k + \beta_k v_{k+1} e_k^T`;
      returns the **largest algebraic** eigenvalue :math:`\lambda_{\max}` of the tridiagonal
      :math:`T_k` (``eigh``) and its Ritz vector :math:`V_k s`. Stops early on breakdown
      (invariant Krylov space, e.g. :math:`H = 0`).
    - ``'power'``: ``v <- Hv / ||Hv||``; returns the **dominant** eigenvalue (largest
      :math:`|\lambda|`, with its sign) as the Rayleigh quotient :math:`v^T H v`. It equals
      :math:`\lambda_{\max}` when :math:`\lambda_{\max} \ge |\lambda_{\min}|` (the usual case
      near a minimum) and converges as :math:`(\lambda_2/\lambda_1)^{2t}`: use more steps.

    HVPs run in the params' dtypes (cast ``params`` to float32 first for a float32 Hessian);
    the Krylov basis, dot products and ``eigh`` are float32.

    Args:
      loss_fn: scalar loss of ``params`` alone (close over the batch).
      params: pytree of parameters where the Hessian is evaluated.
      num_iters: maximum number of Hessian-vector products (>= 1).
      method: ``'lanczos'`` or ``'power'``.
      key: PRNG key for the start vector; ``jax.random.key(0)`` if ``None``.
      tol: stop early once the eigenvalue estimate changes by less than ``tol`` (relative)
        between steps; ``0`` runs all ``num_iters`` steps.
      unroll: trace the ``num_iters`` steps as straight-line code instead of a
        ``lax.while_loop`` (steps after an early stop are computed and discarded; the result
        is the same). Compiles ``num_iters`` Hessian-vector products, but on CPU it avoids
        XLA's slow convolutions inside loop bodies (`jax#12868
        <https://github.com/jax-ml/jax/issues/12868>`_): 38x per step for a small
        CNN here (``BENCHMARKS.md``). Leave it off on GPU/TPU.

    Returns:
      ``(eigenvalue, eigenvector)``: a float32 scalar and a unit-norm pytree like ``params``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import vasso_jax
      >>> loss_fn = lambda p: 1.5 * p['a'][0] ** 2 + 0.5 * p['a'][1] ** 2 + p['b'] ** 2
      >>> params = {'a': jnp.ones(2), 'b': jnp.array(1.0)}
      >>> value, vector = vasso_jax.hessian_top_eigenpair(loss_fn, params)
      >>> print(round(float(value), 3), round(abs(float(vector['a'][0])), 3))
      3.0 1.0

    References:
      Lanczos, `An iteration method for the solution of the eigenvalue problem of linear
      differential and integral operators <https://doi.org/10.6028/jres.045.026>`_, 1950.
      Yao et al., `PyHessian: Neural Networks Through the Lens of the Hessian
      <https://arxiv.org/abs/1912.07145>`_, 2020.
    """
    if isinstance(num_iters, bool) or not isinstance(num_iters, int) or num_iters < 1:
        raise ValueError(f'num_iters must be an int >= 1, got {num_iters!r}.')
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}.")
    if not tol >= 0.0:
        raise ValueError(f'tol must be >= 0 (0 runs all num_iters steps), got {tol!r}.')
    dim, matvec, to_tree = _flat_hvp(loss_fn, params)
    if not dim:
        raise ValueError('params has no array elements; pass the parameters to probe.')
    key = jax.random.key(0) if key is None else key
    v0 = jax.random.normal(key, (dim,), jnp.float32)
    v0 = v0 / jnp.linalg.norm(v0)
    if method == 'lanczos':
        value, vector = _lanczos(matvec, v0, min(num_iters, dim), float(tol), bool(unroll))
    else:
        value, vector = _power(matvec, v0, num_iters, float(tol), bool(unroll))
    return value, to_tree(vector)


def hessian_top_eigenvalue(
    loss_fn: Callable[[Any], jax.Array],
    params: Any,
    *,
    num_iters: int = 20,
    method: str = 'lanczos',
    key: jax.Array | None = None,
    tol: float = 0.0,
    unroll: bool = False,
) -> jax.Array:
    r"""Top Hessian eigenvalue of ``loss_fn`` at ``params`` (float32 scalar).

    The eigenvalue of :func:`hessian_top_eigenpair`, with the same arguments: largest
    algebraic :math:`\lambda_{\max}` for ``'lanczos'``, dominant (largest :math:`|\lambda|`,
    signed) for ``'power'``. Jit-friendly: wrap the call (closing over the batch) in ``jax.jit``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import vasso_jax
      >>> loss_fn = lambda w: 0.5 * jnp.sum(jnp.array([4.0, 2.0, 1.0]) * w ** 2)
      >>> print(round(float(vasso_jax.hessian_top_eigenvalue(loss_fn, jnp.ones(3))), 3))
      4.0
    """
    return hessian_top_eigenpair(
        loss_fn, params, num_iters=num_iters, method=method, key=key, tol=tol, unroll=unroll
    )[0]


def cosine_similarity(tree_a: Any, tree_b: Any, eps: float = 1e-12) -> jax.Array:
    r"""Global cosine similarity of two pytrees, in float32.

    .. math:: \cos(a, b) = \mathrm{clip}\Big(\frac{\langle a, b\rangle}
       {\max(\|a\|, \epsilon)\,\max(\|b\|, \epsilon)}, -1, 1\Big),

    with inner product and norms summed over all leaves, so a zero tree gives 0, not NaN.

    Examples:
      >>> import jax.numpy as jnp
      >>> import vasso_jax
      >>> a = {'w': jnp.array([1.0, 0.0]), 'b': jnp.array(0.0)}
      >>> b = {'w': jnp.array([1.0, 1.0]), 'b': jnp.array(0.0)}
      >>> print(round(float(vasso_jax.cosine_similarity(a, b)), 3))
      0.707
    """
    a, b = optax.tree.cast(tree_a, jnp.float32), optax.tree.cast(tree_b, jnp.float32)
    denom = jnp.maximum(optax.tree.norm(a), eps) * jnp.maximum(optax.tree.norm(b), eps)
    return jnp.clip(optax.tree.vdot(a, b) / denom, -1.0, 1.0)


class PerturbationStabilityState(NamedTuple):
    """State of :func:`perturbation_stability`; trees are float32 and params-sized."""

    count: jax.Array  # int32: number of perturbations seen, t.
    prev_direction: Any  # eps_t / ||eps_t|| (zeros before the first update).
    mean_cosine: jax.Array  # mean of cos(eps_s, eps_{s-1}) over s = 2..t.
    mean: Any  # Welford running mean of eps_s.
    m2: Any  # Welford sum of squared deviations, sum_s (eps_s - mean_t)^2 per coordinate.


class PerturbationStability(NamedTuple):
    """An optax-style ``(init, update)`` pair of pure functions."""

    init: Callable[[Any], PerturbationStabilityState]
    update: Callable[
        [Any, PerturbationStabilityState], tuple[dict[str, jax.Array], PerturbationStabilityState]
    ]


def perturbation_stability(eps: float = 1e-12) -> PerturbationStability:
    r"""Running stability metrics of the adversarial perturbations :math:`\epsilon_t`.

    ``update(eps_t, state)`` returns ``(metrics, state)`` with float32 scalars

    - ``'cosine'``: :math:`c_t = \cos(\epsilon_t, \epsilon_{t-1})` (0 at :math:`t = 1`);
    - ``'mean_cosine'``: :math:`\frac{1}{t-1}\sum_{s=2}^t c_s` (0 at :math:`t = 1`);
    - ``'variance'``: :math:`\frac{1}{t\,d}\sum_{s=1}^t \|\epsilon_s - \bar\epsilon_t\|^2`,
      the mean over the :math:`d` coordinates of the per-coordinate population variance
      (``trace(Cov) / d``), with :math:`\bar\epsilon_t` and the sum kept by Welford's update.

    The cosine is scale-free; the variance is not, so pass the same quantity each step (the
    perturbation or its direction). The state holds three float32 params-sized trees: this
    is an opt-in diagnostic, not part of the optimiser. Jit-friendly, no Python branching.

    Args:
      eps: floor on norms when normalising, so a zero perturbation gives cosine 0.

    Returns:
      A :class:`PerturbationStability` ``(init, update)`` pair; ``init(params)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import vasso_jax
      >>> tracker = vasso_jax.perturbation_stability()
      >>> state = tracker.init(jnp.zeros(2))
      >>> for e in [jnp.array([1.0, 0.0]), jnp.array([1.0, 1.0]), jnp.array([0.0, 1.0])]:
      ...     metrics, state = tracker.update(e, state)
      >>> print({k: round(float(v), 3) for k, v in metrics.items()})
      {'cosine': 0.707, 'mean_cosine': 0.707, 'variance': 0.222}

    References:
      Li & Giannakis, `Enhancing Sharpness-Aware Optimization Through Variance Suppression
      <https://arxiv.org/abs/2309.15639>`_, 2023. Welford, `Technometrics 4(3)
      <https://doi.org/10.1080/00401706.1962.10490022>`_, 1962.
    """

    def init_fn(params):
        zeros = optax.tree.zeros_like(optax.tree.cast(params, jnp.float32))
        return PerturbationStabilityState(
            jnp.zeros((), jnp.int32), zeros, jnp.zeros((), jnp.float32), zeros, zeros
        )

    def update_fn(perturbation, state):
        x = optax.tree.cast(perturbation, jnp.float32)
        count = state.count + 1
        n = count.astype(jnp.float32)
        cosine = cosine_similarity(x, state.prev_direction, eps)
        mean_cosine = jnp.where(
            count > 1,
            state.mean_cosine + (cosine - state.mean_cosine) / jnp.maximum(n - 1.0, 1.0),
            0.0,
        )
        delta = optax.tree.sub(x, state.mean)
        mean = jax.tree.map(lambda m, d: m + d / n, state.mean, delta)
        m2 = jax.tree.map(lambda s, d, xi, m: s + d * (xi - m), state.m2, delta, x, mean)
        dim = sum(leaf.size for leaf in jax.tree.leaves(x))
        variance = optax.tree.sum(m2) / (n * max(dim, 1))
        prev = optax.tree.scale(1.0 / jnp.maximum(optax.tree.norm(x), eps), x)
        metrics = {'cosine': cosine, 'mean_cosine': mean_cosine, 'variance': variance}
        return metrics, PerturbationStabilityState(count, prev, mean_cosine, mean, m2)

    return PerturbationStability(init_fn, update_fn)


def m_sharpness(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    batch: Any,
    *,
    rho: float,
    m: int,
    eps: float = 1e-12,
    groups_per_step: int | None = None,
) -> jax.Array:
    r"""First-order m-sharpness: mean SAM loss increase over groups of ``m`` examples.

    Split the ``B`` examples into :math:`G = B/m` groups; with :math:`L_g` the loss on group
    :math:`g` and :math:`g_g = \nabla L_g(w)`,

    .. math:: S_m(w) = \frac{1}{G}\sum_{g=1}^{G}\Big[L_g\Big(w + \rho\,
       \frac{g_g}{\|g_g\| + \epsilon}\Big) - L_g(w)\Big].

    ``m = B`` is the plain SAM sharpness of the batch; small ``m`` is the per-device quantity
    SAM implicitly minimises. Groups run in parallel with ``vmap`` (memory ~ ``G`` gradients)
    or, with ``groups_per_step``, through ``lax.map`` in chunks of that many groups.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar`` mean loss over the examples of ``batch``.
      params: pytree of parameters.
      batch: pytree whose leaves share a leading example axis of size ``B``.
      rho: ascent radius.
      m: examples per group; must divide ``B``.
      eps: added to the gradient norm, so a zero gradient gives a zero ascent.
      groups_per_step: ``None`` to vmap all groups, else the ``lax.map`` batch size.

    Returns:
      A float32 scalar.

    Examples:
      >>> import jax.numpy as jnp
      >>> import vasso_jax
      >>> loss_fn = lambda w, b: jnp.mean((b['x'] @ w - b['y']) ** 2)
      >>> batch = {'x': jnp.eye(4, 2), 'y': jnp.array([1.0, -1.0, 0.0, 0.0])}
      >>> s = vasso_jax.m_sharpness(loss_fn, jnp.zeros(2), batch, rho=0.1, m=2)
      >>> print(round(float(s), 4))
      0.0732

    References:
      Foret et al., `Sharpness-Aware Minimization for Efficiently Improving Generalization
      <https://arxiv.org/abs/2010.01412>`_, 2021. Andriushchenko & Flammarion, `Towards
      Understanding Sharpness-Aware Minimization <https://arxiv.org/abs/2206.06232>`_, 2022.
    """
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in jax.tree.leaves(batch)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f'batch leaves must share a leading example axis; got sizes {sizes}.')
    size = sizes.pop()
    if isinstance(m, bool) or not isinstance(m, int) or m < 1 or size % m:
        raise ValueError(f'm must be a positive divisor of the batch size {size}, got {m!r}.')
    if isinstance(rho, int | float) and rho < 0:
        raise ValueError(f'rho must be >= 0, got {rho!r}.')
    groups = jax.tree.map(lambda x: jnp.reshape(x, (size // m, m) + jnp.shape(x)[1:]), batch)

    def group_gap(group):
        loss, grads = jax.value_and_grad(loss_fn)(params, group)
        grads = optax.tree.cast(grads, jnp.float32)
        scale = rho / (optax.tree.norm(grads) + eps)  # The engine's convention.
        perturbed = jax.tree.map(lambda p, g: (p + scale * g).astype(p.dtype), params, grads)
        return jnp.asarray(loss_fn(perturbed, group), jnp.float32) - jnp.asarray(loss, jnp.float32)

    if groups_per_step is None:
        gaps = jax.vmap(group_gap)(groups)
    else:
        gaps = jax.lax.map(group_gap, groups, batch_size=groups_per_step)
    return jnp.mean(gaps)
