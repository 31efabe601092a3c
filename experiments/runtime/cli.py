"""Command-line plumbing shared by the entry points: flag errors as one line and exit code 2.

``app.run(main, flags_parser=cli.parse_flags)`` replaces absl's usage dump (exit code 1) and
ml_collections' tracebacks (a missing config file, an unknown ``--config.KEY``) with one line
on stderr that names the flag, and exit code 2, like every other bad input of the trainer.
The exit codes (``runtime/errors.py``) are the same for ``experiments.train``, ``experiments.demo``
and ``experiments.reproduce``: 0 done or preempted (resumable), 2 bad input (flags, config,
workdir, checkpoint, data), 3 non-finite training (see ``runtime/nonfinite.py``).
"""

import contextlib
import re
import sys

from absl import flags

from experiments.runtime import errors, nonfinite, preemption

EXIT_BAD_INPUT = errors.EXIT_BAD_INPUT
EXIT_NONFINITE = errors.EXIT_NONFINITE


def fail(message: str, code: int = EXIT_BAD_INPUT):
    """Prints ``error: <message>`` (one line) on stderr and exits with ``code``."""
    print(f'error: {" ".join(str(message).split())}', file=sys.stderr)
    sys.exit(code)


@contextlib.contextmanager
def exit_on_run_errors():
    """Turns the expected failures of a training run into one line and an exit code.

    Bad input (data not prepared, config, workdir, checkpoint, distributed flags) exits 2,
    non-finite training 3, and a preemption prints how to resume and exits 0.
    """
    try:
        yield
    except errors.BadInputError as e:
        fail(e)
    except nonfinite.NonFiniteError as e:
        fail(e, EXIT_NONFINITE)
    except preemption.Preempted as e:
        print(e)
        sys.exit(0)


def parse_flags(argv: list[str]) -> list[str]:
    """Parses ``argv`` into ``flags.FLAGS`` (absl's ``flags_parser``); bad flags exit with 2."""
    try:
        rest = flags.FLAGS(argv)
    except Exception as e:  # flags.Error, and what config files and overrides raise
        fail(_config_load_error() or _describe(e, argv))
    load_error = _config_load_error()
    if load_error:
        fail(load_error)
    if len(rest) > 1:
        fail(f'unexpected arguments: {" ".join(rest[1:])}; flags take the form --name=value.')
    return rest


def _config_load_error() -> str | None:
    """The error of a config file that failed to load (ml_collections raises it on access)."""
    for name in list(flags.FLAGS):
        flag = flags.FLAGS[name]
        try:
            hasattr(flag.value, 'keys')  # such a config raises its error on any attribute
        except Exception as e:
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            return f'--{name}={flag.serialize().partition("=")[2]} could not be loaded: {lines[-1]}'
    return None


def _describe(error: Exception, argv: list[str]) -> str:
    message = str(error)
    missing = re.fullmatch(
        r'flag --(\S+)=None: Flag --\S+ must have a value other than None\.', message
    )
    if missing:
        name = missing.group(1)
        return f'--{name} is required ({flags.FLAGS[name].help.rstrip(".")}).'
    unknown = re.fullmatch(r"Unknown command line flag '([^']+)'.*", message, re.DOTALL)
    if unknown:
        return f'unknown flag --{unknown.group(1)}; --helpfull lists the flags.'
    if isinstance(error, (KeyError, AttributeError)):  # ml_collections: no such config key
        key = re.search(r"'(?:\\')?([\w-]+)", message)  # "'key'" or "'\\'key\\'\\n..."
        hint = re.search(r'Did you mean "([^"]+)"', message)
        name = _override_naming(key.group(1), argv) if key else message
        return (
            f'{name} is not a key of the config'
            f'{f" (did you mean {hint.group(1)}?)" if hint else ""}; the config file lists '
            'its keys.'
        )
    if isinstance(error, flags.Error):
        return message
    return f'the config file could not be loaded: {type(error).__name__}: {message}'


def _override_naming(key: str, argv: list[str]) -> str:
    """The ``--config.a.b`` override in ``argv`` whose path holds ``key`` (else ``key``)."""
    for arg in argv:
        name = arg.split('=')[0]
        if name.startswith('--') and key in name.split('.')[1:]:
            return name
    return key
