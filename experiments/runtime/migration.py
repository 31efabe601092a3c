"""Resuming a checkpoint written before a NamedTuple state gained fields.

When a library adds a field to its state (``vasso_jax.SharpnessAwareState`` gained
``last_finite`` and ``total_notfinite``), every older checkpoint has another structure than
the new state, and restoring it against the new state fails. :func:`restore_with_new_fields`
accepts exactly that difference and nothing else:

- every array in the checkpoint is at a path of the new state, with the same shape and dtype
  (a field removed or renamed, a shape or a dtype changed: not migrated);
- every array of the new state that the checkpoint lacks lies under a field of a
  ``NamedTuple`` that the checkpoint holds, without that field (a whole new ``NamedTuple``,
  e.g. another link in the chain, or a new key of a dict: not migrated).

Those new fields take their value from ``template``, the freshly initialised state of the
run, i.e. what the library gives them at step 0; every other array comes from the
checkpoint. Orbax stores a ``NamedTuple`` as a dict keyed by its field names, a tuple as a
list, so the paths are compared as names and indices.
"""

import collections
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

Path = tuple[str, ...]


def _name(key) -> str:
    """A key of a path as orbax stores it: a dict key, a field name or an index, as text."""
    for attribute in ('key', 'name', 'idx'):  # DictKey / FlattenedIndexKey, GetAttrKey, SequenceKey
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    raise TypeError(f'unknown pytree key {key!r}')


def _paths(tree) -> dict[Path, Any]:
    return {tuple(map(_name, path)): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _is_namedtuple(node) -> bool:
    return isinstance(node, tuple) and hasattr(node, '_fields')


def _child(node, key):
    if isinstance(key, jax.tree_util.GetAttrKey):
        return getattr(node, key.name)
    if isinstance(key, jax.tree_util.SequenceKey):
        return node[key.idx]
    return node[key.key]


def new_fields(template, saved_paths) -> dict[tuple[Path, str], list[str]] | None:
    """The ``NamedTuple`` fields of ``template`` that a checkpoint with ``saved_paths`` lacks.

    Args:
      template: the new state (any pytree).
      saved_paths: the paths (tuples of names, see module docstring) of the checkpoint's
        arrays.

    Returns:
      ``{(path of the NamedTuple, its class name): [missing field names]}``, empty when
      nothing is missing, or ``None`` when some missing array is not under such a field.
    """
    held = {path[:i] for path in saved_paths for i in range(len(path) + 1)}
    found = collections.defaultdict(list)
    for key_path, _ in jax.tree_util.tree_flatten_with_path(template)[0]:
        path = tuple(map(_name, key_path))
        if path in held:
            continue
        node = template
        for depth, key in enumerate(key_path):
            if path[:depth + 1] not in held:  # the first level the checkpoint lacks
                if not _is_namedtuple(node):
                    return None
                fields = found[(path[:depth], type(node).__name__)]
                if path[depth] not in fields:
                    fields.append(path[depth])
                break
            node = _child(node, key)
    return dict(found)


def restore_with_new_fields(manager: ocp.CheckpointManager, step: int, template, abstract):
    """The state saved at ``step`` with the fields it predates filled from ``template``.

    Args:
      manager: the run's checkpoint manager.
      step: a step whose restore against ``abstract`` failed.
      template: the run's freshly initialised state.
      abstract: ``template`` as ``jax.ShapeDtypeStruct`` leaves (with their shardings).

    Returns:
      The migrated state (logging a one-line warning naming the filled fields), or ``None``
      when the difference is not only new ``NamedTuple`` fields or the step cannot be read.
    """
    try:
        metadata = manager.item_metadata(step)
    except Exception:  # a damaged step: the caller handles it
        return None
    saved = _paths(getattr(metadata, 'tree', metadata))
    wanted = _paths(abstract)
    for path, meta in saved.items():
        like = wanted.get(path)
        if like is None or (tuple(getattr(meta, 'shape', ())), getattr(meta, 'dtype', None)) != (
                tuple(like.shape), like.dtype):
            return None
    missing = new_fields(template, saved)
    if not missing:
        return None
    target = jax.tree_util.tree_map_with_path(
        lambda path, _: wanted[tuple(map(_name, path))], getattr(metadata, 'tree', metadata))
    try:
        restored = _paths(manager.restore(step, args=ocp.args.StandardRestore(target)))
    except Exception:
        return None
    state = jax.tree_util.tree_map_with_path(
        lambda path, leaf: restored.get(tuple(map(_name, path)), leaf), template)
    logging.warning(
        'The checkpoint at step %d predates %s; filled with their initial values.', step,
        '; '.join(f'field(s) {", ".join(fields)} of {name}'
                  for (_, name), fields in missing.items()))
    return state
