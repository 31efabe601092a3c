"""Data-parallel checks of the trainer, run by test_distributed.py with 8 simulated CPU devices.

Each check raises AssertionError on a mismatch; the process prints a final line when all pass.
The model is the tests' tiny BatchNorm MLP: what is checked is the sharding of the data, the
steps and BatchNorm's statistics, and it compiles in a fraction of a convolutional network's
time (these checks compile eight train steps).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

import vasso_jax
from experiments.configs import digits_resnet
from experiments.image_classification import data, input_pipeline, models, steps
from experiments.runtime import distributed, optimizers
from tests.experiments import tiny_model

BATCH, STEPS, RHO, LR = 16, 2, 0.05, 0.01


def setup(group_size=0, shards=4):
    model = models.get_model(tiny_model.PATH, 10)
    link = vasso_jax.sam(RHO, **({'axis_name': optimizers.GROUP_AXIS, 'ascent': 'per_device'}
                                 if group_size else {}))
    tx = optax.chain(link, optax.sgd(LR))
    init_key, data_key, augment_key = steps.split_keys(0)
    state = steps.create_train_state(model, tx, image_shape=(8, 8, 1), init_key=init_key,
                                       augment_key=augment_key)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (BATCH * 4, 8, 8, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, BATCH * 4).astype(np.int32)
    split = steps.shard_split(images, labels, labels, shards)
    perm = steps.epoch_permutation(data_key, 0, shards, len(labels) // shards)
    augment_fn = lambda key, x: (x.astype(jnp.float32) - 128.0) / 64.0
    step = steps.make_train_step(
        model, tx, augment_fn, num_classes=10, batch_size=BATCH, epoch_steps=4,
        diagnostics=optimizers.link_diagnostics(state.opt_state), ascent_group_size=group_size)
    return model, state, split, perm, step, tx


def run(devices, group_size=0, shards=4):
    """STEPS train steps with the batch sharded over ``devices`` (None: plain jit)."""
    _, state, split, perm, step, _ = setup(group_size, shards)
    sums = steps.zero_metrics(optimizers.link_diagnostics(state.opt_state))
    if devices is None:
        jitted = jax.jit(step)
    else:
        mesh = Mesh(np.array(devices), (distributed.DATA_AXIS,))
        rep, shard = distributed.replicated(mesh), distributed.sharded(mesh)
        state, sums = distributed.put(state, rep), distributed.put(sums, rep)
        split, perm = distributed.put(split, shard), distributed.put(perm, shard)
        jitted = jax.jit(step, in_shardings=(rep, rep, shard, shard),
                         out_shardings=(rep, rep))
    for _ in range(STEPS):
        state, sums = jitted(state, sums, split, perm)
    return state, sums


def close(a, b, tol=2e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


def check_sharded_step_equals_single_device():
    # The same data layout (one shard per device) on one device and on the mesh.
    single, single_sums = run(None, shards=8)
    state, sums = run(jax.devices(), shards=8)
    close(state.params, single.params)
    close(state.batch_stats, single.batch_stats)
    close(sums, single_sums)


def check_group_size_is_device_independent():
    # Equal up to float reduction order (BatchNorm over 4 examples amplifies it a little).
    want, _ = run(None, group_size=4)
    got, _ = run(jax.devices()[:4], group_size=4)  # each device one group of 4
    close(got.params, want.params, tol=1e-3)
    close(got.batch_stats, want.batch_stats, tol=1e-3)


def check_group_step_matches_per_group_reference():
    model, state, split, perm, step, _ = setup(group_size=4)
    sums = steps.zero_metrics(optimizers.link_diagnostics(state.opt_state))
    new_state, _ = jax.jit(step)(state, sums, split, perm)
    # Hand-written m-sharpness: per group of 4, SAM's ascent with that group's gradient and
    # BatchNorm statistics, then the mean of the perturbed gradients; statistics averaged.
    images, labels, _ = steps.get_batch(state.step, perm, split, batch_size=BATCH,
                                          epoch_steps=4)
    x = (images.astype(jnp.float32) - 128.0) / 64.0
    _, dropout_key = jax.random.split(jax.random.fold_in(state.rng, state.step))
    loss_fn = steps.make_loss_fn(model, 10)

    @jax.jit
    def group_sam(xg, yg):
        group_loss = lambda p: loss_fn(p, state.batch_stats, xg, yg, dropout_key)
        g, (_, new_stats) = jax.grad(group_loss, has_aux=True)(state.params)
        norm = jnp.sqrt(sum(jnp.sum(v ** 2) for v in jax.tree.leaves(g)))
        point = jax.tree.map(lambda w, v: w + RHO * v / (norm + 1e-12), state.params, g)
        return jax.grad(lambda p: group_loss(p)[0])(point), new_stats

    outs, stats = [], []
    for j in range(BATCH // 4):
        out, new_stats = group_sam(x[4 * j:4 * j + 4], labels[4 * j:4 * j + 4])
        outs.append(out)
        stats.append(new_stats)
    mean = lambda trees: jax.tree.map(lambda *v: jnp.mean(jnp.stack(v), axis=0), *trees)
    want = jax.tree.map(lambda w, h: w - LR * h, state.params, mean(outs))
    close(new_state.params, want, tol=1e-5)
    close(new_state.batch_stats, mean(stats), tol=1e-5)
    # And it is not the whole-batch SAM step: the option changes the update.
    _, plain_state, split0, perm0, plain_step, _ = setup(group_size=0)
    plain, _ = jax.jit(plain_step)(plain_state, steps.zero_metrics(
        optimizers.link_diagnostics(plain_state.opt_state)), split0, perm0)
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
               zip(jax.tree.leaves(plain.params), jax.tree.leaves(new_state.params)))
    assert diff > 1e-3, diff


def check_input_pipeline_matches_the_whole_dataset(num_shards, evaluate=True):
    """Data shards, labels, noise and statistics as if read whole, on 8 devices; and (when
    ``evaluate``) evaluation on the mesh as on one device."""
    config = digits_resnet.get_config()
    config.label_noise, config.noise_seed, config.eval_train = 0.3, 5, True
    mesh = distributed.make_mesh()
    run_data = input_pipeline.load(config, mesh, num_shards)
    whole = data.load_dataset('digits', label_noise=0.3, noise_seed=5)
    # 1438 training examples: 8 shards of 179 (6 left over) or 16 of 89 (14 left over). The
    # leftover is never trained on, but counted in the labels' noise and the normalisation
    # statistics, so those do not depend on the number of shards.
    want = steps.shard_split(whole.train_images, whole.train_labels,
                               whole.train_true_labels, num_shards)
    for got, expected in zip(run_data.train, want, strict=True):
        assert got.sharding.is_equivalent_to(distributed.sharded(mesh), got.ndim)
        np.testing.assert_array_equal(np.asarray(got), expected)
    np.testing.assert_array_equal(run_data.labels, whole.train_labels)
    np.testing.assert_array_equal(run_data.true_labels, whole.train_true_labels)
    np.testing.assert_array_equal(run_data.mean, whole.mean)
    np.testing.assert_array_equal(run_data.std, whole.std)
    test = run_data.evals['test']
    mask = np.asarray(test.mask)
    length = -(-359 // num_shards)
    assert mask.shape == (num_shards, length) and mask.sum() == len(whole.test_labels) == 359
    np.testing.assert_array_equal(
        np.sort(np.asarray(test.labels)[mask == 1]), np.sort(whole.test_labels))
    assert run_data.images_read == 1438 + num_shards * length  # one process: all, padding too

    if not evaluate:
        return
    # Evaluation on the mesh counts each example once and equals a single-device pass.
    model = models.get_model(tiny_model.PATH, 10)
    state = steps.create_train_state(model, optax.sgd(0.1), image_shape=(8, 8, 1),
                                       init_key=jax.random.key(0), augment_key=jax.random.key(1))
    normalize = lambda x: (x.astype(jnp.float32) / 255.0 - run_data.mean) / run_data.std
    eval_step = steps.make_eval_step(model, normalize, 10)
    for name, split in run_data.evals.items():
        sums = jax.device_get(steps.evaluate(eval_step, state.params, state.batch_stats,
                                               split, 64))
        single = jax.device_get(steps.evaluate(
            eval_step, state.params, state.batch_stats, jax.device_get(split), 64))
        trained = 1438 // num_shards * num_shards
        assert sums['count'] == (359 if name == 'test' else trained), (name, sums['count'])
        close(sums, single, tol=1e-4)


def main():
    assert len(jax.devices()) == 8, jax.devices()
    check_input_pipeline_matches_the_whole_dataset(8)
    check_input_pipeline_matches_the_whole_dataset(16, evaluate=False)  # 2 shards a device
    check_sharded_step_equals_single_device()
    check_group_size_is_device_independent()
    check_group_step_matches_per_group_reference()
    print('distributed trainer checks passed')


if __name__ == '__main__':
    main()
