"""Data-parallel helpers for the link: averaging over a mesh axis inside shard_map/pmap.

Inside ``shard_map`` (with JAX's default ``check_vma=True``) every value carries
the set of mesh axes it varies over. The gradient with respect to a replicated
(device-invariant) input is then *summed* over the axis by autodiff: the
transpose of the implicit broadcast is a ``psum``. The helpers here make the
link correct whether or not the user cast their params to device-varying.
"""

import jax


def _varying_axes(x) -> frozenset:
    """Mesh axes ``x`` varies over inside ``shard_map``; empty where JAX does not track them."""
    aval = jax.typeof(x)
    vma = getattr(aval, 'vma', None)
    if vma is None:  # newer JAX keeps it under manual_axis_type
        vma = getattr(getattr(aval, 'manual_axis_type', None), 'varying', None)
    return frozenset(vma or ())


def tracks_variance(axis_name) -> bool:
    """True inside ``shard_map(check_vma=True)``; False under ``pmap`` and ``vmap``."""
    return axis_name in _varying_axes(jax.lax.axis_index(axis_name))


def device_varying(tree, axis_name):
    """Marks each leaf of ``tree`` as varying over ``axis_name`` (idempotent).

    Use it on replicated params inside ``jax.shard_map`` before taking per-device
    gradients: ``jax.grad(loss)(vasso_jax.device_varying(params, 'data'), batch)``.
    Unlike a bare ``jax.lax.pcast``, it leaves already-varying leaves alone, so the
    same gradient function serves both passes of every ``ascent`` mode. Outside
    ``shard_map`` (``pmap``, ``vmap``) it returns ``tree`` unchanged.

    Args:
      tree: a pytree of arrays.
      axis_name: the mesh axis.

    Returns:
      ``tree`` with every leaf device-varying over ``axis_name``.
    """
    if not tracks_variance(axis_name):
        return tree

    def cast(x):
        if axis_name in _varying_axes(x):
            return x
        return jax.lax.pcast(x, axis_name, to='varying')

    return jax.tree.map(cast, tree)


def axis_mean(tree, axis_name):
    """Average over the axis of per-device values.

    A leaf that is device-invariant although it should be per-device was already
    summed by autodiff (see the module docstring); it is divided by the axis size
    instead of averaged again.
    """
    tracked = tracks_variance(axis_name)
    size = jax.lax.psum(1, axis_name)

    def mean(x):
        if tracked and axis_name not in _varying_axes(x):
            return x / size
        return jax.lax.pmean(x, axis_name)

    return jax.tree.map(mean, tree)


def is_per_device(tree, axis_name) -> bool:
    """False when shard_map shows that some leaf is not per-device any more."""
    if not tracks_variance(axis_name):
        return True
    return all(axis_name in _varying_axes(x) for x in jax.tree.leaves(tree))
