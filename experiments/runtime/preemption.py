"""Preemption: SIGTERM / SIGINT ask the training loop to checkpoint and stop cleanly.

While a :class:`Guard` is active, the first SIGTERM or SIGINT only sets a flag (and says so on
stderr); the loop reads it after each step (a Python bool: no device sync), saves a
checkpoint, waits for it to be written and raises :class:`Preempted`, which the CLI turns into
``Preempted at step N; rerun the same command to resume.`` and exit code 0. A second signal
while the first is pending acts as it would without the guard (SIGINT: KeyboardInterrupt).

In a multi-process run every process must stop at the same step, so the flags are combined
across processes, only every ``sync_every`` steps (a host sync the loop makes anyway).
"""

import os
import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(KeyboardInterrupt):
    """The run was asked to stop (SIGTERM / SIGINT) and stopped after saving a checkpoint.

    A ``KeyboardInterrupt``, so that callers catching ``Exception`` do not swallow it.
    """

    def __init__(self, step: int, signal_name: str):
        super().__init__(
            f'Preempted at step {step} ({signal_name}); rerun the same command to resume.'
        )
        self.step = step
        self.signal_name = signal_name


class Guard:
    """Turns SIGTERM / SIGINT into a stop request while used as a context manager.

    Outside the main thread (where Python cannot install signal handlers) it installs nothing
    and never requests a stop.

    Args:
      sync_every: in a multi-process run, combine the processes' flags every this many steps.
    """

    def __init__(self, sync_every: int = 1):
        self.sync_every = max(int(sync_every), 1)
        self.signal_name = None
        self.stopped = False  # should_stop said so: on every process of a multi-process run
        self._previous = {}

    @property
    def requested(self) -> bool:
        """Whether a signal asked this process to stop."""
        return self.signal_name is not None

    def __enter__(self) -> 'Guard':
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second signal: do what would have happened without the guard
            previous = self._previous.get(signum)
            previous = signal.SIG_DFL if previous is None else previous  # None: not Python's
            signal.signal(signum, previous)
            if callable(previous):
                previous(signum, frame)
            else:
                os.kill(os.getpid(), signum)
            return
        self.signal_name = signal.Signals(signum).name
        # os.write, not print: a handler may run while another print holds stderr's lock.
        os.write(
            2,
            f'\nReceived {self.signal_name}: saving a checkpoint after this step '
            '(send it again to stop at once).\n'.encode(),
        )

    def should_stop(self, step: int) -> bool:
        """Whether the loop should checkpoint and stop after ``step`` (same on all processes)."""
        if jax.process_count() == 1:
            self.stopped = self.requested
        elif step % self.sync_every == 0:
            flags = multihost_utils.process_allgather(np.int32(self.requested))
            self.stopped = bool(np.any(flags))
        return self.stopped
