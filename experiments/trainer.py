"""Small pure functions that train a Flax classifier with a sharpness-aware optax chain.

In the order a run uses them: :func:`make_schedule`, :func:`make_optimizer` (the public
``vasso_jax`` link, weight decay, SGD: what a user writes), :func:`create_train_state`,
:func:`epoch_permutation`, :func:`make_train_step` (one jitted step: gather the batch from the
on-device split, augment, two passes, accumulate metrics), :func:`make_eval_step` and
:func:`evaluate` (batches of the on-device split, padding masked) and
:func:`params_checksum`. Nothing here touches files or the clock; the loop that does lives
in ``experiments/loop.py``.

Reproducibility contract (what resuming relies on): the whole run is a function of the config.
The data order of epoch ``e`` is ``permutation(fold_in(data_key, e))``, the batch of step ``s``
is slice ``s % steps_per_epoch`` of it, and the random keys of step ``s`` (augmentation,
dropout) come from ``fold_in(state.rng, s)``; so a state restored at step ``s`` continues
exactly.
"""

import functools
import hashlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import vasso_jax
from experiments import stability

OPTIMIZERS = ('sgd', 'sam', 'vasso', 'asam')
BASE_OPTIMIZERS = ('sgd', 'adamw')
LR_SCHEDULES = ('cosine', 'constant')
# Initialisation runs once, so on CPU XLA's backend optimisations only slow its compile
# (ResNet-18: ~30 s -> ~2 s on two cores; the random initialisers dominate).
_FAST_COMPILE = {'xla_backend_optimization_level': 0}
# Scalars the sharpness-aware link keeps in its state (read with optax.tree.get).
# The vmap axis over example groups of m-sharpness (config.ascent_group_size > 0).
GROUP_AXIS = 'ascent_group'
LINK_DIAGNOSTICS = ('grad_norm', 'direction_norm', 'cosine')


class ConfigError(ValueError):
    """A bad configuration value; the message is one line and names the fix."""


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


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Raises :class:`ConfigError` (one line naming the key) for an invalid value."""
    choices = {'optimizer': OPTIMIZERS, 'base_optimizer': BASE_OPTIMIZERS,
               'lr_schedule': LR_SCHEDULES}
    for key, valid in choices.items():
        if config[key] not in valid:
            raise ConfigError(f'--config.{key}={config[key]!r} is not one of {", ".join(valid)}.')
    for key in ('batch_size', 'eval_batch_size', 'log_every_steps', 'checkpoint_every_steps',
                'keep_checkpoints'):
        if int(config[key]) < 1:
            raise ConfigError(f'--config.{key} must be >= 1, got {config[key]}.')
    if config.num_train_steps <= 0 and config.num_epochs <= 0:
        raise ConfigError('Set --config.num_epochs or --config.num_train_steps to a value > 0.')
    group = config.get('ascent_group_size', 0)
    if group < 0 or (group and config.batch_size % group):
        raise ConfigError(f'--config.ascent_group_size={group} must be 0 (whole batch) or divide '
                          f'--config.batch_size={config.batch_size}.')
    shards = config.get('data_shards', 0)
    if shards < 0 or (shards and config.batch_size % shards):
        raise ConfigError(f'--config.data_shards={shards} must be 0 (one per device) or divide '
                          f'--config.batch_size={config.batch_size}.')
    if group and config.optimizer == 'sgd':
        raise ConfigError('--config.ascent_group_size needs a sharpness-aware --config.optimizer '
                          '(sam, vasso or asam), not sgd.')


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full batches per epoch (the last partial batch is dropped, as in the official code)."""
    if num_examples < batch_size:
        raise ConfigError(f'--config.batch_size={batch_size} exceeds the {num_examples} '
                          'training examples; lower it.')
    return num_examples // batch_size


def total_steps(config: ml_collections.ConfigDict, epoch_steps: int) -> int:
    """``num_train_steps`` when > 0, else ``num_epochs`` full epochs."""
    if config.num_train_steps > 0:
        return int(config.num_train_steps)
    return int(config.num_epochs) * epoch_steps


def make_schedule(config: ml_collections.ConfigDict, num_steps: int,
                  epoch_steps: int) -> optax.Schedule:
    """Learning rate per step: optional linear warm-up, then cosine to ``min_learning_rate``."""
    lr = config.learning_rate
    warmup = int(config.warmup_epochs * epoch_steps)
    if config.lr_schedule == 'constant':
        main = optax.constant_schedule(lr)
    else:
        main = optax.cosine_decay_schedule(
            lr, max(num_steps - warmup, 1), alpha=config.min_learning_rate / lr if lr else 0.0)
    if warmup <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def make_sharpness_link(config: ml_collections.ConfigDict):
    """The ``vasso_jax`` link for ``config.optimizer``, or None for plain SGD.

    Raises:
      ConfigError: the library rejected a hyperparameter (its one-line message).
    """
    try:
        return _sharpness_link(config)
    except ValueError as e:  # vasso_jax checks hyperparameters eagerly
        raise ConfigError(f'{e} (from --config.optimizer={config.optimizer})') from e


def _sharpness_link(config):
    extra = {'every_k': config.every_k} if config.every_k != 1 else {}
    if config.get('ascent_group_size', 0):  # m-sharpness: groups are a vmap axis
        extra.update(axis_name=GROUP_AXIS, ascent='per_device')
    if config.get('log_stability', False):  # keep eps_t for stability.track (make_optimizer)
        extra['keep_perturbation'] = True
    if config.optimizer == 'sam':
        return vasso_jax.sam(config.rho, adaptive=config.adaptive, eta=config.eta, **extra)
    if config.optimizer == 'vasso':
        return vasso_jax.vasso(config.rho, config.theta, adaptive=config.adaptive,
                               eta=config.eta, **extra)
    if config.optimizer == 'asam':
        return vasso_jax.asam(config.rho, eta=config.eta, **extra)
    return None


def make_optimizer(config: ml_collections.ConfigDict,
                   schedule: optax.Schedule) -> optax.GradientTransformationExtraArgs:
    """``chain(link, add_decayed_weights, sgd)`` (or ``chain(link, adamw)``).

    Weight decay comes after the link, so it is not part of the ascent, and applies to every
    parameter, like the PyTorch SGD of the official code.
    """
    link = make_sharpness_link(config)
    if link is not None and config.get('log_stability', False):
        # Adversary stability, cos(eps_t, eps_t-1) and the variance of eps, kept in the state
        # and logged like the link's diagnostics (experiments/stability.py).
        link = stability.track(link)
    if config.base_optimizer == 'adamw':
        base = [optax.adamw(schedule, weight_decay=config.weight_decay)]
    else:
        base = [optax.add_decayed_weights(config.weight_decay),
                optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov)]
    return optax.chain(*([link] if link is not None else []), *base)


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


def link_diagnostics(opt_state) -> tuple[str, ...]:
    """Names in :data:`LINK_DIAGNOSTICS` (and, with ``config.log_stability``,
    ``stability.STABILITY_DIAGNOSTICS``) that ``opt_state`` holds (none for plain SGD)."""
    names = LINK_DIAGNOSTICS + stability.STABILITY_DIAGNOSTICS
    return tuple(n for n in names if optax.tree.get(opt_state, n) is not None)


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
                    diagnostics: Sequence[str] = (), ascent_group_size: int = 0) -> Callable:
    """Returns ``train_step(state, metrics, data, perm) -> (state, metrics)`` (not jitted).

    Pass 1 (``value_and_grad`` at ``w``) gives the loss, accuracy and the new BatchNorm
    statistics, which are kept. Pass 2 runs inside ``grad_fn`` at the perturbed weights, on
    the same augmented batch; its BatchNorm updates are discarded (the SAM authors' policy).
    Metrics are summed into ``metrics`` on device.

    Args:
      model: a Flax module called as ``model.apply(variables, x, train=...)``.
      tx: the optax chain; its ``update`` gets ``grad_fn``.
      augment_fn: ``augment_fn(key, uint8_images) -> float images`` (jittable).
      num_classes: number of classes.
      batch_size: training batch size.
      epoch_steps: steps per epoch (batches in one permutation).
      label_smoothing: smoothing of the one-hot targets.
      diagnostics: names from :data:`LINK_DIAGNOSTICS` present in the optimiser state.
      ascent_group_size: if > 0, m-sharpness: each group of this many examples is perturbed
        by its own gradient and the perturbed gradients are averaged. ``tx``'s link must be
        built with ``axis_name=GROUP_AXIS, ascent='per_device'`` (:func:`make_optimizer`
        does it). Costs the same two passes as SAM; BatchNorm normalises per group.
    """
    loss_fn = make_loss_fn(model, num_classes, label_smoothing)
    extra_diagnostics = [d for d in diagnostics if d != 'grad_norm']

    def two_passes(params, batch_stats, opt_state, images, labels, dropout_key):
        (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch_stats, images, labels, dropout_key)

        def grad_fn(p):  # pass 2: same batch and dropout mask, BatchNorm updates dropped
            return jax.grad(lambda q: loss_fn(q, batch_stats, images, labels, dropout_key)[0])(p)

        updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn)
        return updates, opt_state, loss, logits, new_stats, grads

    def grouped_passes(params, batch_stats, opt_state, images, labels, dropout_key):
        # m-sharpness: both passes per group of m examples (BatchNorm statistics per group
        # too), groups mapped with vmap; the link averages over GROUP_AXIS, so the update and
        # the optimiser state come out shared. Independent of how devices split the batch.
        split = lambda x: x.reshape(batch_size // ascent_group_size, ascent_group_size,
                                    *x.shape[1:])
        run = jax.vmap(two_passes, axis_name=GROUP_AXIS, in_axes=(None, None, None, 0, 0, None),
                       out_axes=(None, None, 0, 0, 0, 0))
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


def params_checksum(params) -> str:
    """sha256 of the parameters: path, dtype, shape and raw bytes of each leaf in tree order."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        array = np.ascontiguousarray(jax.device_get(leaf))
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(f'{array.dtype}{array.shape}'.encode())
        digest.update(array.tobytes())
    return digest.hexdigest()
