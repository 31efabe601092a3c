"""The run's expected failures and the exit codes they map to (shared by every entry point).

Every bad input a user can fix (a config value, flags, the workdir, a checkpoint that does not
fit, data that is not prepared, distributed flags) is a :class:`BadInputError` with a one-line
message that names the fix; a task's own errors of that kind subclass it. A failure of the
machine's storage (disk full, file-size limit, a folder that cannot be written) is an
:class:`EnvironmentFailure`. The entry points (``experiments.train``, ``experiments.demo``,
``experiments.reproduce``) turn them into the same exit codes through
:func:`experiments.runtime.cli.exit_on_run_errors`, each with one line on stderr:

- 0: done, or preempted after a checkpoint (rerun the command to resume);
- 2: bad input (:data:`EXIT_BAD_INPUT`), including a ``--workdir`` path too long for the file
  system (checked before anything is created);
- 3: non-finite training (:data:`EXIT_NONFINITE`, see ``runtime/nonfinite.py``);
- 4: the environment refused a write (:data:`EXIT_ENVIRONMENT`): no space left, the file-size
  limit, a read-only or unwritable workdir or ``checkpoints/`` folder. The traceback is in
  ``WORKDIR/error.log`` (when the workdir can be written); every checkpoint completed before
  is kept, so rerunning the same command once the fault is fixed resumes from it;
- 128 + N: stopped at once by a second signal N while stopping (130 for SIGINT, 143 for
  SIGTERM, :func:`exit_code_of_signal`); completed checkpoints are kept and an unfinished save
  is discarded by the next run.
"""

import signal

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3
EXIT_ENVIRONMENT = 4


def exit_code_of_signal(signum: int) -> int:
    """The shell's exit code of a process stopped by signal ``signum``: 128 + ``signum``."""
    return 128 + int(signal.Signals(signum))


class BadInputError(ValueError):
    """Bad input the user can fix; the message is one line and names the fix (exit code 2)."""


class ConfigError(BadInputError):
    """A bad configuration value; the message is one line and names the ``--config.KEY``."""


class EnvironmentFailure(Exception):
    """The machine refused a write (exit code 4); the message is one line and names the fix.

    Attributes:
      errno: the OS error number behind it (e.g. ``errno.ENOSPC``).
    """

    def __init__(self, message: str, errno: int):
        super().__init__(message)
        self.errno = errno
