"""Preemption: SIGTERM / SIGINT ask the training loop to checkpoint and stop cleanly.

While a :class:`Guard` is active, the first SIGTERM or SIGINT only sets a flag (and says so on
stderr); the loop reads it after each step (a Python bool: no device sync), saves a
checkpoint, waits for it to be written and raises :class:`Preempted`, which the CLI turns into
``Preempted at step N; rerun the same command to resume.`` and exit code 0. A second signal
while the first is pending stops the run at once. Under the entry points
(:func:`exits_at_once`) the process prints one line and ends with exit code 128 + N (130 for
SIGINT, 143 for SIGTERM) right in the handler, as a ``kill -9`` would: checkpoints completed
before are kept, a save it cut short is left as an orbax temporary folder, never read and
removed by the next run. (Raising from the handler would not do: Python runs handlers inside
garbage-collection callbacks too, where an exception is printed and ignored.) Called as a
library, the handler raises :class:`Interrupted`, a ``KeyboardInterrupt``.

In a multi-process run every process must stop at the same step, so the flags are combined
across processes, only every ``sync_every`` steps (a host sync the loop makes anyway).
"""

import contextlib
import os
import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

from experiments.runtime import errors

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_exit_at_once = False  # set by exits_at_once(): the entry points' policy for a second signal


@contextlib.contextmanager
def exits_at_once():
    """While active, a second signal ends the process at once (one line, exit 128 + N)."""
    global _exit_at_once
    previous, _exit_at_once = _exit_at_once, True
    try:
        yield
    finally:
        _exit_at_once = previous


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


class Interrupted(KeyboardInterrupt):
    """A second SIGTERM / SIGINT stopped the run at once (exit code 128 + the signal number).

    A ``KeyboardInterrupt``, so that callers catching ``Exception`` do not swallow it.
    """

    def __init__(self, signal_name: str):
        super().__init__(
            f'Stopped at once by a second {signal_name}; the checkpoints completed before are '
            'kept (an unfinished save is discarded); rerun the same command to resume.'
        )
        self.signal_name = signal_name
        self.exit_code = errors.exit_code_of_signal(signal.Signals[signal_name])


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
        self._interrupted = False

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
        if self.requested:  # a second signal stops at once; later ones let it unwind
            if not self._interrupted:
                self._interrupted = True
                interrupted = Interrupted(signal.Signals(signum).name)
                if _exit_at_once:
                    os.write(2, f'\nerror: {interrupted}\n'.encode())
                    os._exit(interrupted.exit_code)
                raise interrupted
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
