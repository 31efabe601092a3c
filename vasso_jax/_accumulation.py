"""Gradient accumulation for two-pass methods: both passes averaged over micro-batches."""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from vasso_jax import _checks


def _split_leading(owner: str, tree: Any, k: int) -> Any:
    def split(x):
        x = jnp.asarray(x)
        if x.ndim == 0 or x.shape[0] % k:
            size = x.shape[0] if x.ndim else 'a scalar'
            raise ValueError(
                f'{owner}: a batch leaf of shape {x.shape} ({size} along axis 0) does not split '
                f'into num_micro_batches={k} equal parts; pick a divisor of the batch size.'
            )
        # Strided: micro-batch i holds examples i, i + k, ..., so a batch sharded along
        # axis 0 keeps its sharding and every device works on every micro-batch.
        return jnp.swapaxes(x.reshape((x.shape[0] // k, k, *x.shape[1:])), 0, 1)

    return jax.tree.map(split, tree)


def _accumulator_dtype(owner: str, dtype):
    if not jnp.issubdtype(dtype, jnp.inexact):
        raise ValueError(
            f'{owner}: fun returned a leaf of dtype {dtype}, which has no mean; return '
            'floating values only (counts as float32, RNG state outside fun).'
        )
    return jnp.promote_types(dtype, jnp.float32)


def microbatched(
    fun: Callable[..., Any], num_micro_batches: int, *, argnums: int | Sequence[int] = 1
) -> Callable[..., Any]:
    r"""Evaluates ``fun`` on micro-batches one at a time and returns the mean of its outputs.

    With the batch :math:`\mathcal B` split into :math:`k` equal micro-batches
    :math:`\mathcal B_1, \dots, \mathcal B_k` along axis 0 (strided),

    .. math::

      \texttt{microbatched(fun, k)}(w, \mathcal B) = \frac1k \sum_{i=1}^k
      \texttt{fun}(w, \mathcal B_i),

    computed with ``lax.scan``, so activations of one micro-batch live at a time. For a
    loss that is a mean over examples, ``microbatched(jax.grad(loss), k)`` is the
    full-batch gradient up to float rounding. Use the same wrapped function for **both**
    passes of a sharpness-aware step: the raw gradient at ``w`` and ``grad_fn``, the
    gradient at the perturbed point, each averaged over all ``k`` micro-batches, with one
    perturbation computed from the full-batch gradient.

    Do not put ``optax.MultiSteps`` around a sharpness-aware chain instead: ``MultiSteps``
    calls the inner ``update`` on every micro-step with the running mean of the raw
    gradients and *that* micro-step's ``grad_fn``, and keeps the result of the last call.
    The emitted update is then the perturbed gradient of the last micro-batch only, and the
    second pass runs (and is thrown away) on every micro-step. A link cannot see that it is
    inside ``MultiSteps``; :class:`vasso_jax.linen.TrainState` refuses the combination.

    Args:
      fun: any function whose output is a pytree of floating arrays (other dtypes raise a
        ``ValueError``): a gradient function, ``jax.value_and_grad(loss)`` (the loss is
        averaged too), or one with auxiliary outputs, which are averaged as well.
      num_micro_batches: ``k >= 1``; ``1`` calls ``fun`` directly.
      argnums: the positional argument(s) holding the batch, pytrees whose leaves share the
        leading axis; it must divide by ``k``. Micro-batch ``i`` holds examples ``i, i + k,
        i + 2k, ...``: a batch sharded along axis 0 needs no communication to split.
        Other arguments (params, an RNG key) are passed whole to every micro-batch, so a
        key gives each micro-batch the same key; both passes see the same micro-batches
        in the same order.

    Returns:
      A function with ``fun``'s signature returning the mean of its outputs, each leaf
      accumulated in at least float32 and cast back to ``fun``'s output dtype.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, vasso_jax
      >>> loss = lambda w, batch: jnp.mean((batch['x'] @ w - batch['y']) ** 2)
      >>> batch = {'x': jnp.arange(24.0).reshape(8, 3) / 10, 'y': jnp.ones(8)}
      >>> grad = vasso_jax.microbatched(jax.grad(loss), num_micro_batches=4)
      >>> w = jnp.zeros(3)
      >>> bool(jnp.allclose(grad(w, batch), jax.grad(loss)(w, batch)))
      True
      >>> tx = optax.chain(vasso_jax.sam(rho=0.05), optax.sgd(0.1))
      >>> updates, state = tx.update(grad(w, batch), tx.init(w), w,
      ...                            grad_fn=lambda p: grad(p, batch))

    References:
      Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
      Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021.
    """
    owner = 'microbatched'
    _checks.check_positive_int(owner, 'num_micro_batches', num_micro_batches)
    k = int(num_micro_batches)
    batch_args = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    if not batch_args:
        raise ValueError(f'{owner}: argnums=() is empty; name the batch argument, e.g. argnums=1.')

    @functools.wraps(fun)
    def wrapped(*args):
        if k == 1:
            return fun(*args)
        if max(batch_args) >= len(args):
            raise ValueError(
                f'{owner}: argnums={argnums} but the function got {len(args)} positional '
                'arguments; pass the batch positionally.'
            )

        def on(parts):
            full = list(args)
            for i, part in zip(batch_args, parts):
                full[i] = part
            return fun(*full)

        stacked = tuple(_split_leading(owner, args[i], k) for i in batch_args)
        first = jax.tree.map(lambda x: x[0], stacked)
        out_shapes = jax.eval_shape(on, first)
        dtypes = jax.tree.map(lambda s: _accumulator_dtype(owner, s.dtype), out_shapes)
        zeros = jax.tree.map(lambda s, d: jnp.zeros(s.shape, d), out_shapes, dtypes)

        def add(total, parts):
            out = on(parts)
            return jax.tree.map(lambda t, o: t + o.astype(t.dtype), total, out), None

        total, _ = jax.lax.scan(add, zeros, stacked)
        return jax.tree.map(lambda t, s: (t / k).astype(s.dtype), total, out_shapes)

    return wrapped


def is_multi_steps(tx: Any) -> bool:
    """Whether ``tx`` is an ``optax.MultiSteps`` or its ``gradient_transformation()``."""
    owner = getattr(getattr(tx, 'update', None), '__self__', None)
    return isinstance(tx, optax.MultiSteps) or isinstance(owner, optax.MultiSteps)
