"""Flax Linen integration: a TrainState that forwards ``grad_fn`` and the two-pass gradient.

Imports flax (``pip install vasso_jax[flax]``); the core package does not.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import optax
from flax.training import train_state

from vasso_jax import _accumulation

__all__ = ('TrainState', 'value_and_grad')


def value_and_grad(
    loss_fn: Callable[..., Any], *, has_aux: bool = False
) -> Callable[..., tuple[Any, Any, Callable[[Any], Any]]]:
    r"""``jax.value_and_grad`` that also returns the second pass, ``grad_fn``.

    ``grad_fn(p)`` is the gradient of ``loss_fn(p, *args)`` with the arguments of the first
    pass: the same batch, the same dropout key and the model state (``batch_stats``) as it
    was **before** the first pass. Its auxiliary output, e.g. the mutated ``batch_stats``
    of ``apply(..., mutable=['batch_stats'])``, is discarded, so the running statistics
    move once per step, by the first pass (the SAM authors' policy). Write the loss as the
    flax examples do, returning the mutated collections as ``aux``::

      def loss_fn(params, batch_stats, batch, rng):
        logits, updates = state.apply_fn(
            {'params': params, 'batch_stats': batch_stats}, batch['x'], train=True,
            rngs={'dropout': rng}, mutable=['batch_stats'])
        return cross_entropy(logits, batch['y']), updates

    Args:
      loss_fn: ``loss_fn(params, *args, **kwargs)`` returning a scalar, or
        ``(scalar, aux)`` with ``has_aux=True``; differentiated with respect to ``params``.
      has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

    Returns:
      A function with ``loss_fn``'s signature returning ``(value, grads, grad_fn)``,
      ``value`` and ``grads`` as ``jax.value_and_grad(loss_fn, has_aux=has_aux)`` gives
      them; pass ``grad_fn`` on to :meth:`TrainState.apply_gradients` or ``tx.update``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, vasso_jax, vasso_jax.linen
      >>> loss = lambda w, x: jnp.sum((x @ w) ** 2)
      >>> w, x = jnp.ones(2), jnp.ones((3, 2))
      >>> value, grads, grad_fn = vasso_jax.linen.value_and_grad(loss)(w, x)
      >>> print(value, grads, grad_fn(2 * w))
      12.0 [12. 12.] [24. 24.]
    """
    first_pass = jax.value_and_grad(loss_fn, has_aux=has_aux)

    def wrapped(params, *args, **kwargs):
        value, grads = first_pass(params, *args, **kwargs)
        grad_fn = lambda p: first_pass(p, *args, **kwargs)[1]
        return value, grads, grad_fn

    return wrapped


class TrainState(train_state.TrainState):
    """``flax.training.train_state.TrainState`` whose ``apply_gradients`` forwards ``grad_fn``.

    Drop-in: subclass it as you would flax's (e.g. to add ``batch_stats``). Keyword
    arguments of :meth:`apply_gradients` that name a field are ``.replace()``-d as in flax;
    ``grad_fn`` and any others are passed to ``tx.update`` (optax's extra args).

    Examples:
      >>> import jax, jax.numpy as jnp, optax, vasso_jax, vasso_jax.linen
      >>> import flax.linen as nn
      >>> model = nn.Dense(1)
      >>> x, y = jnp.ones((4, 3)), jnp.zeros((4, 1))
      >>> state = vasso_jax.linen.TrainState.create(
      ...     apply_fn=model.apply, params=model.init(jax.random.key(0), x)['params'],
      ...     tx=optax.chain(vasso_jax.sam(rho=0.05), optax.sgd(0.1)))
      >>> loss_fn = lambda p: jnp.mean((state.apply_fn({'params': p}, x) - y) ** 2)
      >>> loss, grads, grad_fn = vasso_jax.linen.value_and_grad(loss_fn)(state.params)
      >>> state = state.apply_gradients(grads=grads, grad_fn=grad_fn)
      >>> int(state.step)
      1
    """

    def apply_gradients(self, *, grads, grad_fn: Callable[[Any], Any] | None = None, **kwargs):
        """Like flax's, and ``tx.update(grads, opt_state, params, grad_fn=grad_fn, ...)``.

        Args:
          grads: the gradient at ``self.params`` (same structure).
          grad_fn: ``p -> gradient at p`` on the same batch, for a sharpness-aware link
            (see :func:`value_and_grad`). A link without it raises its one-line error.
          **kwargs: fields of the state to replace (``batch_stats=...``); the others are
            extra arguments of ``tx.update``.

        Returns:
          The new state, ``step`` incremented.

        Raises:
          ValueError: if ``grad_fn`` is given and ``tx`` is an ``optax.MultiSteps``, which
            would take the second pass on the last micro-batch only; use
            :func:`vasso_jax.microbatched` for both passes instead.
        """
        fields = {f.name for f in dataclasses.fields(self)}
        extra_args = {k: v for k, v in kwargs.items() if k not in fields}
        replaced = {k: v for k, v in kwargs.items() if k in fields}
        if grad_fn is not None:
            if _accumulation.is_multi_steps(self.tx):
                raise ValueError(
                    'TrainState.apply_gradients: optax.MultiSteps around a sharpness-aware '
                    'link takes pass 2 on the last micro-batch only; drop MultiSteps and '
                    'average both passes with vasso_jax.microbatched.'
                )
            extra_args['grad_fn'] = grad_fn
        # flax's own update (including its OVERWRITE_WITH_GRADIENT handling), with the
        # extra arguments bound to tx.update; the original tx is put back afterwards.
        tx = optax.with_extra_args_support(self.tx)
        bound = optax.GradientTransformationExtraArgs(
            tx.init, functools.partial(tx.update, **extra_args)
        )
        new_state = super(TrainState, self.replace(tx=bound)).apply_gradients(
            grads=grads, **replaced
        )
        return new_state.replace(tx=self.tx)
