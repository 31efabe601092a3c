"""Small pure functions that train a Flax classifier with a sharpness-aware optax chain.

In the order a run uses them: :func:`create_train_state`, :func:`epoch_permutation`,
:func:`make_train_step` (one step: gather the batch from the on-device split, augment, two
passes, accumulate metrics), :func:`make_eval_step` and :func:`evaluate` (batches of the
on-device split, padding masked). The optax chain comes from ``experiments/runtime/
optimizers.py``; nothing here touches files or the clock (``experiments/runtime/loop.py``
does).

Reproducibility contract (what resuming relies on): the whole run is a function of the config.
The data order of epoch ``e`` is ``permutation(fold_in(data_key, e))``, the batch of step ``s``
is slice ``s % steps_per_epoch`` of it, and the random keys of step ``s`` (augmentation,
dropout) come from ``fold_in(state.rng, s)``; so a state restored at step ``s`` continues
exactly.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

import vasso_jax.linen
from experiments.runtime import errors, optimizers

# Initialisation runs once, so on CPU XLA's backend optimisations only slow its compile
# (ResNet-18: ~30 s -> ~2 s on two cores; the random initialisers dominate).
_FAST_COMPILE = {'xla_backend_optimization_level': 0}


class TrainState(flax.struct.PyTreeNode):
    """Everything a run needs to continue: what a checkpoint holds.

    Attributes:
      step: int32 scalar, number of optimiser steps taken.
      params: model parameters.
      batch_stats: BatchNorm running statistics (the ``'batch_stats'`` collection).
      opt_state: the complete optax state (link state such as VaSSO's ``d``, momentum,
        counters).
      rng: raw uint32 key; step ``s`` splits ``fold_in(rng, s)`` into its augmentation and
        dropout keys.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array


class Split(NamedTuple):
    """A whole split as arrays (uint8 images, int32 labels), on device for training.

    The leading axis holds ``S`` data shards of ``n`` examples, one per device of the mesh
    (``S = 1`` on one device): shard ``k`` is examples ``k, k + S, k + 2S, ...``, so a device
    only ever reads its own shard and a process loads only its devices' shards.
    """

    images: Any  # [S, n, H, W, C] uint8
    labels: Any  # [S, n] int32: the labels trained on (noisy where label noise is on)
    true_labels: Any  # [S, n] int32: the clean labels


class EvalSplit(NamedTuple):
    """A split to evaluate, laid out as ``S`` shards like :class:`Split`, with a 0/1 mask.

    Shard ``k`` holds examples ``k, k + S, ...``; the shards are padded to the same length
    ``m`` with mask 0 (see :func:`eval_rows`), so every example counts exactly once.
    """

    images: Any  # [S, m, H, W, C] uint8
    labels: Any  # [S, m] int32
    true_labels: Any  # [S, m] int32
    mask: Any  # [S, m] float32: 1 for a real example, 0 for padding


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full batches per epoch (the last partial batch is dropped, as in the official code)."""
    if num_examples < batch_size:
        raise errors.ConfigError(f'--config.batch_size={batch_size} exceeds the {num_examples} '
                          'training examples; lower it.')
    return num_examples // batch_size


def split_keys(seed: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(init_key, data_key, augment_key) from the seed: raw uint32 keys, checkpointable."""
    init_key, data_key, augment_key = jax.random.split(jax.random.PRNGKey(seed), 3)
    return init_key, data_key, augment_key


def create_train_state(model, tx: optax.GradientTransformation, *, image_shape: Sequence[int],
                       init_key: jax.Array, augment_key: jax.Array) -> TrainState:
    """Initialises the model (jitted, on a dummy batch of one) and the optimiser."""
    dummy = jnp.zeros((1, *image_shape), jnp.float32)
    options = _FAST_COMPILE if jax.default_backend() == 'cpu' else None
    init = jax.jit(lambda k: model.init(k, dummy, train=False), compiler_options=options)
    variables = init(init_key)
    params = variables['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get('batch_stats', {}),
                      opt_state=jax.jit(tx.init)(params), rng=augment_key)


def metric_names(diagnostics: Sequence[str]) -> tuple[str, ...]:
    """Keys of the on-device metric accumulator."""
    return ('steps', 'examples', 'loss', 'correct', 'correct_true', 'grad_norm',
            *[d for d in diagnostics if d != 'grad_norm'])


def zero_metrics(diagnostics: Sequence[str]) -> dict[str, jax.Array]:
    """A fresh accumulator of float32 sums."""
    return {k: jnp.zeros((), jnp.float32) for k in metric_names(diagnostics)}


def summarize_train_metrics(sums: dict[str, Any]) -> dict[str, float]:
    """Host-side means of a fetched accumulator: per example or per step."""
    sums = {k: float(v) for k, v in sums.items()}
    steps, examples = max(sums.pop('steps'), 1.0), max(sums.pop('examples'), 1.0)
    out = {'train_loss': sums.pop('loss') / steps,
           'train_accuracy': sums.pop('correct') / examples,
           'train_true_accuracy': sums.pop('correct_true') / examples}
    out.update({k: v / steps for k, v in sums.items()})
    return out


def shard_rows(num_examples: int, num_shards: int) -> np.ndarray:
    """``[S, n]`` example indices of the ``S`` training shards: shard ``k`` is examples
    ``k, k + S, ..., k + (n - 1) S`` with ``n = num_examples // S`` (a remainder of fewer
    than ``S`` examples is not trained on)."""
    n = num_examples // num_shards
    return np.arange(n * num_shards).reshape(n, num_shards).T


def eval_rows(num_examples: int, num_shards: int) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, mask)``, both ``[S, m]``: the strided shards of an evaluation split.

    ``m = ceil(num_examples / S)``; every example appears once with mask 1, and the
    padding (at most ``S - 1`` slots) repeats example 0 with mask 0.
    """
    m = -(-num_examples // num_shards)
    index = np.arange(m * num_shards).reshape(m, num_shards).T
    mask = index < num_examples
    return np.where(mask, index, 0), mask.astype(np.float32)


def shard_split(images: np.ndarray, labels: np.ndarray, true_labels: np.ndarray,
                num_shards: int) -> Split:
    """Host arrays laid out as the ``num_shards`` strided shards of :func:`shard_rows`."""
    rows = shard_rows(len(labels), num_shards)
    return Split(images[rows], labels[rows].astype(np.int32), true_labels[rows].astype(np.int32))


def epoch_permutation(data_key: jax.Array, epoch, num_shards: int, shard_size: int):
    """The data order of ``epoch``: a pure function of (data_key, epoch), one row per shard.

    Returns ``[num_shards, shard_size]`` int32 indices into each shard. Jit with the sizes
    static.
    """
    epoch_key = jax.random.fold_in(data_key, epoch)
    shard_keys = jax.vmap(lambda k: jax.random.fold_in(epoch_key, k))(jnp.arange(num_shards))
    return jax.vmap(lambda k: jax.random.permutation(k, shard_size))(shard_keys)


def cross_entropy(logits, labels, num_classes: int, label_smoothing: float = 0.0):
    """Per-example softmax cross-entropy against (optionally smoothed) one-hot labels."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def make_loss_fn(model, num_classes: int, label_smoothing: float = 0.0):
    """``loss_fn(params, batch_stats, images, labels, dropout_key) -> (loss, aux)``.

    A training-mode forward pass; ``aux = (logits, new_batch_stats)``. BatchNorm normalises
    with batch statistics and returns its updated running averages, which the caller keeps
    (pass 1) or drops (pass 2). The dropout key is used only by models with dropout.
    """

    def loss_fn(params, batch_stats, images, labels, dropout_key):
        logits, mutated = model.apply({'params': params, 'batch_stats': batch_stats}, images,
                                      train=True, mutable=['batch_stats'],
                                      rngs={'dropout': dropout_key})
        loss = jnp.mean(cross_entropy(logits, labels, num_classes, label_smoothing))
        return loss, (logits, mutated['batch_stats'])

    return loss_fn


def get_batch(step, perm, data: Split, *, batch_size: int, epoch_steps: int):
    """The batch of ``step``: slice ``step % epoch_steps`` of every shard's permutation.

    Each shard contributes ``batch_size / S`` examples; the gather is per shard, so under a
    mesh each device reads only the shard it holds.
    """
    num_shards = perm.shape[0]
    local = batch_size // num_shards
    idx = jax.lax.dynamic_slice_in_dim(perm, (step % epoch_steps) * local, local, axis=1)
    gather = jax.vmap(lambda x, i: x[i])
    flat = lambda x: x.reshape(batch_size, *x.shape[2:])
    return tuple(flat(gather(x, idx)) for x in data)


def make_train_step(model, tx: optax.GradientTransformationExtraArgs,
                    augment_fn: Callable, *, num_classes: int, batch_size: int,
                    epoch_steps: int, label_smoothing: float = 0.0,
                    diagnostics: Sequence[str] = (), ascent_group_size: int = 0,
                    one_pass: bool = False) -> Callable:
    """Returns ``train_step(state, metrics, data, perm) -> (state, metrics)`` (not jitted).

    Both passes come from ``vasso_jax.linen.value_and_grad``. Pass 1 (at ``w``) gives the
    loss, accuracy and the new BatchNorm statistics, which are kept. Pass 2 runs inside
    ``grad_fn`` at the perturbed weights, on the same augmented batch and dropout key; its
    BatchNorm updates are discarded (the SAM authors' policy).
    Metrics are summed into ``metrics`` on device.

    Args:
      model: a Flax module called as ``model.apply(variables, x, train=...)``.
      tx: the optax chain; its ``update`` gets ``grad_fn``.
      augment_fn: ``augment_fn(key, uint8_images) -> float images`` (jittable).
      num_classes: number of classes.
      batch_size: training batch size.
      epoch_steps: steps per epoch (batches in one permutation).
      label_smoothing: smoothing of the one-hot targets.
      diagnostics: names from ``optimizers.link_diagnostics`` present in the optimiser state.
      ascent_group_size: if > 0, m-sharpness: each group of this many examples is perturbed
        by its own gradient and the perturbed gradients are averaged. ``tx``'s link must be
        built with ``axis_name=optimizers.GROUP_AXIS, ascent='per_device'``
        (``optimizers.make_optimizer`` does it). Costs the same two passes as SAM; BatchNorm
        normalises per group.
      one_pass: ``tx`` is a one-pass link (``vasso_jax.one_pass_vasso``, ...): pass 1 is the
        step's only gradient, taken at the held (perturbed) params, and ``tx.update`` gets no
        ``grad_fn``.
    """
    # grad_fn, pass 2: the same batch, dropout key and pre-step BatchNorm statistics; its
    # BatchNorm updates (in the discarded aux) are dropped.
    both_passes = vasso_jax.linen.value_and_grad(
        make_loss_fn(model, num_classes, label_smoothing), has_aux=True)
    extra_diagnostics = [d for d in diagnostics if d != 'grad_norm']

    def two_passes(params, batch_stats, opt_state, images, labels, dropout_key):
        (loss, (logits, new_stats)), grads, grad_fn = both_passes(
            params, batch_stats, images, labels, dropout_key)
        if one_pass:  # the one gradient, at the held (perturbed) params
            updates, opt_state = tx.update(grads, opt_state, params)
        else:
            updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
        return updates, opt_state, loss, logits, new_stats, grads

    def grouped_passes(params, batch_stats, opt_state, images, labels, dropout_key):
        # m-sharpness: both passes per group of m examples (BatchNorm statistics per group
        # too), groups mapped with vmap; the link averages over the group axis, so the update
        # and the optimiser state come out shared. Independent of how devices split the batch.
        split = lambda x: x.reshape(batch_size // ascent_group_size, ascent_group_size,
                                    *x.shape[1:])
        run = jax.vmap(two_passes, axis_name=optimizers.GROUP_AXIS,
                       in_axes=(None, None, None, 0, 0, None), out_axes=(None, None, 0, 0, 0, 0))
        updates, opt_state, loss, logits, new_stats, grads = run(
            params, batch_stats, opt_state, split(images), split(labels), dropout_key)
        mean = lambda tree: jax.tree.map(lambda x: jnp.mean(x, axis=0), tree)
        return (updates, opt_state, jnp.mean(loss), logits.reshape(batch_size, -1),
                mean(new_stats), mean(grads))

    passes = grouped_passes if ascent_group_size else two_passes

    def train_step(state: TrainState, metrics, data: Split, perm):
        images, labels, true_labels = get_batch(state.step, perm, data, batch_size=batch_size,
                                                epoch_steps=epoch_steps)
        augment_key, dropout_key = jax.random.split(jax.random.fold_in(state.rng, state.step))
        images = augment_fn(augment_key, images)
        updates, opt_state, loss, logits, batch_stats, grads = passes(
            state.params, state.batch_stats, state.opt_state, images, labels, dropout_key)
        params = optax.apply_updates(state.params, updates)

        predictions = jnp.argmax(logits, axis=-1)
        grad_norm = optax.tree.get(opt_state, 'grad_norm')
        step_metrics = {
            'steps': 1.0, 'examples': float(batch_size), 'loss': loss,
            'correct': jnp.sum(predictions == labels),
            'correct_true': jnp.sum(predictions == true_labels),
            'grad_norm': optax.tree.norm(grads) if grad_norm is None else grad_norm,
            **{d: optax.tree.get(opt_state, d) for d in extra_diagnostics},
        }
        metrics = {k: metrics[k] + jnp.asarray(v, jnp.float32) for k, v in step_metrics.items()}
        state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state)
        return state, metrics

    return train_step


EVAL_SUMS = ('count', 'loss', 'correct', 'correct_true')


def eval_batch_rows(global_batch_size: int, num_shards: int, shard_length: int) -> int:
    """Rows per shard of one evaluation batch: ``global_batch_size / S``, rounded up and at
    most the shard length."""
    return max(1, min(shard_length, -(-global_batch_size // num_shards)))


def make_eval_step(model, normalize_fn: Callable, num_classes: int) -> Callable:
    """Returns jitted ``eval_step(params, batch_stats, sums, split, j, *, rows) -> sums``.

    Adds the masked sums of batch ``j`` of an on-device :class:`EvalSplit` to ``sums``
    (:data:`EVAL_SUMS`: ``count``, ``loss``, ``correct`` against ``labels``,
    ``correct_true``). Batch ``j`` is rows ``[j * rows, (j + 1) * rows)`` of every shard; the
    last batch is shifted back to stay inside the shard and counts only its new rows, so
    every split with the same shapes shares one compilation and each device reads only the
    shard it holds.
    """

    @functools.partial(jax.jit, static_argnames='rows')
    def eval_step(params, batch_stats, sums, split: EvalSplit, j, *, rows: int):
        num_shards, length = split.labels.shape
        start = jnp.minimum(j * rows, length - rows)
        take = lambda x: jax.lax.dynamic_slice_in_dim(x, start, rows, axis=1)
        batch = EvalSplit(*(take(x) for x in split))
        fresh = (start + jnp.arange(rows) >= j * rows).astype(jnp.float32)
        mask = (batch.mask * fresh).reshape(-1)
        flat = lambda x: x.reshape(num_shards * rows, *x.shape[2:])
        logits = model.apply({'params': params, 'batch_stats': batch_stats},
                             normalize_fn(flat(batch.images)), train=False)
        predictions = jnp.argmax(logits, axis=-1)
        labels, true_labels = flat(batch.labels), flat(batch.true_labels)
        losses = cross_entropy(logits, labels, num_classes)
        batch_sums = {'count': jnp.sum(mask),
                      'loss': jnp.sum(losses * mask),
                      'correct': jnp.sum((predictions == labels) * mask),
                      'correct_true': jnp.sum((predictions == true_labels) * mask)}
        return {k: sums[k] + batch_sums[k] for k in EVAL_SUMS}

    return eval_step


def evaluate(eval_step: Callable, params, batch_stats, split: EvalSplit,
             batch_size: int) -> dict:
    """Sums of :func:`make_eval_step` over all of ``split`` in global batches of about
    ``batch_size``, left on device (no host sync)."""
    num_shards, length = split.labels.shape
    rows = eval_batch_rows(batch_size, num_shards, length)
    sums = {k: jnp.zeros((), jnp.float32) for k in EVAL_SUMS}
    for j in range(-(-length // rows)):
        sums = eval_step(params, batch_stats, sums, split, j, rows=rows)
    return sums

