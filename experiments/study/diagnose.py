"""Final-model diagnostics of a finished run: top Hessian eigenvalue and m-sharpness.

``diagnose(config, workdir, spec)`` restores the run's last checkpoint through the trainer's
own functions, takes a fixed subset of the training split (the first ``spec.num_examples`` of
a seed-0 permutation, un-augmented, with the labels trained on, noisy where label noise is
on), and measures on it, with the model in evaluation mode (BatchNorm running statistics, no
dropout, so the loss is a function of the parameters alone):

- ``hessian_top_eigenvalue``: the largest eigenvalue of the Hessian of the mean
  cross-entropy, by ``vasso_jax.hessian_top_eigenvalue`` (Lanczos on Hessian-vector products,
  unrolled on a CPU);
- ``m_sharpness``: ``vasso_jax.m_sharpness`` at the run's ``rho`` with groups of ``spec.m``
  examples (the first-order SAM loss increase, averaged over groups);
- ``subset_loss`` / ``subset_accuracy`` on the same examples.

The result goes to ``WORKDIR/diagnostics.json``.
"""

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import vasso_jax
from experiments.image_classification import steps, task
from experiments.image_classification.data import augment as augment_lib
from experiments.runtime import checkpointing, files, loop

DIAGNOSTICS_FILE = 'diagnostics.json'


def restore_final_state(config: ml_collections.ConfigDict, workdir: str, dataset):
    """``(model, state)``: the run's model and its last checkpointed :class:`TrainState`."""
    model = task.make_model(config, dataset.num_classes)
    epoch_steps = steps.steps_per_epoch(len(dataset.train_labels), config.batch_size)
    _, tx = loop.make_optimizer(config, loop.total_steps(config, epoch_steps), epoch_steps)
    init_key, _, augment_key = steps.split_keys(config.seed)
    template = steps.create_train_state(model, tx, image_shape=dataset.train_images.shape[1:],
                                        init_key=init_key, augment_key=augment_key)
    return model, checkpointing.restore_final(workdir, template, keep=config.keep_checkpoints)


def train_subset(dataset, num_examples: int, seed: int = 0):
    """``(images uint8, labels)``: a fixed subset of the training split, labels as trained on."""
    n = len(dataset.train_labels)
    if num_examples > n:
        raise ValueError(f'num_examples={num_examples} exceeds the {n} training examples.')
    idx = np.sort(np.random.default_rng(seed).permutation(n)[:num_examples])
    return dataset.train_images[idx], dataset.train_labels[idx].astype(np.int32)


def make_eval_loss(model, batch_stats, num_classes: int):
    """``loss(params, batch) -> mean cross-entropy`` in evaluation mode; batch = (x, y)."""

    def loss(params, batch):
        images, labels = batch
        logits = model.apply({'params': params, 'batch_stats': batch_stats}, images, train=False)
        return jnp.mean(steps.cross_entropy(logits, labels, num_classes))

    return loss


def chunked_mean(loss, params, batch, chunk: int):
    """Mean of ``loss`` over ``batch`` in chunks of ``chunk`` examples (``lax.map``: bounded
    memory for the Hessian-vector products). ``chunk`` must divide the batch size."""
    images, labels = batch
    n = labels.shape[0]
    if chunk >= n:
        return loss(params, batch)
    if n % chunk:
        raise ValueError(f'batch_size={chunk} must divide num_examples={n}.')
    shaped = (
        images.reshape(n // chunk, chunk, *images.shape[1:]),
        labels.reshape(n // chunk, chunk),
    )
    return jnp.mean(jax.lax.map(lambda b: loss(params, b), shaped))


@functools.partial(jax.jit, static_argnames=('model', 'num_classes', 'rho', 'spec'))
def _measure(params, batch_stats, images, labels, *, model, num_classes, rho, spec):
    # Module-level and keyed on hashable statics, so the cells of a grid that share a model
    # compile this once per process (on a CPU the compile dominates the measurement).
    loss = make_eval_loss(model, batch_stats, num_classes)
    batch = (images, labels)
    full_loss = lambda p: chunked_mean(loss, p, batch, spec.batch_size)
    # Unrolled on a CPU, where XLA runs convolutions inside a loop body many times slower
    # (jax#12868): 174 s of Lanczos against 6.6 s for the whole diagnosis of a Fashion-MNIST
    # cell (BENCHMARKS.md).
    top = vasso_jax.hessian_top_eigenvalue(full_loss, params, num_iters=spec.num_iters,
                                           unroll=jax.default_backend() == 'cpu')
    sharp = vasso_jax.m_sharpness(
        loss, params, batch, rho=rho, m=spec.m, groups_per_step=spec.groups_per_step
    )
    logits = model.apply({'params': params, 'batch_stats': batch_stats}, images, train=False)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return top, sharp, full_loss(params), accuracy


def measure(model, state, images, labels, *, num_classes: int, rho: float, spec) -> dict:
    """The diagnostics of ``state`` on normalised ``images`` (float32) and ``labels``."""
    params = jax.tree.map(lambda x: x.astype(jnp.float32), state.params)
    out = _measure(
        params,
        state.batch_stats,
        jnp.asarray(images),
        jnp.asarray(labels),
        model=model,
        num_classes=num_classes,
        rho=float(rho),
        spec=spec,
    )
    top, sharp, subset_loss, accuracy = jax.device_get(out)
    return {
        'hessian_top_eigenvalue': float(top),
        'm_sharpness': float(sharp),
        'subset_loss': float(subset_loss),
        'subset_accuracy': float(accuracy),
    }


def diagnose(config: ml_collections.ConfigDict, workdir: str, spec) -> dict:
    """Measures the finished run in ``workdir``; writes and returns ``diagnostics.json``."""
    dataset = task.load_data(config)
    model, state = restore_final_state(config, workdir, dataset)
    images, labels = train_subset(dataset, spec.num_examples)
    images = augment_lib.normalize(images, mean=dataset.mean, std=dataset.std)
    result = measure(
        model,
        state,
        images,
        labels,
        num_classes=dataset.num_classes,
        rho=float(config.rho),
        spec=spec,
    )
    result.update(
        step=int(state.step),
        rho=float(config.rho),
        num_examples=spec.num_examples,
        m=spec.m,
        num_iters=spec.num_iters,
        params_checksum=loop.params_checksum(state.params),
    )
    files.write_json(os.path.join(workdir, DIAGNOSTICS_FILE), result)
    return result


def read(workdir: str) -> dict | None:
    """``diagnostics.json`` of a run, or None."""
    return files.read_json(os.path.join(workdir, DIAGNOSTICS_FILE))
