"""Non-finite loss, gradient or state: found on device at every step, reported at host syncs.

:func:`guard` wraps a train step ``(state, metrics, *args) -> (state, metrics)`` so that the
metrics dict also carries two int32 scalars: ``nonfinite_step``, the first step whose loss,
pass-1 gradient norm or new state (parameters, BatchNorm statistics, optimizer state: so the
sharpness-aware link's output too) is not finite, -1 while none is; and ``nonfinite_what``, its
index in :data:`QUANTITIES`. No host sync is added: the loop fetches the metrics at log and
checkpoint steps anyway, and calls :func:`check` on them there, before any save, so a
non-finite state is never checkpointed.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

QUANTITIES = ('loss', 'gradient norm', 'parameters', 'BatchNorm statistics', 'optimizer state')
KEYS = ('nonfinite_step', 'nonfinite_what')


class NonFiniteError(FloatingPointError):
    """Training produced a non-finite value; the run stopped without checkpointing it."""

    def __init__(self, step: int, quantity: str, last_checkpoint: int | None):
        kept = (
            'no checkpoint was saved before it'
            if last_checkpoint is None
            else f'the last good checkpoint (step {last_checkpoint}) is kept'
        )
        super().__init__(
            f'Non-finite {quantity} at step {step}; stopped, {kept}. Lower '
            '--config.learning_rate (or --config.rho) and rerun with --allow_config_change.'
        )
        self.step = step
        self.quantity = quantity
        self.last_checkpoint = last_checkpoint


def with_status(metrics: dict) -> dict:
    """``metrics`` plus a fresh status (no non-finite step seen)."""
    return {**metrics, 'nonfinite_step': jnp.int32(-1), 'nonfinite_what': jnp.int32(-1)}


def strip(metrics: dict) -> dict:
    """``metrics`` without the status keys (what ``summarize_train_metrics`` expects)."""
    return {k: v for k, v in metrics.items() if k not in KEYS}


def all_finite(tree) -> jax.Array:
    """Whether every floating-point entry of ``tree`` is finite (a bool scalar)."""
    checks = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    ]
    return jnp.all(jnp.stack(checks)) if checks else jnp.bool_(True)


def guard(train_step: Callable) -> Callable:
    """Wraps ``train_step(state, metrics, *args)``; the metrics must come from
    :func:`with_status`. Step ``s`` (0-based ``state.step``) is reported as step ``s + 1``, the
    number of steps taken when it went wrong, as in ``metrics.jsonl``."""

    def guarded(state, metrics, *args):
        step = state.step
        state, sums = train_step(state, strip(metrics), *args)
        # The sums only grow, so a non-finite sum means this or an earlier step of the log
        # interval was non-finite; only the first one is recorded.
        finite = jnp.stack(
            [
                jnp.isfinite(sums['loss']),
                jnp.isfinite(sums['grad_norm']),
                all_finite(state.params),
                all_finite(state.batch_stats),
                all_finite(state.opt_state),
            ]
        )
        first = (metrics['nonfinite_step'] < 0) & ~jnp.all(finite)
        status = {
            'nonfinite_step': jnp.where(first, step + 1, metrics['nonfinite_step']),
            'nonfinite_what': jnp.where(first, jnp.argmin(finite), metrics['nonfinite_what']),
        }
        return state, {**sums, **{k: v.astype(jnp.int32) for k, v in status.items()}}

    return guarded


def check(fetched: dict, checkpoints) -> None:
    """Raises :class:`NonFiniteError` if the fetched metrics saw a non-finite step.

    Args:
      fetched: the metrics dict, on the host (``jax.device_get``).
      checkpoints: the run's orbax ``CheckpointManager``; pending saves (of good states) are
        finished first, and its latest step is named in the message.
    """
    step = int(fetched['nonfinite_step'])
    if step < 0:
        return
    checkpoints.wait_until_finished()
    raise NonFiniteError(
        step, QUANTITIES[int(fetched['nonfinite_what'])], checkpoints.latest_step()
    )
