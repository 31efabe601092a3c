"""Non-finite loss, gradient or state: found on device at every step, reported at host syncs.

:func:`guard` wraps a train step ``(state, metrics, *args) -> (state, metrics)`` so that the
metrics dict also carries int32 scalars: ``nonfinite_step``, the first step whose loss,
pass-1 gradient norm or new state (every floating-point field of the task's state: parameters,
BatchNorm statistics, optimizer state, so the sharpness-aware link's output too) is not finite,
-1 while none is; ``nonfinite_what``, its index in :func:`quantities`; and
``nonfinite_skipped``, the number of steps dropped in ``skip`` mode. No host sync is added: the
loop fetches the metrics at log and checkpoint steps anyway, and calls :func:`check` on them
there, before any save, so a non-finite state is never checkpointed.

Two policies (``--config.skip_nonfinite``): stop (the default; exit code 3, the last good
checkpoint kept), or skip: a step with a non-finite value is dropped on device (the state
and the metric sums stay as before it, only the step counter advances, so the next step takes
the next batch), counted in ``skipped_steps`` of the log record, and the run continues.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

KEYS = ('nonfinite_step', 'nonfinite_what', 'nonfinite_skipped')
# What a state field is called in the one-line error (others: the field name).
FIELD_NAMES = {'params': 'parameters', 'batch_stats': 'BatchNorm statistics',
               'opt_state': 'optimizer state'}
METRIC_NAMES = {'loss': 'loss', 'grad_norm': 'gradient norm'}


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
            '--config.learning_rate (or --config.rho) and rerun with --allow_config_change, '
            'or skip such steps with --config.skip_nonfinite=True.'
        )
        self.step = step
        self.quantity = quantity
        self.last_checkpoint = last_checkpoint


def _fields(state) -> list[tuple[str, object]]:
    if dataclasses.is_dataclass(state):
        return [(f.name, getattr(state, f.name)) for f in dataclasses.fields(state)]
    if hasattr(state, '_fields'):
        return [(name, getattr(state, name)) for name in state._fields]
    return [('state', state)]


def _inexact(tree) -> list:
    return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]


def _checked(state, metrics) -> list[tuple[str, object]]:
    """(name, value) of what the guard checks: the loss and gradient-norm sums present in
    ``metrics``, then every field of ``state`` that holds floating-point arrays."""
    checked = [(name, metrics[key]) for key, name in METRIC_NAMES.items() if key in metrics]
    checked += [(FIELD_NAMES.get(name, name.replace('_', ' ')), value)
                for name, value in _fields(state) if _inexact(value)]
    return checked


def quantities(state, metrics) -> tuple[str, ...]:
    """The names ``nonfinite_what`` indexes, for a state and metrics shaped like these."""
    return tuple(name for name, _ in _checked(state, metrics))


def with_status(metrics: dict) -> dict:
    """``metrics`` plus a fresh status (no non-finite step seen, none skipped)."""
    return {**metrics, 'nonfinite_step': jnp.int32(-1), 'nonfinite_what': jnp.int32(-1),
            'nonfinite_skipped': jnp.int32(0)}


def strip(metrics: dict) -> dict:
    """``metrics`` without the status keys (what a task's metric summary expects)."""
    return {k: v for k, v in metrics.items() if k not in KEYS}


def all_finite(tree) -> jax.Array:
    """Whether every floating-point entry of ``tree`` is finite (a bool scalar)."""
    checks = [jnp.all(jnp.isfinite(x)) for x in _inexact(tree)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.bool_(True)


def _with_step(state, step):
    return state.replace(step=step) if hasattr(state, 'replace') else state._replace(step=step)


def guard(train_step: Callable, *, skip: bool = False) -> Callable:
    """Wraps ``train_step(state, metrics, *args)``; the metrics must come from
    :func:`with_status`. Step ``s`` (0-based ``state.step``) is reported as step ``s + 1``, the
    number of steps taken when it went wrong, as in ``metrics.jsonl``.

    Args:
      train_step: a task's train step; ``state`` has a ``step`` field.
      skip: drop a non-finite step (state and sums as before it, ``step`` + 1) and count it
        in ``nonfinite_skipped``, instead of recording it for :func:`check` to stop the run.
    """

    def guarded(state, metrics, *args):
        step = state.step
        old_sums = strip(metrics)
        new_state, sums = train_step(state, old_sums, *args)
        # The sums only grow, so a non-finite sum means this or an earlier step of the log
        # interval was non-finite; only the first one is recorded.
        finite = jnp.stack([all_finite(value) for _, value in _checked(new_state, sums)])
        ok = jnp.all(finite)
        if skip:
            keep = lambda new, old: jnp.where(ok, new, old)
            new_state = _with_step(jax.tree.map(keep, new_state, state), new_state.step)
            sums = jax.tree.map(keep, sums, old_sums)
            skipped = metrics['nonfinite_skipped'] + (~ok).astype(jnp.int32)
            return new_state, {**sums, **{k: metrics[k] for k in KEYS[:2]},
                               'nonfinite_skipped': skipped}
        first = (metrics['nonfinite_step'] < 0) & ~ok
        status = {
            'nonfinite_step': jnp.where(first, step + 1, metrics['nonfinite_step']),
            'nonfinite_what': jnp.where(first, jnp.argmin(finite), metrics['nonfinite_what']),
            'nonfinite_skipped': metrics['nonfinite_skipped'],
        }
        return new_state, {**sums, **{k: v.astype(jnp.int32) for k, v in status.items()}}

    return guarded


def check(fetched: dict, checkpoints, names) -> None:
    """Raises :class:`NonFiniteError` if the fetched metrics saw a non-finite step.

    Args:
      fetched: the metrics dict, on the host (``jax.device_get``).
      checkpoints: the run's orbax ``CheckpointManager``; pending saves (of good states) are
        finished first, and its latest step is named in the message.
      names: :func:`quantities` of the run's state and metrics (what ``nonfinite_what``
        indexes).
    """
    step = int(fetched['nonfinite_step'])
    if step < 0:
        return
    checkpoints.wait_until_finished()
    raise NonFiniteError(
        step, names[int(fetched['nonfinite_what'])], checkpoints.latest_step()
    )
