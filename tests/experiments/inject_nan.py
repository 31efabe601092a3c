"""Runs ``python -m experiments.train`` with a learning rate that is NaN at one update.

For tests of the non-finite guard through the real CLI:
``python tests/experiments/inject_nan.py UPDATE [train flags...]`` makes the learning rate of
update ``UPDATE`` (0-based optax count) NaN, so the parameters after step ``UPDATE + 1`` are.
"""

import runpy
import sys

import jax.numpy as jnp

from experiments.runtime import optimizers


def main():
    nan_update = int(sys.argv[1])
    make_schedule = optimizers.make_schedule

    def poisoned(*args, **kwargs):
        schedule = make_schedule(*args, **kwargs)
        return lambda count: jnp.where(count == nan_update, jnp.nan, schedule(count))

    optimizers.make_schedule = poisoned  # a test helper's own process: nothing else sees it
    sys.argv = ['experiments.train', *sys.argv[2:]]
    runpy.run_module('experiments.train', run_name='__main__', alter_sys=True)


if __name__ == '__main__':
    main()
