"""The run's expected failures and the exit codes they map to (shared by every entry point).

Every bad input a user can fix (a config value, flags, the workdir, a checkpoint that does not
fit, data that is not prepared, distributed flags) is a :class:`BadInputError` with a one-line
message that names the fix; a task's own errors of that kind subclass it. The entry points
(``experiments.train``, ``experiments.demo``, ``experiments.reproduce``) turn them into the
same exit codes through :func:`experiments.runtime.cli.exit_on_run_errors`:

- 0: done, or preempted after a checkpoint (rerun the command to resume);
- 2: bad input (:data:`EXIT_BAD_INPUT`);
- 3: non-finite training (:data:`EXIT_NONFINITE`, see ``runtime/nonfinite.py``).
"""

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3


class BadInputError(ValueError):
    """Bad input the user can fix; the message is one line and names the fix (exit code 2)."""


class ConfigError(BadInputError):
    """A bad configuration value; the message is one line and names the ``--config.KEY``."""
