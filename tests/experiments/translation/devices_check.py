"""One translation train step on 8 simulated CPU devices equals the step on 1 (run by
test_task.py in a fresh process with JAX_NUM_CPU_DEVICES=8).

Both runs use 8 data shards, so they see the same batch; the step is the runtime's (the
task's step inside the non-finite guard, jitted with the batch sharded on its leading axis).
"""

import sys

import jax
import numpy as np
import tensorflow_datasets as tfds
from jax.sharding import Mesh
from tensorflow_datasets.testing import mocking

from experiments.configs import translation_tiny
from experiments.runtime import distributed, loop, nonfinite
from experiments.translation import task
from tests.experiments import conftest


def one_step(config, devices):
    mesh = Mesh(np.array(devices), (distributed.DATA_AXIS,))
    run = task.TASK.load(config, mesh, num_shards=8)
    _, tx = loop.make_optimizer(config, 10, run.epoch_steps)
    state = run.init_state(tx)
    step = run.make_train_step(tx, state)
    replicated = distributed.replicated(mesh)
    step = jax.jit(nonfinite.guard(step), in_shardings=(replicated, replicated,
                                                        *run.input_shardings))
    state, sums = step(distributed.put(state, replicated),
                       nonfinite.with_status(run.zero_metrics()), *run.train_inputs(0))
    assert int(sums['nonfinite_step']) == -1
    return jax.device_get(state.params), float(sums['loss'])


def main(vocab_dir):
    assert jax.device_count() == 8, jax.devices()
    mocking._getitems = conftest._getitems
    config = translation_tiny.get_config()
    config.dataset = 'wmt14_translate/de-en'
    config.vocab_dir = vocab_dir
    config.warmup_steps = 1  # a non-zero learning rate at the first step
    config.learning_rate = 1e-2
    with tfds.testing.mock_data(num_examples=conftest.NUM_MOCK):
        one, loss_one = one_step(config, jax.devices()[:1])
        eight, loss_eight = one_step(config, jax.devices())
    np.testing.assert_allclose(loss_eight, loss_one, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)
    print('translation devices check passed')


if __name__ == '__main__':
    main(sys.argv[1])
