"""Flax NNX integration: the two passes of a sharpness-aware step on a stateful model.

Imports flax (``pip install vasso_jax[flax]``); the core package does not. Needs flax >= 0.12
(``nnx.as_pure`` and ``nnx.Optimizer(model, tx, wrt=...)``).
"""

from collections.abc import Callable
from typing import Any

import flax
import jax
from flax import nnx

if not hasattr(nnx, 'as_pure'):
    raise ImportError(
        f'vasso_jax.nnx needs flax>=0.12 (found {flax.__version__}); pip install -U "flax>=0.12".'
    )

__all__ = ('value_and_grad',)


# nnx.split of the pair (model, args) keys the model's state by 0, in graph and tree mode.
_MODEL_KEY = jax.tree_util.DictKey(0)


def _flatten(tree):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(nnx.as_pure(tree))
    return [path for path, _ in leaves], [leaf for _, leaf in leaves], treedef


def value_and_grad(
    f: Callable[..., Any], *, has_aux: bool = False, wrt: Any = nnx.Param
) -> Callable[..., tuple[Any, nnx.State, Callable[[Any], Any]]]:
    r"""``nnx.value_and_grad`` that also returns the second pass, ``grad_fn``.

    A sharpness-aware link needs the gradient at the perturbed weights on the same
    minibatch, :math:`\nabla L_{\mathcal B}(w + \epsilon)`, evaluated as if the first pass
    had not happened: the same dropout masks and the same BatchNorm statistics. An NNX
    model carries both as mutable state (``nnx.BatchStat``, ``nnx.RngCount``), so calling
    ``f`` on the live model twice would update the running statistics twice and draw a new
    dropout mask. This wrapper snapshots all state of ``f``'s arguments before the first
    pass, runs ``nnx.value_and_grad`` on the live model (its updates stay: running
    statistics move once, RNG streams advance once), and returns ``grad_fn(p)``, which
    evaluates ``f`` on a copy of the snapshot whose ``wrt`` variables are replaced by
    ``p``. The copy's mutations are discarded.

    ``grad_fn`` takes ``p`` in any tree form whose paths are the model's (what
    ``nnx.Optimizer.update`` hands to ``tx.update``: an ``nnx.State`` of arrays, or an
    ``nnx.State`` of ``Variable`` s, or a nested dict) and returns plain arrays in the
    structure of ``p``, so the link's structure check passes. ``p`` may cover a subset of
    the ``wrt`` variables (an optimizer with a narrower ``wrt``); the others keep their
    values from before the step.

    Args:
      f: the loss, ``f(model, *args)`` (positional arguments, as for
        ``nnx.value_and_grad``) returning a scalar, or ``(scalar, aux)`` with
        ``has_aux=True``. It is differentiated with respect to the ``wrt`` variables of its
        first argument.
      has_aux: whether ``f`` returns ``(loss, aux)``.
      wrt: an NNX filter selecting the variables to differentiate, as in
        ``nnx.Optimizer(model, tx, wrt=...)``; one other than ``nnx.Param`` needs graph
        mode (flax's default).

    Returns:
      A function with ``f``'s signature returning ``(value, grads, grad_fn)``: ``value``
      and ``grads`` exactly as ``nnx.value_and_grad(f, has_aux=has_aux)`` gives them (grads
      an ``nnx.State``), and ``grad_fn`` to pass on as
      ``optimizer.update(model, grads, grad_fn=grad_fn)``. Use it inside one traced step
      (``nnx.jit``); ``grad_fn`` closes over that step's values.

    Examples:
      >>> import jax.numpy as jnp, optax, vasso_jax, vasso_jax.nnx
      >>> from flax import nnx
      >>> model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
      >>> optimizer = nnx.Optimizer(
      ...     model, optax.chain(vasso_jax.vasso(rho=0.1), optax.sgd(0.1)), wrt=nnx.Param)
      >>> loss_fn = lambda model, x, y: jnp.mean((model(x) - y) ** 2)
      >>> @nnx.jit
      ... def train_step(model, optimizer, x, y):
      ...   loss, grads, grad_fn = vasso_jax.nnx.value_and_grad(loss_fn)(model, x, y)
      ...   optimizer.update(model, grads, grad_fn=grad_fn)
      ...   return loss
      >>> x, y = jnp.ones((8, 3)), jnp.zeros((8, 1))
      >>> losses = [float(train_step(model, optimizer, x, y)) for _ in range(3)]
      >>> losses[2] < losses[0]
      True

    References:
      Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
      Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021 (the second pass's
      BatchNorm updates are discarded, as in the authors' code).
    """
    # The default is nnx.value_and_grad's own (which also works in tree mode, where
    # DiffState is not allowed); another filter needs graph mode.
    argnums = 0 if wrt is nnx.Param else nnx.DiffState(0, wrt)
    first_pass = nnx.value_and_grad(f, argnums=argnums, has_aux=has_aux)

    def wrapped(model, *args):
        # Arrays are immutable: as_pure keeps the values as they are now, before pass 1.
        graphdef, state = nnx.split((model, args))
        snap_paths, snap_leaves, snap_treedef = _flatten(state)
        slot_of = {path: i for i, path in enumerate(snap_paths)}

        value, grads = first_pass(model, *args)

        def grad_fn(p):
            paths, leaves, treedef = _flatten(p)
            slots = [slot_of.get((_MODEL_KEY, *path)) for path in paths]
            if None in slots:
                missing = jax.tree_util.keystr(paths[slots.index(None)])
                raise ValueError(
                    f'vasso_jax.nnx: grad_fn got a leaf at {missing} that the model lacks; '
                    'pass the params of the model given to value_and_grad.'
                )

            def loss_at(perturbed):
                values = list(snap_leaves)
                for slot, leaf in zip(slots, perturbed):
                    values[slot] = leaf
                copy = nnx.merge(graphdef, jax.tree_util.tree_unflatten(snap_treedef, values))
                out = f(copy[0], *copy[1])
                return out[0] if has_aux else out

            return jax.tree_util.tree_unflatten(treedef, jax.grad(loss_at)(leaves))

        return value, grads, grad_fn

    return wrapped
