"""Orbax checkpoints of the full train state: save every N steps, keep the last K, resume.

The checkpoint is the whole :class:`experiments.trainer.TrainState` (params, BatchNorm
statistics, the complete optax state, the step and the RNG key), so a resumed run continues
bitwise where the saved one was; the data order needs nothing saved (it is a function of the
seed and the epoch).
"""

import os

import jax
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
    """The workdir's checkpoint does not fit this run's state (another model or optimiser)."""


def make_manager(workdir: str, *, keep: int) -> ocp.CheckpointManager:
    """A manager writing ``WORKDIR/checkpoints/<step>``, keeping the last ``keep``."""
    directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    return ocp.CheckpointManager(directory, options=options)


def save(manager: ocp.CheckpointManager, state) -> None:
    """Saves ``state`` under its own step (asynchronously once copied off the device)."""
    manager.save(int(jax.device_get(state.step)), args=ocp.args.StandardSave(state), force=True)


def restore_latest(manager: ocp.CheckpointManager, template):
    """The latest saved state, shaped like ``template``; ``template`` itself when none exists.

    Raises:
      CheckpointMismatchError: the saved state has another structure, shape or dtype.
    """
    step = manager.latest_step()
    if step is None:
        return template
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    try:
        return manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except ValueError as e:  # orbax: tree structures, shapes or dtypes differ
        raise CheckpointMismatchError(
            f'The checkpoint at step {step} in {manager.directory} does not fit this config '
            '(another model, optimizer or library version?); pass a new --workdir or delete '
            'that checkpoints folder.') from e
